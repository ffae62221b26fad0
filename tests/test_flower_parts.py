"""The parts of jmtl.federated.flower that need no Flower processes: payloads, the server's
aggregation against numpy, and the one-line errors of `jmtl federated` with fed.backend=flower."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from jmtl.federated import flower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "configs" / "tiny_fed_flower.py")


def test_payload_roundtrip_is_raw_float32_bytes():
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": np.full((), 2.5, np.float32),  # 0-d: Flower's wire format sends it as (1,)
          "c": {"m": np.array([1, -2], np.int32)}}
  rec = flower.to_record(tree)
  assert flower.payload_bytes(rec) == 6 * 4 + 4 + 2 * 4  # values only, no header
  assert rec["['w']"].data == np.arange(6, dtype="<f4").tobytes()
  back = flower.from_record(rec, tree)
  for k in ("w", "b"):
    assert back[k].shape == tree[k].shape and back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], tree[k])
  np.testing.assert_array_equal(back["c"]["m"], [1, -2])
  with pytest.raises(ValueError, match=r"\['w'\]"):
    flower.from_record(rec, {**tree, "w": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="no leaf"):
    flower.from_record(rec, {**tree, "z": np.zeros(1, np.float32)})


def test_aggregate_is_the_example_weighted_mean_over_arrived_sites_and_holders():
  rng = np.random.default_rng(0)
  like = {"trunk": np.zeros(4, np.float32), "head": np.zeros(2, np.float32)}
  d = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in like.items()}
       for _ in range(3)]
  n = np.array([10.0, 30.0, 60.0], np.float32)
  groups = {"trunk": 0, "head": 1}
  holds = np.array([[1, 1], [1, 0], [1, 1]], np.float32)  # site 1 does not hold the head
  got, w = flower.aggregate([d[0], d[1], None], n, like, groups, holds)  # site 2 lost
  np.testing.assert_allclose(w, [0.25, 0.75, 0.0], rtol=1e-6)
  np.testing.assert_allclose(got["trunk"], 0.25 * d[0]["trunk"] + 0.75 * d[1]["trunk"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["head"], d[0]["head"], rtol=1e-5, atol=1e-6)  # its only holder
  none, w0 = flower.aggregate([None, None, None], n, like)
  assert np.all(w0 == 0) and all(np.all(np.asarray(v) == 0) for v in none.values())


def _cli(tmp_path, *overrides):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             FLWR_HOME=str(tmp_path / "flwr_home"))
  return subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                         "--workdir", str(tmp_path / "wd"), "--config.fed.backend=flower",
                         *overrides], env=env, capture_output=True, text=True, timeout=120)


def test_flower_backend_refuses_what_it_does_not_run_in_one_line(tmp_path):
  out = _cli(tmp_path, "--config.fed.faults.stragglers=0.25")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jmtl: error: config key 'fed.backend'")
  assert "fed.faults" in lines[0] and "fed.compress" not in lines[0]  # compress runs now
  assert "fed.mode" not in lines[0]  # fed.mode = async runs now (jmtl.federated.flower_async)


def test_flower_local_simulation_connection_is_refused_before_submitting(tmp_path):
  """Flower's default connection "local" (address ':local:', what `flwr` writes without a
  config.toml) is its simulation runtime, whose simulated SuperNodes are no jmtl sites: refused
  in one line before anything is submitted or written, with and without a config.toml."""
  out = _cli(tmp_path)  # no $FLWR_HOME/config.toml: flwr's default connection
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "jmtl: error: config key 'fed.flower.superlink' = '': Flower's connection 'local'"), lines
  assert "local simulation runtime" in lines[0]
  assert not (tmp_path / "wd").exists()
  assert not (tmp_path / "flwr_home" / "local-superlink").exists()  # no simulation started
  home = tmp_path / "flwr_home"
  home.mkdir(exist_ok=True)
  (home / "config.toml").write_text('[superlink]\ndefault = "prod"\n[superlink.sim]\n'
                                    'address = ":local:"\n[superlink.prod]\n'
                                    'address = "127.0.0.1:1"\ninsecure = true\n')
  out = _cli(tmp_path, "--config.fed.flower.superlink=sim")
  assert out.returncode == 2 and "Flower's connection 'sim'" in out.stderr, out.stderr
  assert not (tmp_path / "wd").exists()


def test_flower_backend_unknown_superlink_connection_is_one_line(tmp_path):
  out = _cli(tmp_path, "--config.fed.flower.superlink=nowhere")
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "jmtl: error: config key 'fed.flower.superlink' = 'nowhere': flwr run failed"), lines
  assert "nowhere" in lines[0][60:]
  assert not (tmp_path / "wd").exists()  # nothing was written


# ---------------------------------------------------------------- the server in-process

class _Reply:
  """What `flower.serve` reads of a reply Message: content, has_error(), the id it answers."""

  def __init__(self, content, reply_to, src_node_id=0, error=None):
    self.content, self.error = content, error
    self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to,
                                          "src_node_id": src_node_id})()

  def has_error(self):
    return self.error is not None


class _Grid:
  """An in-process stand-in for Flower's Grid: node k + 1 runs the ClientApp's
  `flower.site_train` for site `nodes[k]` (default: node k + 1 is site k), keeping its state in
  a RecordDict as a SuperNode's Context.state does within one run. `lost` = sites (or (site, round) pairs)
  that never get the message (never reply); `failing` = sites whose ClientApp raises (their reply carries a Flower `Error`, as a
  SuperNode sends); `late` = (site, round) pairs whose site runs the round but whose reply
  never arrives (the server's round-timeout drops it). An evaluate message runs
  `flower.site_evaluate` (the ClientApp's evaluate handler)."""

  runs = 0

  def __init__(self, run_config, lost=(), failing=(), late=(), nodes=None):
    from flwr.app import RecordDict
    _Grid.runs += 1  # a run id of its own: `flower._site` caches per (run, site)
    self.run_id, self.run_config = -_Grid.runs, dict(run_config)
    self.problem = flower._site(self.run_id, self.run_config, "a")[0]
    self.nodes = list(self.problem.sites if nodes is None else nodes)
    self.lost, self.failing, self.late, self.out = set(lost), set(failing), set(late), {}
    self.state = [RecordDict() for _ in self.nodes]  # each node's Context.state

  def get_node_ids(self):
    return [k + 1 for k in range(len(self.nodes))]

  def push_messages(self, msgs):
    ids = []
    for i, msg in enumerate(msgs):
      node = msg.metadata.dst_node_id
      site = self.nodes[node - 1]
      mid = f"m{len(self.out)}_{i}_{time.time_ns()}"
      ids.append(mid)
      if site in self.lost or (site, int(msg.content["config"]["round"])) in self.lost:
        continue
      if site in self.failing:
        from flwr.app import Error
        self.out[mid] = _Reply(None, mid, node, Error(
            code=0, reason="ValueError: node config 'site' = 'zz' is not one of ['a', 'b']\n"
                           "Traceback (most recent call last): ..."))
        continue
      if msg.metadata.message_type == "evaluate":  # the ClientApp's evaluate handler
        content = flower.site_evaluate(msg.content, site, self.run_id, self.run_config)
      else:
        content = flower.site_train(msg.content, self.state[node - 1], site, self.run_id,
                                    self.run_config)
      if (site, int(msg.content["config"]["round"])) not in self.late:
        self.out[mid] = _Reply(content, mid, node)
    return ids

  def pull_messages(self, ids):
    return [self.out.pop(i) for i in list(ids) if i in self.out]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
  """Flower's Message() reads the process's task identity (a ServerApp process has one)."""
  from flwr.supercore.task_identity import TaskIdentity
  for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
    monkeypatch.setattr(TaskIdentity, name, value)


def _run_config(wd, rounds, **kw):
  return {"problem": "flower_problem:make", "workdir": str(wd), "rounds": rounds,
          "local-steps": 2, "algo": "fedavg", "sites": "a,b", "round-timeout": 0.5,
          "wait-sites": 0.0, **kw}


def _final(wd, run_config):
  import flower_problem as fp
  problem = fp.make(run_config)
  opt = problem.server_tx.init(problem.params)
  return flower.load_checkpoint(str(wd), problem.params, opt)


def test_server_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
  """serve() for 2 rounds, then again with rounds = 4 on the same workdir (a restarted server
  whose rounds.jsonl also holds a line past the checkpoint, as a kill between a line and the
  next checkpoint can leave with checkpoint_every > 1): the server state continues from the
  checkpoint, every round is in rounds.jsonl once, and the final parameters equal an
  uninterrupted 4-round run's and float64 numpy FedAvg's."""
  import test_flower as tf
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  flower.serve(_Grid(_run_config(wd, 2)), _run_config(wd, 2))
  with open(wd / "rounds.jsonl", "a") as f:
    f.write('{"round": 3, "sites": ["a"]}\n{"round": 4, "si')  # a dropped line and a torn one
  flower.serve(_Grid(_run_config(wd, 4)), _run_config(wd, 4))
  flower.serve(_Grid(_run_config(ref_wd, 4)), _run_config(ref_wd, 4))
  rows = [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(r["sites"] == ["a", "b"] and r["applied"] == 1 for r in rows)
  step, got, got_opt, meta = _final(wd, _run_config(wd, 4))
  _, ref, ref_opt, _ = _final(ref_wd, _run_config(ref_wd, 4))
  assert step == 4 and meta["backend"] == "flower" and meta["row"]["round"] == 4
  numpy_ref = tf._numpy_fedavg([np.ones(2, np.float32)] * 4)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[k], numpy_ref[k], atol=1e-5, rtol=1e-5)
  # One mechanism with `jmtl federated`: Orbax step directories, keep-N (1 here), no leftovers.
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4"]


def test_server_restores_a_missing_line_and_refuses_another_runs_checkpoint(tmp_path):
  wd = tmp_path / "wd"
  flower.serve(_Grid(_run_config(wd, 2)), _run_config(wd, 2))
  lines = (wd / "rounds.jsonl").read_text().splitlines()
  (wd / "rounds.jsonl").write_text(lines[0] + "\n")  # killed between round 2's save and line
  flower.serve(_Grid(_run_config(wd, 2)), _run_config(wd, 2))  # done: only the line comes back
  assert (wd / "rounds.jsonl").read_text().splitlines() == lines
  with pytest.raises(ValueError) as e:
    flower.serve(_Grid(_run_config(wd, 3, algo="diloco")), _run_config(wd, 3, algo="diloco"))
  assert len(str(e.value).splitlines()) == 1
  assert "another run" in str(e.value) and "algo 'fedavg' -> 'diloco'" in str(e.value)
  assert (wd / "rounds.jsonl").read_text().splitlines() == lines  # untouched


def test_server_drops_a_lost_site_and_renormalises(tmp_path):
  wd = tmp_path / "wd"
  flower.serve(_Grid(_run_config(wd, 1), lost={"b"}), _run_config(wd, 1))
  row = json.loads((wd / "rounds.jsonl").read_text())
  assert row["sites"] == ["a"] and row["dropped"] == ["b"] and row["weights"] == {"a": 1.0}


def test_server_records_and_prints_a_sites_error_reply(tmp_path, capfd):
  """A SuperNode whose ClientApp raised (an unknown node config site) is not silent: the
  round's line holds `errors` {node id: the error's first line} and the server says it."""
  wd = tmp_path / "wd"
  flower.serve(_Grid(_run_config(wd, 1), failing={"b"}), _run_config(wd, 1))
  row = json.loads((wd / "rounds.jsonl").read_text())
  first = "ValueError: node config 'site' = 'zz' is not one of ['a', 'b']"
  assert row["sites"] == ["a"] and row["dropped"] == ["b"] and row["errors"] == {"2": first}
  err = capfd.readouterr().err
  assert f"round 1: node 2 replied with an error: {first}" in err
  flower.serve(_Grid(_run_config(tmp_path / "ok", 1)), _run_config(tmp_path / "ok", 1))
  assert "errors" not in json.loads((tmp_path / "ok" / "rounds.jsonl").read_text())


def with_outputs(run_config):
  """flower_problem's Problem with an evaluation and a `write_outputs` that records what the
  workdir held when it was called (the last round's committed checkpoint and line?)."""
  import flower_problem as fp
  from jmtl.train import checkpoint as checkpoint_lib
  problem = fp.make(run_config)
  wd = str(run_config["workdir"])

  def write_outputs(workdir, metrics, rows, r):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
      committed = ckpt.latest_step()
    finally:
      ckpt.close()
    lines = Path(workdir, "rounds.jsonl").read_text().splitlines()
    Path(workdir, "eval.json").write_text(json.dumps({
        "round": r, "committed": committed, "last_line": json.loads(lines[-1])["round"]}))

  problem.evaluate = lambda params, opt, r: ({"t/m": float(r)}, {})
  problem.write_outputs = write_outputs
  assert wd
  return problem


def test_server_writes_eval_json_after_the_last_checkpoint_and_line(tmp_path):
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, problem="test_flower_parts:with_outputs")
  flower.serve(_Grid(rc), rc)
  assert json.loads((wd / "eval.json").read_text()) == {"round": 2, "committed": 2,
                                                        "last_line": 2}
  (wd / "eval.json").unlink()  # killed after the last line, before eval.json
  lines = (wd / "rounds.jsonl").read_text()
  flower.serve(_Grid(rc), rc)  # submitted again: no round runs, eval.json comes back
  assert json.loads((wd / "eval.json").read_text()) == {"round": 2, "committed": 2,
                                                        "last_line": 2}
  assert (wd / "rounds.jsonl").read_text() == lines


def _checkpoint(wd, meta):
  from jmtl.train import checkpoint as checkpoint_lib
  ckpt = checkpoint_lib.Checkpointer(wd / "checkpoints")
  ckpt.save(1, {"x": np.zeros(2, np.float32)}, {}, meta)
  ckpt.close()


def test_flower_backend_refuses_a_simulations_checkpoint_in_one_line(tmp_path):
  (tmp_path / "wd").mkdir()
  _checkpoint(tmp_path / "wd", {"row": None})
  out = _cli(tmp_path)
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"jmtl: error: --workdir {tmp_path / 'wd'}")
  assert "simulation" in lines[0]


def test_flower_backend_refuses_another_configs_checkpoint_naming_the_key(tmp_path):
  from jmtl import config as config_lib
  from jmtl.train import workdir as workdir_lib
  other = config_lib.complete(config_lib.load_config_file(CONFIG))
  other.model.d_model = 64
  other.fed.backend = "flower"
  (tmp_path / "wd").mkdir()
  _checkpoint(tmp_path / "wd", {"backend": "flower", "row": None, "fingerprint": {
      "config": workdir_lib.config_fingerprint(other), "tokenizer": "", "steps": 3}})
  out = _cli(tmp_path)
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"jmtl: error: --workdir {tmp_path / 'wd'}")
  assert "model.d_model 64 -> 32" in lines[0]


@pytest.mark.parametrize("spec, per_site", [
    # By hand, leaves w (5 values) and b (1): int8 = 1 byte a value + one float32 scale per
    # leaf (one block) = (5 + 4) + (1 + 4); top-k 10% keeps k = max(1, ceil(0.1 n)) = 1 value a
    # leaf, a 1-byte index (n <= 256), int8 value and scale = (1 + 1 + 4) x 2.
    # q4 (stochastic, the simulation's keys): 4-bit codes packed + float32 (lo, hi) per block
    # = (ceil(5 x 4 / 8) + 8) + (ceil(1 x 4 / 8) + 8).
    ("int8", 14), ("topk:0.1+int8", 12), ("q4", 20)])
def test_compressed_payloads_equal_the_simulation_and_its_byte_accounting(tmp_path, spec,
                                                                         per_site):
  """3 FedAvg rounds with fed.compress on the Flower server (in-process stand-in Grid; each
  site encodes with `compression`'s code and keeps its error-feedback residual, the server
  decodes the payload bytes): server parameters equal the mesh simulation's
  (`algorithm.make_round` with the same codec and keys) and bytes_up its accounting."""
  import test_flower as tf
  from jmtl.federated import compression
  wd = tmp_path / "wd"
  run_config = _run_config(wd, 3, compress=spec)
  flower.serve(_Grid(run_config), run_config)
  rows = [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]
  codec = compression.parse(spec)
  accounted = sum(compression.leaf_bytes(codec, n) for n in (5, 1))
  assert accounted == per_site
  for row in rows:
    assert row["sites"] == ["a", "b"] and row["applied"] == 1
    assert row["bytes_up"] == {"a": per_site, "b": per_site, "total": 2 * per_site}
    assert row["bytes_down"]["a"] == 4 * 6  # the parameters go down as float32
  _, got, _, _ = _final(wd, run_config)
  sim = tf._simulate("fedavg", [np.ones(2, np.float32)] * 3, codec=codec)
  plain = tf._simulate("fedavg", [np.ones(2, np.float32)] * 3)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], atol=1e-5, rtol=0)
  assert not np.allclose(got["w"], plain["w"], atol=1e-4)  # the codec changed the numbers


@pytest.mark.slow
@pytest.mark.long
def test_jmtl_config_with_compression_matches_jmtl_federated(tmp_path, data_dir):
  """A real jmtl config (`tiny_fed_flower.py`: BBC topic, transformer, DiLoCo) with
  fed.compress = topk:0.1+int8 through the Flower server (in-process stand-in Grid, the
  Problem of `flower.jmtl_problem` as every SuperNode builds it) against `jmtl federated`'s
  mesh simulation of the same config: round 2's site losses (taken at the server parameters
  after the compressed round 1) agree (rel 1e-5), and bytes_up / bytes_down are equal."""
  spec = ["--config.fed.rounds=2", "--config.fed.compress=topk:0.1+int8"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sim_wd = tmp_path / "sim"
  sim = subprocess.Popen([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                          "--workdir", str(sim_wd), *spec], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    wd = tmp_path / "flower"
    run_config = {"problem": "jmtl.federated.flower:jmtl_problem", "config": CONFIG,
                  "overrides": " ".join(spec), "workdir": str(wd), "rounds": 2,
                  "round-timeout": 60.0, "wait-sites": 0.0}
    flower.serve(_Grid(run_config), run_config)
    log, _ = sim.communicate(timeout=200)
  finally:
    sim.kill()
  assert sim.returncode == 0, log
  rows = [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]
  ref = [json.loads(x) for x in (sim_wd / "rounds.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [r["round"] for r in ref] == [1, 2]
  for got, want in zip(rows, ref):
    assert got["site_loss"] == pytest.approx(want["site_loss"], rel=1e-5, abs=1e-6)
    assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
  assert rows[0]["bytes_up"]["a"] < rows[0]["bytes_down"]["a"] / 10  # it compressed


# ---------------------------------------------------------------- following a submitted run

def _line(r, loss):
  return json.dumps({"round": r, "sites": ["a", "b"], "loss": loss, "seconds": 0.5}) + "\n"


def _started(wd, submission, rows):
  """What a server of submission `submission` has written: flower.json naming it, the lines."""
  wd.mkdir(exist_ok=True)
  (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": submission}}))
  (wd / "rounds.jsonl").write_text("".join(_line(r, loss) for r, loss in rows))


def _follow(wd, status, **kw):
  said = []
  kw = {"submission": "s1", "resumed": None, "wait_s": 30.0, **kw}
  try:
    last = flower.follow(str(wd), 4, 7, status=status, echo=said.append, poll_s=0.01,
                         status_every_s=0.0, **kw)
  except flower.RunError as e:
    return said, e
  return said, last


def test_follow_ends_with_one_line_when_the_flower_run_failed(tmp_path):
  wd = tmp_path / "wd"
  _started(wd, "s1", [(1, 0.9), (2, 0.8)])  # the server died after round 2 of 4
  t0 = time.time()
  said, err = _follow(wd, lambda: ("finished:failed", "ServerApp raised"))
  assert time.time() - t0 < 5  # not the full wait_s
  assert said == ["round 1: loss 0.9 sites a,b 0.5 s", "round 2: loss 0.8 sites a,b 0.5 s"]
  assert isinstance(err, flower.RunError) and len(str(err).splitlines()) == 1
  assert str(err).startswith("the Flower run 7 ended (finished:failed) after round 2 of 4")
  assert "ServerApp raised" in str(err)
  assert "its server's log: `flwr log 7`;" in str(err)  # Flower's default connection
  _, err = _follow(wd, lambda: ("finished:failed", ""), superlink="prod")
  assert "its server's log: `flwr log 7 prod`;" in str(err)  # the run's connection named


def test_follow_says_when_wait_s_runs_out(tmp_path):
  wd = tmp_path / "wd"
  _started(wd, "s1", [(1, 0.9)])
  said, err = _follow(wd, lambda: ("running", ""), wait_s=0.3)
  assert said == ["round 1: loss 0.9 sites a,b 0.5 s"]
  assert isinstance(err, flower.RunError) and str(err).startswith(
      "stopped waiting for the Flower run 7 after fed.flower.wait_s = 0.3 s at round 1 of 4 "
      "(run status: running)")


def test_follow_after_a_resume_prints_only_this_runs_rounds(tmp_path):
  """The killed run left rounds 1-4 (3 and 4 past its checkpoint at round 2, loss 99): none of
  them is printed or counted; the new server drops 3-4, names its submission, redoes them."""
  import threading
  wd = tmp_path / "wd"
  _started(wd, "old", [(1, 0.9), (2, 0.8), (3, 99.0), (4, 99.0)])

  def server():
    time.sleep(0.3)
    (wd / "rounds.jsonl").write_text(_line(1, 0.9) + _line(2, 0.8))  # truncated past round 2
    (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": "s1"}}))
    for r in (3, 4):
      time.sleep(0.1)
      with open(wd / "rounds.jsonl", "a") as f:
        f.write(_line(r, 0.7 - 0.1 * (r - 3)))

  thread = threading.Thread(target=server)
  thread.start()
  said, last = _follow(wd, lambda: ("running", ""), resumed=2)
  thread.join()
  assert last == 4
  assert said == ["resuming from round 2", "round 3: loss 0.7 sites a,b 0.5 s",
                  "round 4: loss 0.6 sites a,b 0.5 s"]


def test_overrides_with_quotes_pass_flowers_run_config_parser():
  """`--config.tasks=('bbc_topic',)` and a dict in fed.sites (quotes in the values) go through
  `flwr run --run-config` (Flower's own parser, `parse_config_args`) and come back as the same
  arguments on the server (`decode_overrides`); a plain line decodes to itself."""
  from flwr.common.config import parse_config_args
  overrides = ["--config.tasks=('bbc_topic',)", "--config.fed.rounds=2",
               "--config.fed.sites=({'name': 'a', 'devices': 1}, {'name': 'b'})",
               '--config.data.tokenizer="x y.txt"', "--config.x=50%"]
  text = flower.run_config_text({"overrides": flower.encode_overrides(overrides), "rounds": 2})
  parsed = parse_config_args([text])
  assert parsed["rounds"] == 2
  assert flower.decode_overrides(parsed["overrides"]) == overrides
  assert flower.decode_overrides("--config.a=1 --config.b=2") == ["--config.a=1", "--config.b=2"]


def test_follow_a_finished_run_submitted_again_waits_for_its_server(tmp_path):
  """The workdir's run already finished (rounds 1-4, checkpoint at 4) and is submitted again:
  follow waits until the new server names its submission (resuming from round 4) and releases
  the workdir's lock, instead of returning at once while that server still runs."""
  import threading
  from etils import epath
  from jmtl.train import workdir as workdir_lib
  wd = tmp_path / "wd"
  _started(wd, "old", [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)])
  released = []

  def server():
    time.sleep(0.3)
    with workdir_lib.lock(epath.Path(wd), "flower server"):
      (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": "s1"},
                                                  "resumed_from": 4}))
      time.sleep(0.3)  # eval.json again, then the lock goes
      released.append(time.time())

  thread = threading.Thread(target=server)
  thread.start()
  said, last = _follow(wd, lambda: ("running", ""), resumed=4)
  returned = time.time()
  thread.join()
  assert last == 4 and said == ["resuming from round 4"]
  assert released and returned >= released[0]  # not before the new server let the workdir go


def test_follow_a_finished_run_submitted_again_whose_server_failed(tmp_path):
  wd = tmp_path / "wd"
  _started(wd, "old", [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)])
  said, err = _follow(wd, lambda: ("finished:failed", "ServerApp raised"), resumed=4)
  assert said == [] and isinstance(err, flower.RunError)
  assert str(err).startswith("the Flower run 7 ended (finished:failed) after round 4 of 4")


def test_follow_a_completed_run_whose_workdir_is_elsewhere_returns(tmp_path):
  said, last = _follow(tmp_path / "absent", lambda: ("finished:completed", ""))
  assert last == 0 and said == [f"the Flower run 7 ended (finished:completed); its server "
                                f"wrote {tmp_path / 'absent'} on its own machine"]


def test_cli_prints_a_failed_flower_run_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
  from jmtl import cli

  def failed(*args, **kwargs):
    raise flower.RunError("the Flower run 7 ended (finished:failed) after round 2 of 4; x")
  monkeypatch.setattr(flower, "submit", failed)
  with pytest.raises(SystemExit) as e:
    cli.main(["jmtl", "federated", "--config", CONFIG, "--workdir", str(tmp_path / "wd"),
              "--config.fed.backend=flower"])
  assert e.value.code == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      "jmtl: error: the Flower run 7 ended (finished:failed) after round 2 of 4; x"]
