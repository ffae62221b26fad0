"""Asynchronous FedBuff on the Flower backend (`jmtl.federated.flower_async`).

In process: a stand-in Grid (a subclass of test_flower_parts' `_Grid`) runs each site's
ClientApp (`flower.site_train`) when its message is pushed and releases the replies in an order
the test scripts, one per pull. The server parameters are checked against FedBuff written here
in float64 numpy (Nguyen et al. 2022, Algorithm 1 with n_k weights and s(tau) = 1/sqrt(1 + tau):
local SGD by hand, the staleness factors by hand), K = S against the synchronous Flower server,
and the refusals, a lost site and a stopped-and-resumed run. Two `long` cases: a real jmtl
config (BBC topic) against `jmtl federated`'s asynchronous simulation, and a real TLS cluster
of 3 SuperNodes."""

import json
import math
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from test_flower_parts import _cli, _final, _Grid, _Reply, _run_config  # noqa: E402
from test_flower_parts import _task_identity  # noqa: E402,F401

from jmtl.federated import flower  # noqa: E402
from jmtl.federated import flower_async  # noqa: E402

SITES = ("a", "b", "c")
STEPS = 2
N = {0: 10.0, 1: 20.0, 2: 30.0}  # flower_problem's n_k = 10 (k + 1)


class _ScriptedGrid(_Grid):
  """`_Grid` whose replies arrive when the test says: push runs the site's ClientApp at once
  (its reply waits); each pull releases one reply: the next site of `order` when its reply is
  waiting (else none), or, once `order` is used up, the earliest-pushed waiting reply. A site
  in `lost` (or a (site, server version) pair) never replies. `pushed`: (site, version) of
  every message, in push order."""

  def __init__(self, run_config, order=(), lost=()):
    super().__init__(run_config, lost=lost)
    self.order, self.waiting, self.pushed, self.count = list(order), {}, [], 0

  def push_messages(self, msgs):
    ids = []
    for msg in msgs:
      node = msg.metadata.dst_node_id
      site, v = self.nodes[node - 1], int(msg.content["config"]["round"])
      self.count += 1
      mid = f"m{self.count}"
      ids.append(mid)
      self.pushed.append((site, v))
      if site in self.lost or (site, v) in self.lost:
        continue
      content = flower.site_train(msg.content, self.state[node - 1], site, self.run_id,
                                  self.run_config)
      self.waiting[mid] = (site, _Reply(content, mid, node))
    return ids

  def pull_messages(self, ids):
    ids = [i for i in ids if i in self.waiting]
    if self.order:
      pick = [i for i in ids if self.waiting[i][0] == self.order[0]]
      if not pick:
        return []
      self.order.pop(0)
    else:
      pick = sorted(ids, key=lambda i: int(i[1:]))
    return [self.waiting.pop(pick[0])[1]] if pick else []


@pytest.fixture(autouse=True)
def _fast_poll(monkeypatch):
  monkeypatch.setattr(flower_async, "POLL_S", 0.002)


def _rc(wd, rounds, k, **kw):
  """The run config of an asynchronous run of flower_problem over SITES, buffer K = k;
  round-timeout 30 s unless given (the scripted order decides the arrivals)."""
  kw = {"round-timeout": 30.0, **kw}
  return _run_config(wd, rounds, sites=",".join(SITES), mode="async", **{"buffer-size": k},
                     **kw)


def hand_job(k, j, start):
  """Site k's job j from parameters `start` = (w [D], b) by hand: 2 local SGD steps (lr 0.2) in
  float64 on its flower_problem batches of round j; returns Delta_k = start - y_k."""
  data, _ = fp.site_batches(0, k, j, STEPS)
  w, b = start[0].copy(), start[1]
  for t in range(STEPS):
    x, y = data["x"][t].astype(np.float64), data["y"][t].astype(np.float64)
    res = x @ w + b - y
    w, b = w - 0.2 * x.T @ res / len(y), b - 0.2 * np.mean(res)
  return start[0] - w, start[1] - b


def numpy_fedbuff(schedule):
  """FedBuff in float64: schedule[i] = the buffer of server step i + 1 as (site k, the server
  version v_k its job started from, its job index j_k); Delta = sum n_k s(v - v_k) Delta_k /
  sum n_k with s(tau) = 1 / sqrt(1 + tau), x <- x - Delta (server sgd, lr 1). Returns every
  version's parameters [(w, b)]."""
  xs = [(np.zeros(fp.D), 0.0)]
  for buf in schedule:
    v = len(xs) - 1
    num_w, num_b, den = np.zeros(fp.D), 0.0, 0.0
    for k, vk, j in buf:
      dw, db = hand_job(k, j, xs[vk])
      s = 1.0 / math.sqrt(1.0 + (v - vk))
      num_w, num_b, den = num_w + N[k] * s * dw, num_b + N[k] * s * db, den + N[k]
    xs.append((xs[-1][0] - num_w / den, xs[-1][1] - num_b / den))
  return xs


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def _close(got, ref, atol=1e-5):
  np.testing.assert_allclose(got["w"], ref[0], atol=atol, rtol=1e-5)
  np.testing.assert_allclose(got["b"], ref[1], atol=atol, rtol=1e-5)


def test_fedbuff_with_a_slow_site_equals_numpy(tmp_path):
  """S = 3, K = 2, site c slow: arrivals a b | a c | b a. By hand: step 1 buffers a, b (both
  from x_0, tau 0); they restart from x_1; step 2 buffers a (from x_1, its job 1) and c (from
  x_0, tau 1); step 3 buffers b (from x_1, job 1, tau 1) and a (from x_2, job 2, tau 0). Only
  the deliverers get the new version."""
  wd = tmp_path / "wd"
  rc = _rc(wd, 3, 2)
  grid = _ScriptedGrid(rc, order="a b a c b a".split())
  flower_async.serve_async(grid, rc)
  a, b, c = 0, 1, 2
  schedule = [[(a, 0, 0), (b, 0, 0)], [(a, 1, 1), (c, 0, 0)], [(b, 1, 1), (a, 2, 2)]]
  xs = numpy_fedbuff(schedule)
  step, got, _, meta = _final(wd, rc)
  assert step == 3 and meta["async"] == {"jobs": [3, 2, 1]}
  _close(got, xs[3])
  assert grid.pushed == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2), ("c", 2)]
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert [r["sites"] for r in rows] == [["a", "b"], ["a", "c"], ["b", "a"]]
  assert [r["staleness"] for r in rows] == [{"a": 0, "b": 0}, {"a": 0, "c": 1},
                                            {"b": 1, "a": 0}]
  assert rows[1]["versions"] == {"a": 1, "c": 0}
  # weights n_k s(tau_k) / sum n, by hand
  assert rows[0]["weights"] == pytest.approx({"a": 10 / 30, "b": 20 / 30}, rel=1e-6)
  assert rows[1]["weights"] == pytest.approx({"a": 10 / 40, "c": 30 / 40 / math.sqrt(2)},
                                             rel=1e-6)
  assert rows[2]["weights"] == pytest.approx({"b": 20 / 30 / math.sqrt(2), "a": 10 / 30},
                                             rel=1e-6)
  value_bytes = 4 * (fp.D + 1)
  for r in rows:
    assert r["applied"] == 1 and r["seconds"] >= 0
    assert r["bytes_up"] == {**{s: value_bytes for s in r["sites"]}, "total": 2 * value_bytes}
    assert {s: r["bytes_down"][s] for s in r["sites"]} == {s: value_bytes for s in r["sites"]}
  # messages sent since the previous step: 3 at the start, then the 2 deliverers each step
  assert [r["bytes_down"]["total"] for r in rows] == [3 * value_bytes, 2 * value_bytes,
                                                      2 * value_bytes]


@pytest.mark.parametrize("algo, compress", [("fedavg", ""), ("diloco", ""),
                                            ("fedavg", "topk:0.1+int8")])
def test_buffer_of_every_site_is_a_synchronous_round(tmp_path, algo, compress):
  """K = S: every site is in every buffer with tau = 0 and job index = version, so each server
  step is a synchronous Flower round (`flower.serve`): the same parameters and optimizer state
  after 3 steps, also with DiLoCo's per-site AdamW state (committed by the reply tokens) and a
  top-k codec's error-feedback residuals kept at the sites."""
  kw = {"algo": algo, **({"compress": compress} if compress else {})}
  rc = _rc(tmp_path / "async", 3, 3, **kw)
  flower_async.serve_async(_ScriptedGrid(rc), rc)
  sync = _run_config(tmp_path / "sync", 3, sites=",".join(SITES), **kw)
  flower.serve(_Grid(sync), sync)
  _, got, got_opt, _ = _final(tmp_path / "async", rc)
  _, ref, ref_opt, _ = _final(tmp_path / "sync", sync)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0)
  for x, y in zip(jax.tree.leaves(got_opt), jax.tree.leaves(ref_opt)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
  rows, sync_rows = _rows(tmp_path / "async"), _rows(tmp_path / "sync")
  for r, s in zip(rows, sync_rows):
    assert sorted(r["sites"]) == list(SITES) and set(r["staleness"].values()) == {0}
    assert r["weights"] == pytest.approx(s["weights"], rel=1e-6)
    assert r["bytes_up"] == s["bytes_up"]
  if algo == "fedavg" and not compress:
    ref64 = numpy_fedbuff([[(k, v, v) for k in range(3)] for v in range(3)])
    _close(got, ref64[3])


def test_config_rules_accept_async_on_flower_and_refuse_secagg_and_dp(tmp_path):
  """fed.mode = async with fed.backend = flower passes the config rules (the run then stops
  at the SuperLink connection, the next check); with SecAgg+, DP or the sites' held-out
  evaluation (fed.holdout > 0: it runs between synchronous rounds) it is one line, exit 2."""
  out = _cli(tmp_path, "--config.fed.mode=async", "--config.fed.buffer_size=2",
             "--config.fed.holdout=0")
  assert out.returncode == 2, out.stdout + out.stderr
  assert out.stderr.strip().startswith("jmtl: error: config key 'fed.flower.superlink'"), \
      out.stderr
  for extra in ("--config.fed.dp.clip_norm=1.0", "--config.fed.secure_aggregation=true",
                "--config.fed.holdout=0.1"):
    out = _cli(tmp_path, "--config.fed.mode=async", "--config.fed.holdout=0", extra)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("jmtl: error: config key 'fed.backend'"), lines
    assert "fed.mode = 'async'" in lines[0] and extra[9:].split("=")[0] in lines[0]
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("extra, says", [
    ({"aggregator": "median"}, "fed.aggregator"),
    ({"participation": 0.5}, "fed.participation"),
    ({"dp-clip": 1.0, "dp-z": 0.5}, "DP-FedAvg"),
    ({"secure-aggregation": True}, "secure-aggregation"),
    ({"buffer-size": 4}, "fed.buffer_size")])
def test_unsupported_async_problems_are_refused_in_one_line(tmp_path, extra, says):
  rc = {**_rc(tmp_path / "wd", 2, 2), **extra}
  with pytest.raises(ValueError) as e:
    flower_async.serve_async(_ScriptedGrid(rc), rc)
  assert len(str(e.value).splitlines()) == 1 and says in str(e.value)
  assert str(e.value).startswith("asynchronous FedBuff on Flower")
  if "secure-aggregation" in extra:  # the ServerApp sends such a run to serve_secagg
    import types
    with pytest.raises(ValueError, match="^asynchronous FedBuff on Flower.*secure-aggregation"):
      flower.serve_secagg(_ScriptedGrid(rc), types.SimpleNamespace(run_config=rc))
  assert not (tmp_path / "wd").exists()  # refused before anything was written


def test_async_refuses_a_problem_with_site_evaluation(tmp_path):
  """A Problem with the sites' held-out evaluation (`site_evaluate`, fed.holdout > 0) is
  refused in one line: its evaluate messages run between synchronous rounds only, and an
  asynchronous run would otherwise skip them without a word."""
  rc = _rc(tmp_path / "wd", 2, 2)
  problem = flower.load_problem(rc)
  problem.site_evaluate = lambda params, k, r: {}
  with pytest.raises(ValueError, match="^asynchronous FedBuff on Flower.*fed.holdout = 0"):
    flower_async.check_problem(problem, rc)


def test_a_site_that_never_replies_is_left_behind(tmp_path, capfd):
  """Site c never replies (K = 2 of 3): a and b fill every buffer, the run ends; c's job is
  dropped after round-timeout and sent again (it never answers)."""
  wd = tmp_path / "wd"
  rc = _rc(wd, 3, 2, **{"round-timeout": 0.2})
  grid = _ScriptedGrid(rc, order="a b".split() + ["a", "b"] * 2, lost={"c"})
  slow_pull = grid.pull_messages

  def pull(ids):  # each reply takes 0.1 s to arrive: c's job times out during the run
    time.sleep(0.1)
    return slow_pull(ids)
  grid.pull_messages = pull
  flower_async.serve_async(grid, rc)
  rows = _rows(wd)
  assert [r["sites"] for r in rows] == [["a", "b"]] * 3
  assert all(set(r["staleness"].values()) == {0} for r in rows)
  assert any(r.get("timed_out") == ["node 3"] for r in rows), rows
  assert sum(site == "c" for site, _ in grid.pushed) >= 2  # dropped and sent again
  assert "no reply within round-timeout 0.2 s from node 3" in capfd.readouterr().err
  xs = numpy_fedbuff([[(0, v, v), (1, v, v)] for v in range(3)])  # FedAvg of a and b
  _close(_final(wd, rc)[1], xs[3])


def test_run_stops_when_nobody_replies_and_resumes_from_its_checkpoint(tmp_path, capfd):
  """After step 1, b's jobs are lost and c never replies: a's reply waits alone in the buffer;
  after max-empty-rounds x round-timeout without a usable reply the server stops in one line
  (EmptyRoundsError), the checkpoint of version 1 and its line intact. Submitted again with
  every site back: it resumes from version 1 (the lost jobs said in `resumed_from`), every
  site restarts from x_1 with its checkpointed job index; the parameters equal numpy's."""
  wd = tmp_path / "wd"
  rc = _rc(wd, 3, 2, **{"round-timeout": 0.2, "max-empty-rounds": 2})
  with pytest.raises(flower.EmptyRoundsError):
    flower_async.serve_async(_ScriptedGrid(rc, lost={"c", ("b", 1)}), rc)
  err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("jmtl: error:")]
  assert len(err) == 1 and "max-empty-rounds 2" in err[0] and "version 1" in err[0], err
  assert "1 of fed.buffer_size 2 replies buffered" in err[0]  # a's reply, waiting for a second
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [1] and rows[0]["sites"] == ["a", "b"]
  assert _final(wd, rc)[0] == 1
  grid = _ScriptedGrid(rc)  # every site back; replies in push order
  flower_async.serve_async(grid, rc)
  assert "resumed at server version 1" in capfd.readouterr().err
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert rows[1]["resumed_from"] == 1 and "resumed_from" not in rows[2]
  # By hand: all three restart from x_1 with jobs a 1, b 1, c 0; a, b fill step 2; then c
  # (from x_1, tau 1) and a (from x_2, job 2) step 3.
  assert [r["sites"] for r in rows[1:]] == [["a", "b"], ["c", "a"]]
  schedule = [[(0, 0, 0), (1, 0, 0)], [(0, 1, 1), (1, 1, 1)], [(2, 1, 0), (0, 2, 2)]]
  _close(_final(wd, rc)[1], numpy_fedbuff(schedule)[3])


@pytest.mark.parametrize("change", [{"buffer-size": 1}, {"mode": "sync"}])
def test_resume_with_a_changed_buffer_or_mode_is_refused(tmp_path, change):
  """A run checkpointed with K = 2 (async) and submitted again with another K, or as a
  synchronous run, is refused by the checkpoint's fingerprint (one line naming the workdir)
  instead of mixing the two runs; nothing of the first run is changed."""
  wd = tmp_path / "wd"
  rc = _rc(wd, 1, 2)
  flower_async.serve_async(_ScriptedGrid(rc), rc)
  before = (wd / "rounds.jsonl").read_text()
  rc2 = {**rc, **change, "rounds": 2}
  with pytest.raises(ValueError) as e:
    flower.serve(_ScriptedGrid(rc2), rc2)
  key = next(iter(change))
  assert len(str(e.value).splitlines()) == 1, e.value
  assert "holds a checkpoint at round 1 of another run" in str(e.value) and key in str(e.value)
  assert (wd / "rounds.jsonl").read_text() == before


# ---------------------------------------------------------------- a real jmtl config

@pytest.mark.slow
@pytest.mark.long  # 131 s on the 2-core host (a simulation subprocess beside the server)
def test_jmtl_config_async_on_flower_equals_jmtl_federated_async(tmp_path, data_dir):
  """A real jmtl config (`tiny_fed_flower.py`: BBC topic, a transformer, DiLoCo, 2 equal
  sites) with fed.mode = async and K = 1 through the asynchronous Flower server (in-process
  stand-in Grid, the Problem of `flower.jmtl_problem` as every SuperNode builds it) against
  `jmtl federated`'s event-driven simulation of the same config. With equal job times the
  simulation's deliveries are a (tau 0), b (tau 1), a (tau 1) (its docstring's queue: ties by
  site); the Grid delivers in that order. Dropout off: the simulation keys a job by the server
  version at delivery, Flower by the site's job index. Every step's sites, staleness, site
  losses (each at the parameters the site started from: x_0, x_0, x_1), weights and per-site
  bytes agree, and the last step's evaluation (of x_3) equals the simulation's eval.json."""
  import os
  import subprocess
  import sys
  from test_flower_parts import CONFIG, ROOT
  spec = ["--config.fed.rounds=3", "--config.fed.mode=async", "--config.fed.buffer_size=1",
          "--config.fed.holdout=0",  # the sites' held-out evaluation: sync rounds only
          "--config.model.dropout=0", "--config.model.attention_dropout=0"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sim_wd = tmp_path / "sim"
  sim = subprocess.Popen([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                          "--workdir", str(sim_wd), *spec], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    wd = tmp_path / "flower"
    rc = {"problem": "jmtl.federated.flower:jmtl_problem", "config": CONFIG,
          "overrides": " ".join(spec), "workdir": str(wd), "rounds": 3,
          "round-timeout": 120.0, "wait-sites": 0.0}
    flower.serve(_ScriptedGrid(rc, order=["a", "b", "a"]), rc)  # dispatches on fed.mode
    log, _ = sim.communicate(timeout=200)
  finally:
    sim.kill()
  assert sim.returncode == 0, log
  rows = _rows(wd)
  ref = _rows(sim_wd)
  assert [r["round"] for r in rows] == [r["round"] for r in ref] == [1, 2, 3]
  assert [r["sites"] for r in ref] == [["a"], ["b"], ["a"]]
  assert [r["staleness"] for r in ref] == [{"a": 0}, {"b": 1}, {"a": 1}]
  for got, want in zip(rows, ref):
    assert got["sites"] == want["sites"] and got["staleness"] == want["staleness"]
    assert got["site_loss"] == pytest.approx(want["site_loss"], rel=1e-5, abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["weights"] == pytest.approx(want["weights"], abs=1e-6)
    assert got["bytes_up"] == want["bytes_up"]
    assert {s: got["bytes_down"][s] for s in got["sites"]} == {
        s: want["bytes_down"][s] for s in want["sites"]}
  assert rows[1]["weights"]["b"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)  # n_b s(1) / n_b
  sim_eval = json.loads((sim_wd / "eval.json").read_text())
  metrics = {k: v for k, v in sim_eval.items() if k.startswith("bbc_topic/")}
  evaluated = json.loads((wd / "eval.json").read_text())
  assert metrics and evaluated["step"] == 3
  assert {k: evaluated[k] for k in metrics} == pytest.approx(metrics, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- a real TLS cluster

@pytest.mark.slow
@pytest.mark.long
def test_async_on_a_tls_cluster_of_three_supernodes(tmp_path):
  """3 SuperNodes, K = 2, 3 server steps on a real local Flower deployment over TLS: the run
  succeeds, rounds.jsonl has one well-formed row per step, the checkpoint of the last version
  is written, and the server parameters equal numpy FedBuff of the schedule the rows report
  (the network's arrival order: which sites and versions each buffer held)."""
  import flower_cluster as fc
  cluster = fc.Cluster(tmp_path / "cluster", list(SITES))
  toml = fc.APP_TOML.replace('sites = "a,b"', 'sites = "a,b,c"')
  assert toml != fc.APP_TOML
  toml = toml.replace("[tool.flwr.app.config]\n",
                      '[tool.flwr.app.config]\nmode = "async"\nbuffer-size = 2\n')
  assert 'mode = "async"' in toml
  (cluster.app / "pyproject.toml").write_text(toml)
  cluster.start()
  try:
    wd = tmp_path / "wd"
    out = cluster.run(wd, rounds=3, **{"local-steps": STEPS})
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
    deadline = time.time() + 150
    while time.time() < deadline and not (
        (wd / "rounds.jsonl").exists() and len(_rows(wd)) >= 3
        and (wd / "checkpoints" / "3").exists()):
      time.sleep(0.2)
    assert (wd / "rounds.jsonl").exists() and len(_rows(wd)) == 3, cluster.logs()
  finally:
    cluster.stop()
  rows = _rows(wd)
  jobs, schedule = [0, 0, 0], []
  for i, r in enumerate(rows):
    assert r["round"] == i + 1 and r["applied"] == 1 and len(r["sites"]) == 2
    assert set(r["staleness"]) == set(r["sites"]) == set(r["versions"])
    for s in r["sites"]:
      assert r["staleness"][s] == i - r["versions"][s] >= 0
      assert r["weights"][s] == pytest.approx(
          N[SITES.index(s)] / math.sqrt(1 + r["staleness"][s])
          / sum(N[SITES.index(t)] for t in r["sites"]), rel=1e-5)
      assert r["bytes_up"][s] == 4 * (fp.D + 1)
    assert r["seconds"] > 0 and r["bytes_down"]["total"] >= 2 * 4 * (fp.D + 1)
    buf = []
    for s in r["sites"]:
      k = SITES.index(s)
      buf.append((k, r["versions"][s], jobs[k]))
    for k, _, _ in buf:
      jobs[k] += 1
    schedule.append(buf)
  rc = _rc(wd, 3, 2)
  step, got, _, meta = _final(wd, rc)
  assert step == 3 and meta["async"] == {"jobs": jobs}
  assert (wd / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists()
  _close(got, numpy_fedbuff(schedule)[3])
