"""The Flower newcomer review's findings (in-process: the stand-in Grid of test_flower_parts):
an error reply filed under the node its message went to, a round whose sites all timed out
saying so, and `jmtl eval` of a Flower workdir on a host with fewer devices than the sites."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import ROOT, _Grid, _Reply, _run_config, _task_identity  # noqa: E402,F401

from jmtl.federated import flower  # noqa: E402

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: src of the SuperLink's own replies
DOWN = 4 * 6  # the parameters w (5) and b (1) as float32


def _rows(wd):
  return [json.loads(x) for x in (Path(wd) / "rounds.jsonl").read_text().splitlines()]


class _LostNodeGrid(_Grid):
  """The stand-in Grid where the SuperNodes of `killed` sites are gone: the SuperLink answers
  their messages itself with an error reply whose src_node_id is its own id (1; site a's node
  here), as Flower's SuperLink does for a node that stopped sending heartbeats."""

  def __init__(self, run_config, killed=(), **kw):
    super().__init__(run_config, **kw)
    self.killed = set(killed)

  def push_messages(self, msgs):
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID as flower_id
    assert flower_id == SUPERLINK_NODE_ID
    keep = [m for m in msgs if self.nodes[m.metadata.dst_node_id - 1] not in self.killed]
    ids = iter(super().push_messages(keep))
    out = []
    for i, m in enumerate(msgs):
      if m in keep:
        out.append(next(ids))
        continue
      mid = f"dead{i}_{len(self.out)}"
      self.out[mid] = _Reply(None, mid, SUPERLINK_NODE_ID, Error(
          code=4, reason="Node Unavailable: the destination node is offline"))
      out.append(mid)
    return out


def test_a_lost_nodes_error_reply_is_filed_under_the_node_it_was_sent_to(tmp_path, capfd):
  """Site b's SuperNode (node 2) is gone; the SuperLink's error reply comes from node 1 (its
  own id, site a's node here). The error must be under "2", not "1"; a's reply still counts."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1)
  flower.serve(_LostNodeGrid(rc, killed={"b"}), rc)
  (row,) = _rows(wd)
  assert row["sites"] == ["a"] and row["dropped"] == ["b"]
  assert row["errors"] == {"2": "Node Unavailable: the destination node is offline"}
  assert "round 1: node 2 replied with an error" in capfd.readouterr().err
  assert row["bytes_down"] == {"a": DOWN, "total": 2 * DOWN}  # both messages were sent


def test_a_round_whose_sites_all_timed_out_names_them(tmp_path, capfd):
  """Round 1 applies both sites; in round 2 neither reply comes within round-timeout: the line
  says which sites timed out (known from round 1's replies) and bytes_down counts the two
  messages sent (each was there to download), as it counts a refused claimant's."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, **{"round-timeout": 0.2})
  flower.serve(_Grid(rc, late={("a", 1), ("b", 1)}), rc)
  one, two = _rows(wd)
  assert one["applied"] == 1 and "timed_out" not in one
  assert one["bytes_down"] == {"a": DOWN, "b": DOWN, "total": 2 * DOWN}
  assert two["applied"] == 0 and two["sites"] == [] and two["dropped"] == ["a", "b"]
  assert two["timed_out"] == ["a", "b"]
  assert two["bytes_down"] == {"total": 2 * DOWN}
  assert "round 2: no reply within round-timeout 0.2 s from a, b" in capfd.readouterr().err


def test_a_node_that_never_replied_is_named_by_its_id(tmp_path):
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1, **{"round-timeout": 0.2})
  flower.serve(_Grid(rc, lost={"b"}), rc)
  (row,) = _rows(wd)
  assert row["sites"] == ["a"] and row["timed_out"] == ["node 2"]
  assert row["bytes_down"]["total"] == 2 * DOWN
