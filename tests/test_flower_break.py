"""Break-it review of the Flower backend's newest parts (issue 17): each test fails on the code
before its fix. In process: the stand-in Grid of test_flower_parts (node k + 1 runs the
ClientApp's `flower.site_train`), Flower's own SecAgg+ workflow classes where a stage matters."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401

from jmtl.federated import flower  # noqa: E402


def _rows(wd):
  return [json.loads(x) for x in (Path(wd) / "rounds.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- two claimants of one site

class _SwappingGrid(_Grid):
  """The stand-in Grid whose replies of the rounds (0-based) in `swap` arrive in reverse node
  order: on a real SuperLink which of two claimants answers first varies from round to round."""

  def __init__(self, run_config, swap, gone=(), **kw):
    super().__init__(run_config, **kw)
    self.swap, self.gone, self.round = set(swap), set(gone), None

  def push_messages(self, msgs):
    self.round = int(msgs[0].content["config"]["round"]) if msgs else None
    ids = super().push_messages(msgs)
    for mid, msg in zip(ids, msgs):  # (node, round) in `gone`: no reply ever comes
      if (msg.metadata.dst_node_id, self.round) in self.gone:
        self.out.pop(mid, None)
    return ids

  def pull_messages(self, ids):
    got = super().pull_messages(ids)
    return got[::-1] if self.round in self.swap else got


def test_a_site_claimed_twice_keeps_its_owner_whatever_order_the_replies_come_in(tmp_path):
  """DiLoCo (each site's AdamW moments live in its SuperNode's Context.state), nodes 1 and 3
  both claim site a, and in round 2 node 3's reply comes first. The site's owner (node 1, whose
  reply round 1 applied) must still count: the run equals the 2-site run without a claimant,
  bit for bit. (Counting the first arrival switched site a to node 3, whose moments were at
  their init: a different update.) When the owner does not answer (round 3: node 1 gone), the
  claimant takes the site over, and stays its owner after."""
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  rc, ref_rc = (_run_config(w, 3, algo="diloco") for w in (wd, ref_wd))
  flower.serve(_SwappingGrid(rc, swap={1}, nodes=["a", "b", "a"]), rc)
  flower.serve(_Grid(ref_rc), ref_rc)
  rows = _rows(wd)
  assert [r["sites"] for r in rows] == [["a", "b"]] * 3
  assert "node 3 claims site 'a', which node 1 already replied for" in rows[1]["errors"]["3"]
  assert rows[1]["site_loss"] == _rows(ref_wd)[1]["site_loss"]
  _, got, _, _ = _final(wd, rc)
  _, want, _, _ = _final(ref_wd, ref_rc)
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], want[k])

  # Node 1 gone from round 3 (index 2): node 3 takes site a over; in round 4 node 1 is back and
  # answers first, but node 3 is the owner now and its reply counts.
  wd2 = tmp_path / "takeover"
  rc2 = _run_config(wd2, 4, algo="diloco")
  flower.serve(_SwappingGrid(rc2, swap=set(), gone={(1, 2)}, nodes=["a", "b", "a"]), rc2)
  rows = _rows(wd2)
  assert [r["sites"] for r in rows] == [["a", "b"]] * 4
  assert "errors" not in rows[2]  # node 3 alone answered for a
  assert "node 1 claims site 'a', which node 3 already replied for" in rows[3]["errors"]["1"]
