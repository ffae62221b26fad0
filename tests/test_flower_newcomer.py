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


@pytest.mark.slow
def test_jmtl_eval_of_a_flower_workdir_runs_on_a_one_device_host(tmp_path, data_dir):
  """A Flower server checkpoint of tiny_fed_flower.py (2 sites x 1 device), made in-process by
  the server (`flower._Server`, the Problem every SuperNode builds: `jmtl_problem`) with
  parameters moved off their initial values, is evaluated by `jmtl eval --backend flower` in a
  process with ONE device (the SuperLink host): it runs (no 'need 2 devices' traceback) and its
  metrics equal the server's own evaluation of those parameters (`Problem.evaluate`, the call
  the server makes at its last round)."""
  import jax
  config = str(ROOT / "tests" / "configs" / "tiny_fed_flower.py")
  wd = tmp_path / "wd"
  rc = {"problem": "jmtl.federated.flower:jmtl_problem", "config": config,
        "overrides": "--config.fed.rounds=1 --config.fed.backend=flower", "workdir": str(wd),
        "rounds": 1, "round-timeout": 60.0, "wait-sites": 0.0}
  problem = flower.jmtl_problem(rc)
  evaluate, problem.evaluate = problem.evaluate, None
  server = flower._Server(problem, rc)  # noqa: SLF001
  try:
    rng = np.random.default_rng(0)
    server.params = jax.tree.map(
        lambda x: (x + 0.05 * rng.standard_normal(np.shape(x))).astype(np.float32),
        server.params)
    server.end_round(1, {"round": 1, "sites": ["a", "b"], "applied": 1})
  finally:
    server.close()
  want, _ = evaluate(server.params, server.opt_state, 1)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JMTL_DATA_DIR=str(data_dir),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "eval", "--config", config,
                        "--backend", "flower", "--workdir", str(wd),
                        "--config.fed.rounds=1"], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  got = json.loads((wd / "eval.json").read_text())
  assert got["step"] == 1
  assert want and set(want) <= set(got)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def every_fifth(run_config):
  """flower_problem's Problem checkpointing every 5 rounds (fed.checkpoint_every's default)."""
  import flower_problem as fp
  problem = fp.make(run_config)
  problem.checkpoint_every = 5
  return problem


def test_the_stop_message_says_a_resume_needs_a_saved_checkpoint(tmp_path, capfd):
  """Every site gone from round 1 with checkpoint_every 5: the server stops after 2 empty
  rounds having saved no checkpoint, and says that submitting again starts at round 1 (the
  old message promised a kept checkpoint). With a checkpoint it names its round."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 6, problem="test_flower_newcomer:every_fifth",
                   **{"max-empty-rounds": 2, "round-timeout": 0.1})
  with pytest.raises(flower.EmptyRoundsError) as e:
    flower.serve(_Grid(rc, lost={"a", "b"}), rc)
  assert not any((wd / "checkpoints").iterdir())
  assert "none was saved yet" in str(e.value) and "starts at round 1" in str(e.value)
  rc = _run_config(tmp_path / "one", 6, **{"max-empty-rounds": 2, "round-timeout": 0.1})
  with pytest.raises(flower.EmptyRoundsError) as e:
    flower.serve(_Grid(rc, lost={(s, r) for s in "ab" for r in range(1, 6)}), rc)
  assert str(e.value).endswith("it resumes from its last checkpoint, round 3")


def test_a_failed_runs_line_says_whether_a_checkpoint_exists(tmp_path):
  from test_flower_parts import _checkpoint, _follow, _started
  wd = tmp_path / "wd"
  _started(wd, "s1", [(1, 0.9)])
  _, err = _follow(wd, lambda: ("finished:failed", ""))
  assert isinstance(err, flower.RunError) and len(str(err).splitlines()) == 1
  assert f"no checkpoint in {wd}" in str(err) and "else it starts at round 1" in str(err)
  _checkpoint(wd, {"backend": "flower"})  # round 1
  _, err = _follow(wd, lambda: ("finished:failed", ""))
  assert str(err).endswith("submit again to resume from its last checkpoint (round 1)")
