"""The Flower server's review findings (in-process: the stand-in Grid of test_flower_parts):
the workdir lock, strict rounds.jsonl lines, no leaked checkpointer, Orbax's barrier name in a
multi-process run, the sites' top-k residual committed only for applied replies, the round the
server restored, a second claimant of a site, and a run whose sites are all gone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import ROOT, _final, _Grid, _run_config, _task_identity  # noqa: E402,F401

from jmtl.config import ConfigError  # noqa: E402
from jmtl.federated import flower  # noqa: E402
from jmtl.train import checkpoint as checkpoint_lib  # noqa: E402
from jmtl.train import workdir as workdir_lib  # noqa: E402
from etils import epath  # noqa: E402


def _rows(wd):
  def strict(c):
    raise AssertionError(f"rounds.jsonl holds {c}, which is not JSON")
  return [json.loads(x, parse_constant=strict)
          for x in (Path(wd) / "rounds.jsonl").read_text().splitlines()]


def _free(wd) -> bool:
  return not workdir_lib._is_locked(epath.Path(wd))  # noqa: SLF001


# ---------------------------------------------------------------- 1, 3: lock, checkpointer

def test_a_second_server_on_a_running_servers_workdir_is_refused_naming_the_holder(tmp_path):
  import flower_problem as fp
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1)
  first = flower._Server(fp.make(rc), rc)  # noqa: SLF001  (the old server, still running)
  try:
    assert not _free(wd)
    with pytest.raises(ConfigError) as e:
      flower.serve(_Grid(rc), rc)  # the run submitted again
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"--workdir {wd} is in use" in msg and f"pid {os.getpid()} on " in msg
    assert not (wd / "rounds.jsonl").exists()  # the refused server wrote nothing
  finally:
    first.close()
  assert _free(wd)
  flower.serve(_Grid(rc), rc)  # released: the next server runs
  assert _free(wd) and [r["round"] for r in _rows(wd)] == [1]


def failing_eval(run_config):
  """flower_problem's Problem whose evaluation raises (round 0's, inside `_Server.__init__`,
  after the restore; or round 1's, inside `end_round`)."""
  import flower_problem as fp
  problem = fp.make(run_config)

  def evaluate(params, opt, r):
    if r >= int(run_config.get("fail-at", 0)):
      raise RuntimeError(f"evaluation failed at round {r}")
    return {"t/m": 0.0}, {}
  problem.evaluate, problem.eval_every = evaluate, 1
  return problem


def test_submitting_to_a_held_workdir_is_refused_locally_naming_the_holder(tmp_path):
  """`jmtl federated --backend flower` on a workdir whose lock a running server holds: one
  line naming the workdir and the holder, exit 2, before `flwr run` (the SuperLink connection
  'nowhere' would otherwise be the error) and without writing anything."""
  from test_flower_parts import _cli
  wd = tmp_path / "wd"
  with workdir_lib.lock(epath.Path(wd), "flower server"):
    out = _cli(tmp_path, "--config.fed.flower.superlink=nowhere")
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"jmtl: error: --workdir {wd} is in use by a running jmtl "), lines
  assert f"(pid {os.getpid()} on " in lines[0] and "flwr run" not in lines[0]
  assert sorted(os.listdir(wd)) == [workdir_lib.LOCK_NAME]


def test_a_server_that_raises_closes_its_checkpointer_and_releases_the_lock(tmp_path,
                                                                           monkeypatch):
  closed = []
  close = checkpoint_lib.Checkpointer.close

  def spy(self):
    if not self.read_only:
      closed.append(str(self.directory))
    close(self)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "close", spy)
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, problem="test_flower_fixes:failing_eval")
  with pytest.raises(RuntimeError, match="evaluation failed at round 0"):
    flower.serve(_Grid(rc), rc)  # raises in _Server.__init__, after the restore
  assert closed == [str(wd / "checkpoints")] and _free(wd)
  rc = _run_config(wd, 2, problem="test_flower_fixes:failing_eval", **{"fail-at": 1})
  with pytest.raises(RuntimeError, match="evaluation failed at round 1"):
    flower.serve(_Grid(rc), rc)  # raises in a round
  assert len(closed) == 2 and _free(wd)


_HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
import flower_problem as fp
from jmtl.federated import flower
rc = {rc!r}
server = flower._Server(fp.make(rc), rc)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_server_stopped_by_sigterm_releases_the_workdir(tmp_path):
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(tests=str(ROOT / "tests"),
                                                                  rc=rc)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert not _free(wd)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert _free(wd)
  with workdir_lib.lock(epath.Path(wd), "test"):
    pass


# ---------------------------------------------------------------- 2: one line mechanism

def nan_problem(run_config):
  """flower_problem's Problem whose site b's targets are NaN: its loss, and the round's, NaN."""
  import flower_problem as fp
  problem = fp.make(run_config)
  batches = problem.batches

  def poisoned(k, r):
    b, n = batches(k, r)
    if k == 1:
      b = {**b, "y": np.full_like(b["y"], np.nan)}
    return b, n
  problem.batches = poisoned
  return problem


def test_a_non_finite_loss_is_written_as_json_null(tmp_path):
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1, problem="test_flower_fixes:nan_problem")
  flower.serve(_Grid(rc), rc)
  (row,) = _rows(wd)  # strict JSON: no bare NaN
  assert row["site_loss"]["b"] is None and row["site_loss"]["a"] > 0
  # b's non-finite reply is refused (tests/test_flower_break2.py): the round's loss is a's.
  assert row["dropped"] == ["b"] and row["loss"] == row["site_loss"]["a"]


# ---------------------------------------------------------------- 4: Orbax's barrier name

def test_a_multi_process_run_needs_orbaxs_barrier_name(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from jmtl.parallel import distributed
  from jmtl.train import CheckpointError

  class WithoutPrefix(ocp.CheckpointManager):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      del self._checkpointer._barrier_sync_key_prefix

  ckpt = checkpoint_lib.Checkpointer(tmp_path / "c0")
  assert ckpt._barrier_prefix is None  # noqa: SLF001  (one process joins no barrier)
  ckpt.close()
  monkeypatch.setattr(distributed, "multi_process", lambda: True)
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "c1")
  assert ckpt._barrier_prefix == ckpt._mngr._checkpointer._barrier_sync_key_prefix  # noqa: SLF001
  ckpt._mngr.close()  # noqa: SLF001
  monkeypatch.setattr(ocp, "CheckpointManager", WithoutPrefix)
  with pytest.raises(CheckpointError) as e:
    checkpoint_lib.Checkpointer(tmp_path / "c2")
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and "_barrier_sync_key_prefix" in msg
  assert f"orbax-checkpoint {ocp.__version__}" in msg


# ---------------------------------------------------------------- 5: one checkpoint tree

def test_the_flower_server_checkpoints_the_tree_jmtl_eval_restores(tmp_path, monkeypatch):
  """`jmtl eval` (`loop.evaluate_workdir`) and the Flower server build a server checkpoint's
  tree with the one function `loop.flower_checkpoint_tree`."""
  import inspect
  from jmtl.federated import loop
  calls = []
  tree = loop.flower_checkpoint_tree
  monkeypatch.setattr(loop, "flower_checkpoint_tree", lambda p, o: calls.append(1) or tree(p, o))
  wd = tmp_path / "wd"
  flower.serve(_Grid(_run_config(wd, 1)), _run_config(wd, 1))
  assert len(calls) == 2  # the restore's target and the save
  assert tree(1, 2) == {"server": {"params": 1, "opt_state": 2}}
  assert "flower_checkpoint_tree(" in inspect.getsource(loop.evaluate_workdir)


# ---------------------------------------------------------------- 7: residual of a dropped reply

def test_a_dropped_reply_leaves_the_sites_residual_as_if_the_round_had_not_happened(tmp_path):
  """Top-k with error feedback; site b runs round 2 (index 1) but its reply comes after the
  round timeout (dropped). Reference: the same run where b never got round 2's message. The
  server sees the same rounds, so b's residual, its round-3 payload and the final parameters
  must be the same (committing round 2's residual when b replied made them differ)."""
  dropped = _run_config(tmp_path / "dropped", 3, compress="topk:0.1+int8")
  absent = _run_config(tmp_path / "absent", 3, compress="topk:0.1+int8")
  applied = _run_config(tmp_path / "applied", 3, compress="topk:0.1+int8")
  grids = {"dropped": _Grid(dropped, late={("b", 1)}), "absent": _Grid(absent, lost={("b", 1)}),
           "applied": _Grid(applied)}
  flower.serve(grids["dropped"], dropped)
  flower.serve(grids["absent"], absent)
  flower.serve(grids["applied"], applied)
  rows = {n: _rows(tmp_path / n) for n in grids}
  assert [r["sites"] for r in rows["dropped"]] == [["a", "b"], ["a"], ["a", "b"]]
  assert rows["dropped"][2]["bytes_up"] == rows["absent"][2]["bytes_up"]
  b = {n: flower.from_record(g.state[1]["residual"], g.problem.params) for n, g in grids.items()}
  for k in ("w", "b"):
    np.testing.assert_array_equal(b["dropped"][k], b["absent"][k])
  assert not np.array_equal(b["dropped"]["w"], b["applied"]["w"])  # round 2's residual counts
  _, got, _, _ = _final(tmp_path / "dropped", dropped)
  _, ref, _, _ = _final(tmp_path / "absent", absent)
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], ref[k])


def test_a_dropped_reply_leaves_the_sites_optimizer_state_as_if_the_round_had_not_happened(
    tmp_path):
  """DiLoCo (client AdamW, whose moments each site keeps in its Context.state); site b runs
  round 2 (index 1) but its reply comes after the round timeout (dropped). Reference: the same
  run where b never got round 2's message (the simulation's mask-0 site keeps its client state).
  b's committed client optimizer state, its round-3 reply and the final parameters must equal
  the reference's (saving round 2's moments when b replied made them differ)."""
  runs = {n: _run_config(tmp_path / n, 3, algo="diloco") for n in ("dropped", "absent", "applied")}
  grids = {"dropped": _Grid(runs["dropped"], late={("b", 1)}),
           "absent": _Grid(runs["absent"], lost={("b", 1)}), "applied": _Grid(runs["applied"])}
  for n, g in grids.items():
    flower.serve(g, runs[n])
  rows = {n: _rows(tmp_path / n) for n in grids}
  assert [r["sites"] for r in rows["dropped"]] == [["a", "b"], ["a"], ["a", "b"]]
  assert rows["dropped"][2]["site_loss"] == rows["absent"][2]["site_loss"]
  problem = grids["dropped"].problem
  opt_like = problem.client_tx.init(problem.params)
  opt = {n: jax.tree.leaves(flower.from_record(g.state[1]["client_opt"], opt_like))
         for n, g in grids.items()}
  assert len(opt["dropped"]) == len(opt["absent"]) >= 4  # AdamW's count, mu and nu
  for got, ref in zip(opt["dropped"], opt["absent"]):
    np.testing.assert_array_equal(got, ref)
  assert any(not np.array_equal(got, ref) for got, ref in zip(opt["dropped"], opt["applied"]))
  # The round-1 moments, by hand: AdamW's first moment after b's H = 2 steps of round 1 is
  # nonzero; they are the state b committed (round 2 never was).
  assert any(np.any(np.asarray(x) != 0) for x in opt["dropped"])
  _, got, _, _ = _final(tmp_path / "dropped", runs["dropped"])
  _, ref, _, _ = _final(tmp_path / "absent", runs["absent"])
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], ref[k])


def test_a_sites_pending_state_is_committed_only_for_an_applied_token():
  """`set_pending` / `commit_pending`, the one mechanism for the residual and the client
  optimizer state: committed iff the token is among the applied ones, discarded otherwise."""
  from flwr.app import RecordDict
  state = RecordDict()
  one = flower.to_record({"x": np.ones(3, np.float32)})
  two = flower.to_record({"x": np.full(3, 2.0, np.float32)})
  assert not flower.commit_pending(state, "")  # nothing pending: nothing happens
  flower.set_pending(state, "b.0.t1", client_opt=one, residual=None)
  assert "client_opt" not in state and "residual" not in state
  assert flower.commit_pending(state, "a.0.t0 b.0.t1")
  assert np.frombuffer(state["client_opt"]["['x']"].data, np.float32).tolist() == [1, 1, 1]
  flower.set_pending(state, "b.1.t2", client_opt=two, residual=two)
  assert not flower.commit_pending(state, "a.1.t3 b.0.t1")  # b's round-2 reply was dropped
  assert np.frombuffer(state["client_opt"]["['x']"].data, np.float32).tolist() == [1, 1, 1]
  assert "residual" not in state and sorted(state) == ["client_opt"]


# ---------------------------------------------------------------- 8: the round restored

def test_follow_says_the_round_the_server_restored(tmp_path):
  """The checkpoint seen at submission was round 2, but the server restored round 1 (round 2
  did not read): "resuming from round 1", and round 2's new line is printed."""
  from test_flower_parts import _follow, _line
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": "s1"},
                                              "resumed_from": 1}))
  (wd / "rounds.jsonl").write_text("".join(_line(r, 0.9 - 0.1 * r) for r in (1, 2, 3, 4)))
  said, last = _follow(wd, lambda: ("running", ""), resumed=2)
  assert last == 4
  assert said[:2] == ["resuming from round 1", "round 2: loss 0.7 sites a,b 0.5 s"]


def test_the_server_writes_the_round_it_restored(tmp_path):
  wd = tmp_path / "wd"
  flower.serve(_Grid(_run_config(wd, 1)), _run_config(wd, 1))
  assert json.loads((wd / "flower.json").read_text())["resumed_from"] is None
  flower.serve(_Grid(_run_config(wd, 2)), _run_config(wd, 2))
  assert json.loads((wd / "flower.json").read_text())["resumed_from"] == 1


# ---------------------------------------------------------------- 9: two claimants of a site

def test_a_second_supernode_claiming_a_site_is_refused_and_the_first_kept(tmp_path, capfd):
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  flower.serve(_Grid(_run_config(wd, 2), nodes=["a", "b", "a"]), _run_config(wd, 2))
  flower.serve(_Grid(_run_config(ref_wd, 2)), _run_config(ref_wd, 2))
  err = capfd.readouterr().err
  rows, ref = _rows(wd), _rows(ref_wd)
  down = 4 * 6  # w (5) and b (1) as float32
  for r, (row, want) in enumerate(zip(rows, ref), 1):
    assert row["sites"] == ["a", "b"] and row["weights"] == want["weights"]
    assert set(row["errors"]) == {"3"}
    assert "node 3 claims site 'a', which node 1 already replied for" in row["errors"]["3"]
    assert f"round {r}: node 3 claims site 'a'" in err
    assert row["bytes_down"] == {"a": down, "b": down, "total": 3 * down}
  _, got, _, _ = _final(wd, _run_config(wd, 2))
  _, want, _, _ = _final(ref_wd, _run_config(ref_wd, 2))
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------- 10: every site gone

def test_a_run_whose_sites_are_gone_stops_after_max_empty_rounds(tmp_path, capfd):
  wd = tmp_path / "wd"
  rc = _run_config(wd, 6, **{"max-empty-rounds": 2})
  with pytest.raises(flower.EmptyRoundsError) as e:
    flower.serve(_Grid(rc, lost={(s, r) for s in "ab" for r in range(1, 6)}), rc)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1
  assert msg.startswith("2 consecutive rounds (2-3) had no applied reply")
  assert f"jmtl: error: {msg}" in capfd.readouterr().err.splitlines()
  rows = _rows(wd)
  assert [(r["round"], r["applied"]) for r in rows] == [(1, 1), (2, 0), (3, 0)]
  step, got, _, meta = _final(wd, rc)  # the checkpoint is intact: round 3 = round 1's params
  assert step == 3 and meta["row"]["applied"] == 0 and _free(wd)
  ref = tmp_path / "ref"
  flower.serve(_Grid(_run_config(ref, 1)), _run_config(ref, 1))
  _, one, _, _ = _final(ref, _run_config(ref, 1))
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], one[k])
  # 0 = never stop: every round runs.
  rc = _run_config(tmp_path / "never", 3, **{"max-empty-rounds": 0})
  flower.serve(_Grid(rc, lost={"a", "b"}), rc)
  assert [r["applied"] for r in _rows(tmp_path / "never")] == [0, 0, 0]


def test_max_empty_rounds_is_a_checked_config_key(tmp_path):
  from jmtl import config as config_lib
  from test_flower_parts import CONFIG
  config = config_lib.complete(config_lib.load_config_file(CONFIG))
  assert config.fed.flower.max_empty_rounds == 3
  config.fed.flower.max_empty_rounds = -1
  with pytest.raises(ConfigError, match="fed.flower.max_empty_rounds"):
    config_lib.validate(config)


# ---------------------------------------------------------------- 1, 9, 10 on a real cluster

def _finished(cluster, run_id, monkeypatch, timeout=150.0):
  from flower_cluster import BIN
  monkeypatch.setenv("FLWR_HOME", str(cluster.home))
  deadline = time.time() + timeout
  while time.time() < deadline:
    got = flower.run_status(str(BIN / "flwr"), "local", run_id)
    if got is not None and got[0].startswith("finished"):
      return got
    time.sleep(1.0)
  pytest.fail(f"the Flower run {run_id} has not finished after {timeout} s\n{cluster.logs()}")


@pytest.mark.slow
@pytest.mark.long
def test_cluster_lock_second_claimant_and_every_site_gone(tmp_path, monkeypatch):
  """A real SuperLink with SuperNodes a, b and a second one claiming a. (1) A run on a workdir
  whose lock is held fails at once, writing nothing. (9) Each round keeps one reply for a and
  names the refused claimant in `errors`; bytes_down counts its download. (10) With every
  SuperNode killed after round 1, round 2 applies nothing and, max-empty-rounds being 1, the
  run stops (failed) with round 2's checkpoint, and the workdir's lock is released."""
  from flower_cluster import Cluster
  import test_flower as tf
  c = Cluster(tmp_path / "cluster", ["a", "b"], extra={"a2": "a"}).start()
  try:
    held = tmp_path / "held"
    with workdir_lib.lock(epath.Path(held), "test"):
      out = c.run(held, algo="fedavg", rounds=2, **{"local-steps": tf.STEPS})
      assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
      status = _finished(c, json.loads(out.stdout)["run-id"], monkeypatch)
      assert status[0] == "finished:failed", (status, c.logs())
      assert not (held / "rounds.jsonl").exists() and not (held / "checkpoints").exists()
    wd = tmp_path / "wd"
    out = c.run(wd, algo="fedavg", rounds=5, **{"local-steps": tf.STEPS, "round-timeout": 20.0,
                                                "max-empty-rounds": 1})
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr

    def kill_all(n):
      if n == 2:
        for name in ("supernode_a", "supernode_b", "supernode_a2"):
          c.kill(name)
    rows = tf._wait_rounds(c, wd / "rounds.jsonl", 3, timeout=200, on_line=kill_all)
    assert all(r["sites"] == ["a", "b"] and r["applied"] == 1 for r in rows[:2])
    # The server starts once 2 SuperNodes are in: the third is there by round 2 at the latest.
    claimed = [r for r in rows[:2] if r.get("errors")]
    assert claimed, rows
    for r in claimed:
      (why,) = r["errors"].values()
      assert "claims site 'a', which node" in why and "its reply is refused" in why, why
      assert r["bytes_down"]["total"] == 3 * 4 * 6
    assert rows[2]["applied"] == 0 and rows[2]["sites"] == []
    status = _finished(c, json.loads(out.stdout)["run-id"], monkeypatch)
    assert status[0] == "finished:failed", (status, c.logs())
    assert len(_rows(wd)) == 3 and _free(wd)
    step, _, _, meta = _final(wd, _run_config(wd, 5))
    assert step == 3 and meta["row"]["applied"] == 0
  finally:
    c.stop()
