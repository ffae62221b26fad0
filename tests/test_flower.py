"""jmtl rounds across real processes on Flower's deployment engine, against the mesh simulation.

A SuperLink and one SuperNode per site run on localhost as subprocesses (free ports, TLS with a
CA generated here); `flwr run` submits the app whose ServerApp / ClientApp are
`jmtl.federated.flower`'s. The server parameters after 3 rounds must equal the single-mesh
simulation's (`algorithm.make_round` over a 2-site mesh, same per-site function, same data) and
an independent float64 numpy FedAvg; the measured payload bytes must equal the simulation's
accounting (4 bytes per float32 value each way, `compression.leaf_bytes` with no codec; with
fed.compress the bytes of each site's encoding).

One SuperLink + 2 SuperNodes (the module's `cluster`) serve every 2-site test in turn, so the
processes start once; the test that kills a SuperNode comes last of those. The SecAgg+ test
needs 3 sites and starts its own.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

flwr = pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from flower_cluster import ROOT, Cluster, kill_serverapp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from jmtl.federated import algorithm  # noqa: E402
from jmtl.federated import compression  # noqa: E402
from jmtl.federated import flower  # noqa: E402

pytestmark = pytest.mark.slow
SITES = ["a", "b"]
ROUNDS, STEPS = 3, 2


def _wait_rounds(cluster, path, n, timeout=120.0, on_line=None):
  """The rows of rounds.jsonl once it has n lines; fails with the processes' logs otherwise."""
  deadline, seen = time.time() + timeout, 0
  while time.time() < deadline:
    lines = path.read_text().splitlines() if path.exists() else []
    if on_line is not None and len(lines) > seen:
      seen = len(lines)
      on_line(seen)
    if len(lines) >= n:
      return [json.loads(x) for x in lines]
    time.sleep(0.1)
  pytest.fail(f"{path} has {len(lines)} of {n} rounds after {timeout} s\n{cluster.logs()}")


def _simulate(algo, masks, codec=None):
  """The same rounds on one 2-site mesh (`algorithm.make_round`); masks[r] = participants;
  `codec`: fed.compress's Codec (None = off)."""
  mesh = jax.make_mesh((2,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  client_tx, server_tx = fp.optimizers(algo, len(masks), STEPS)
  server, clients = algorithm.init(
      {"w": np.zeros(fp.D, np.float32), "b": np.zeros((), np.float32)}, server_tx, client_tx,
      mesh, error_feedback=codec is not None and codec.error_feedback)
  round_fn = algorithm.make_round(fp.loss_fn, client_tx, server_tx, mesh, local_steps=STEPS,
                                  codec=codec)
  for r in range(len(masks)):
    per_site = [fp.site_batches(0, k, r, STEPS) for k in range(2)]
    batches = jax.tree.map(lambda *x: np.stack(x), *[b for b, _ in per_site])
    examples = np.array([n for _, n in per_site], np.float32)
    server, clients, _ = round_fn(server, clients, batches, examples, masks[r])
  return jax.device_get(server.params)


def _numpy_fedavg(masks, lr=0.2):
  """FedAvg in float64 numpy: local SGD on the least-squares loss, example-weighted mean of
  x - x_k over the participants, x <- x - Delta (server sgd 1.0)."""
  w, b = np.zeros(fp.D), 0.0
  for r in range(len(masks)):
    num_w, num_b, den = np.zeros(fp.D), 0.0, 0.0
    for k in range(len(masks[r])):
      if not masks[r][k]:
        continue
      data, n = fp.site_batches(0, k, r, STEPS)
      qw, qb = w.copy(), b
      for t in range(STEPS):
        x, y = data["x"][t].astype(np.float64), data["y"][t].astype(np.float64)
        res = x @ qw + qb - y
        qw, qb = qw - lr * x.T @ res / len(y), qb - lr * np.mean(res)
      num_w, num_b, den = num_w + n * (w - qw), num_b + n * (b - qb), den + n
    w, b = w - num_w / den, b - num_b / den
  return {"w": w, "b": b}


def _server_params(workdir, r, algo="fedavg", rounds=ROUNDS):
  """The server parameters of the checkpoint at round r (jmtl's Orbax `Checkpointer`)."""
  problem = fp.make({"local-steps": STEPS, "rounds": rounds, "algo": algo, "sites": "a,b"})
  step, params, _, _ = flower.load_checkpoint(str(workdir), problem.params,
                                              problem.server_tx.init(problem.params), step=r)
  assert step == r
  return params


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  c = Cluster(tmp_path_factory.mktemp("flower"), SITES).start()
  yield c
  c.stop()


def _run(cluster, tmp_path, algo, **extra):
  wd = tmp_path / f"wd_{algo}"
  out = cluster.run(wd, algo=algo, rounds=ROUNDS, **{"local-steps": STEPS}, **extra)
  assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
  return wd, _wait_rounds(cluster, wd / "rounds.jsonl", ROUNDS)


# "topk:0.1+int8": each site's payload is `compression.to_bytes` of its top-k + int8 encoding
# (by hand: per leaf 1 index byte + 1 int8 value + a float32 scale = 6 bytes, 2 leaves), its
# error-feedback residual kept in its SuperNode's Context.state across the 3 rounds (each
# round's ClientApp is a fresh process).
@pytest.mark.parametrize("compress, up", [
    ("", 4 * (fp.D + 1)),
    # Compression's equality is also checked in-process (test_flower_parts); this case shows the
    # top-k residual surviving in Context.state across the per-message ClientApp processes.
    pytest.param("topk:0.1+int8", 12, marks=pytest.mark.long)])
def test_fedavg_on_flower_equals_the_mesh_simulation_and_numpy(cluster, tmp_path, compress, up):
  wd, rows = _run(cluster, tmp_path, "fedavg", compress=compress)
  got = _server_params(wd, ROUNDS)
  ones = [np.ones(2, np.float32)] * ROUNDS
  codec = compression.parse(compress)
  sim = _simulate("fedavg", ones, codec=codec if codec.enabled else None)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], atol=1e-5, rtol=1e-5)
  if not compress:
    ref = _numpy_fedavg(ones)
    for k in ("w", "b"):
      np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5)
  assert abs(float(got["w"].sum())) > 0.1  # it moved
  values = fp.D + 1
  accounted = sum(compression.leaf_bytes(codec, n) for n in (fp.D, 1))
  assert accounted == up
  for row in rows:
    assert row["sites"] == SITES and row["applied"] == 1 and row["dropped"] == []
    assert row["bytes_up"] == {"a": accounted, "b": accounted, "total": 2 * accounted}
    assert row["bytes_down"] == {"a": 4 * values, "b": 4 * values, "total": 8 * values}
    assert row["weights"] == pytest.approx({"a": 10 / 30, "b": 20 / 30})
    assert row["seconds"] > 0 and all(v > 0 for v in row["site_seconds"].values())
  assert [r["round"] for r in rows] == [1, 2, 3]
  config = json.loads((wd / "flower.json").read_text())
  assert config["sites"] == SITES and config["run_config"]["algo"] == "fedavg"


@pytest.mark.long
def test_diloco_keeps_each_sites_adamw_state_and_equals_the_simulation(cluster, tmp_path):
  wd, rows = _run(cluster, tmp_path, "diloco")
  got = _server_params(wd, ROUNDS, "diloco")
  sim = _simulate("diloco", [np.ones(2, np.float32)] * ROUNDS)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], atol=1e-5, rtol=1e-5)
  # Restarting each site's AdamW every round gives other numbers: the state was kept.
  cold = _simulate_reset()
  assert not np.allclose(got["w"], cold["w"], atol=1e-4)
  assert all(r["applied"] == 1 for r in rows)


def _simulate_reset():
  mesh = jax.make_mesh((2,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  client_tx, server_tx = fp.optimizers("diloco", ROUNDS, STEPS)
  server, clients = algorithm.init(
      {"w": np.zeros(fp.D, np.float32), "b": np.zeros((), np.float32)}, server_tx, client_tx,
      mesh)
  round_fn = algorithm.make_round(fp.loss_fn, client_tx, server_tx, mesh, local_steps=STEPS,
                                  reset_client_state=True)
  for r in range(ROUNDS):
    per_site = [fp.site_batches(0, k, r, STEPS) for k in range(2)]
    batches = jax.tree.map(lambda *x: np.stack(x), *[b for b, _ in per_site])
    examples = np.array([n for _, n in per_site], np.float32)
    server, clients, _ = round_fn(server, clients, batches, examples, np.ones(2, np.float32))
  return jax.device_get(server.params)


def test_jmtl_config_on_flower_matches_jmtl_federated(cluster, data_dir, tmp_path):
  """`jmtl federated` on a real jmtl config (BBC topic, a transformer, DiLoCo) against the local
  SuperLink + 2 SuperNodes: each round's site losses (the loss at the server parameters of that
  round, so they check the parameters of rounds 0..R-1), the bytes and the final evaluation
  (eval.json, the server's `_run_eval` call) equal `jmtl federated`'s mesh simulation of the
  same config; `jmtl eval` on the Flower workdir reads its checkpoint and gives eval.json's
  numbers again. Two rounds; the per-site state kept across rounds is checked by the DiLoCo
  test above."""
  config = str(ROOT / "tests" / "configs" / "tiny_fed_flower.py")
  sim_wd = tmp_path / "sim"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sim = subprocess.Popen([sys.executable, "-m", "jmtl.cli", "federated", "--config", config,
                          "--workdir", str(sim_wd), "--config.fed.rounds=2"], env=env,
                         stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  flower_args = ["--config", config, "--config.fed.rounds=2", "--config.fed.backend=flower"]
  flower_env = dict(cluster.env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  try:
    wd = tmp_path / "flower"
    # The user's command: jmtl federated with fed.backend = flower submits the run through
    # `flwr run` to the SuperLink connection "local" and follows rounds.jsonl.
    out = subprocess.run(
        [sys.executable, "-m", "jmtl.cli", "federated", *flower_args, "--workdir", str(wd),
         "--config.fed.flower.superlink=local", "--config.fed.flower.wait_s=150",
         "--config.fed.flower.round_timeout=120"],
        env=flower_env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stdout + out.stderr + cluster.logs()
    assert "submitted Flower run" in out.stdout and "round 2: loss" in out.stdout, out.stdout
    rows = _wait_rounds(cluster, wd / "rounds.jsonl", 2, timeout=10)
    evaluated = _wait_file(cluster, wd / "eval.json")
    # `jmtl eval` on the Flower workdir (the server state of its last checkpoint), run beside
    # the simulation when that is still running.
    again = subprocess.Popen([sys.executable, "-m", "jmtl.cli", "eval", *flower_args,
                              "--workdir", str(wd)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  except BaseException:
    sim.kill()
    raise
  try:
    log, _ = sim.communicate(timeout=150)
    shown, err = again.communicate(timeout=150)
  finally:
    sim.kill()
    again.kill()
  assert sim.returncode == 0, log
  ref = [json.loads(x) for x in (sim_wd / "rounds.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [r["round"] for r in ref] == [1, 2]
  for got, want in zip(rows, ref):
    assert got["sites"] == want["sites"]
    assert got["site_loss"] == pytest.approx(want["site_loss"], rel=1e-5, abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["weights"] == pytest.approx(want["weights"], abs=1e-6)
    assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
  assert rows[-1]["loss"] < rows[0]["loss"]
  # The server's evaluation of round 2 equals the simulation's (global metrics; the per-site
  # held-out ones computed at the sites, `flower.site_evaluate`: the server reads no site's
  # data).
  sim_eval = json.loads((sim_wd / "eval.json").read_text())
  metrics = {k: v for k, v in sim_eval.items() if k.startswith("bbc_topic/")}
  assert metrics and evaluated["step"] == 2 and evaluated["split"] == sim_eval["split"]
  assert {k: evaluated[k] for k in metrics} == pytest.approx(metrics, rel=1e-4, abs=1e-6)
  site = {k: v for k, v in sim_eval.items() if k.startswith("site/")}
  assert site and {k: evaluated.get(k) for k in site} == pytest.approx(site, rel=1e-4, abs=1e-6)
  assert {k: rows[-1][k] for k in metrics} == pytest.approx(metrics, rel=1e-4, abs=1e-6)
  # `jmtl eval` on the Flower workdir gives the server's eval.json numbers again.
  assert again.returncode == 0, shown + err
  shown = json.loads(shown[shown.index("{"):])
  assert shown["step"] == 2
  assert {k: shown[k] for k in metrics} == pytest.approx(
      {k: evaluated[k] for k in metrics}, rel=1e-5, abs=1e-6)


def _wait_file(cluster, path, timeout=60.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists():
      return json.loads(path.read_text())
    time.sleep(0.1)
  pytest.fail(f"no {path} after {timeout} s\n{cluster.logs()}")


@pytest.mark.long
def test_killed_server_resumes_from_its_checkpoint(cluster, tmp_path):
  """The server process (the SuperLink's `flwr-serverapp`) SIGKILLed after round 2 of 4, the run
  submitted again on the same workdir: the new server resumes from the round-2 checkpoint, each
  round is in rounds.jsonl once, and the final server parameters equal an uninterrupted run's
  (the mesh simulation of 4 FedAvg rounds, <= 1e-6; FedAvg's sites keep no state)."""
  wd = tmp_path / "wd"
  run = dict(algo="fedavg", rounds=4, **{"local-steps": STEPS})
  out = cluster.run(wd, **run)
  assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
  killed = []

  def kill_after_second(n):
    if n == 2 and not killed:
      killed.append(kill_serverapp(cluster))
  _wait_rounds(cluster, wd / "rounds.jsonl", 2, on_line=kill_after_second)
  assert killed
  time.sleep(1.0)
  lines = (wd / "rounds.jsonl").read_text().splitlines()
  assert len(lines) == 2, lines  # the server is dead: no round 3
  out = cluster.run(wd, **run)
  assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
  rows = _wait_rounds(cluster, wd / "rounds.jsonl", 4)
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(r["sites"] == SITES and r["applied"] == 1 for r in rows)
  got = _server_params(wd, 4, rounds=4)
  sim = _simulate("fedavg", [np.ones(2, np.float32)] * 4)
  ref = _numpy_fedavg([np.ones(2, np.float32)] * 4)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5)


def test_killed_supernode_round_completes_with_the_rest(cluster, tmp_path):
  """Kills SuperNode b of the module's cluster (so this test comes last of those using it)."""
  wd = tmp_path / "wd"
  out = cluster.run(wd, algo="fedavg", rounds=ROUNDS, **{"local-steps": STEPS,
                                                         "round-timeout": 15.0})
  assert out.returncode == 0, out.stdout + out.stderr

  def kill_after_first(n):
    if n == 1:
      cluster.kill("supernode_b")
  rows = _wait_rounds(cluster, wd / "rounds.jsonl", ROUNDS, timeout=150,
                      on_line=kill_after_first)
  assert rows[0]["sites"] == SITES
  for row in rows[1:]:
    assert row["sites"] == ["a"] and row["dropped"] == ["b"] and row["applied"] == 1
    assert row["weights"] == pytest.approx({"a": 1.0})  # renormalised over the rest
    assert row["bytes_up"]["total"] == row["bytes_up"]["a"]
  masks = [np.ones(2, np.float32)] + [np.array([1, 0], np.float32)] * (ROUNDS - 1)
  got = _server_params(wd, ROUNDS)
  sim, ref = _simulate("fedavg", masks), _numpy_fedavg(masks)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5)
  # Nothing in the workdir is torn: every line parses, the checkpoints are complete Orbax
  # steps (keep 1: the last), no temporary leftovers.
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [str(ROUNDS)]
  assert (wd / "checkpoints" / str(ROUNDS) / "_CHECKPOINT_METADATA").exists()


def _secagg_rounds(tmp_path, sites, lines, settle_s=0.0, **config):
  """A 2-round FedAvg run through Flower's SecAgg+ on its own cluster of `sites` (workdir
  tmp_path / "wd"): waits for `lines` lines of rounds.jsonl, then `settle_s` seconds (time for
  a further round to show, when the test expects none), and returns every line written."""
  c = Cluster(tmp_path / "cluster", sites).start()
  try:
    wd = tmp_path / "wd"
    out = c.run(wd, secagg=True, algo="fedavg", rounds=2, sites=",".join(sites),
                **{"local-steps": STEPS, **config})
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
    rows = _wait_rounds(c, wd / "rounds.jsonl", lines, timeout=150)
    if settle_s:
      time.sleep(settle_s)
      rows = [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]
    return rows
  finally:
    c.stop()


def test_secagg_plus_equals_the_plain_run_within_the_quantisation_step(tmp_path):
  """The one Flower app with the run config's `secure-aggregation` on (what `jmtl federated`
  sets from fed.secure_aggregation: tests/test_flower_secagg.py) runs Flower's SecAgg+ (masked,
  quantised: clipping range 8, 2**22 levels; it needs >= 3 sites) over 2 FedAvg rounds (each
  round is 4 message stages, each a fresh ClientApp process); the same cluster then runs the
  plain rounds. The secure run's server parameters equal the plain run's up to quantisation,
  and the plain run's equal float64 numpy FedAvg's (the plain weighted sum)."""
  sites = ["a", "b", "c"]
  c = Cluster(tmp_path / "cluster", sites).start()
  try:
    rows = {}
    for name, secagg in (("secagg", True), ("plain", False)):
      out = c.run(tmp_path / name, secagg=secagg, algo="fedavg", rounds=2,
                  sites=",".join(sites), **{"local-steps": STEPS})
      assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
      rows[name] = _wait_rounds(c, tmp_path / name / "rounds.jsonl", 2, timeout=150)
  finally:
    c.stop()
  assert [r["sites"] for r in rows["secagg"]] == [sites] * 2
  assert all(r["secure_aggregation"] == "secagg+" and r["failures"] == 0 and r["applied"] == 1
             and r["max_weight"] == 1000.0 for r in rows["secagg"])
  assert [r["sites"] for r in rows["plain"]] == [sites] * 2
  assert all("secure_aggregation" not in r and r["bytes_up"]["total"] == 3 * 4 * (fp.D + 1)
             for r in rows["plain"])
  got, plain = _server_params(tmp_path / "secagg", 2, rounds=2), _server_params(
      tmp_path / "plain", 2, rounds=2)
  ref = _numpy_fedavg([np.ones(3, np.float32)] * 2)
  for k in ("w", "b"):
    np.testing.assert_allclose(plain[k], ref[k], rtol=1e-5, atol=1e-6)
  # Quantisation step: a site sends n_k / max_weight x delta_k (max_weight 1000) on a grid of
  # 2 x 8 / 2**22 = 3.8e-6 (stochastic rounding: < one step); divided by sum_k n_k /
  # max_weight = 0.06 that is <= 6.4e-5 per site, <= 1.9e-4 per round for 3 sites; the second
  # round starts from the first's parameters (local SGD at lr 0.2 on this least-squares loss
  # does not amplify it by more than 2): < 6e-4 over 2 rounds.
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], plain[k], rtol=0, atol=6e-4)
  assert np.abs(got["w"]).sum() > 0.1


@pytest.mark.long
def test_secagg_plus_stops_a_round_whose_sites_the_mod_would_clip(tmp_path):
  """secagg-max-weight 1e-3: every site's n_k / max_weight x delta_k is far above Flower's
  clipping range 8, which Flower's mod would clip with only a warning (a wrong mean). The sites
  refuse (`flower.secagg_check`), the server writes round 1 as not applied with the sites'
  error, saves no checkpoint and ends the run (no round 2)."""
  wd = tmp_path / "wd"
  rows = _secagg_rounds(tmp_path, ["a", "b", "c"], 1, settle_s=3.0,
                        **{"secagg-max-weight": 1e-3})
  assert len(rows) == 1, rows
  row = rows[0]
  assert row["round"] == 1 and row["applied"] == 0 and row["sites"] == []
  assert row["max_weight"] == 1e-3 and row["failures"] >= 1
  assert flower.SECAGG_REFUSAL in row["error"] and "raise the run config key" in row["error"]
  assert "secagg-max-weight to >=" in row["error"]
  assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


@pytest.mark.long
def test_jmtl_federated_with_secure_aggregation_equals_the_plain_flower_run(data_dir, tmp_path):
  """The user's command on a real jmtl config: `jmtl federated --config.fed.backend=flower` on
  tests/configs/tiny_fed_flower_secagg.py (BBC topic, a transformer, DiLoCo, 3 sites,
  fed.secure_aggregation on) against a local SuperLink + 3 SuperNodes (TLS), then the same
  command with fed.secure_aggregation off: the server parameters after the round agree
  within the fixed-point step. Bound: SecAgg+ sends n_k / max_weight x delta_k (max_weight
  1000, n_k ~ 36 examples a site) on a grid of 2 c / Q (c = fed.secagg.clipping_range 1, Q =
  2**22), divided by sum_k n_k / max_weight ~ 0.108: <= 3 x 4.8e-7 / 0.108 = 1.3e-5 per
  coordinate of the round's mean delta; the server's first Nesterov step (lr 0.7, momentum
  0.9) scales it by 0.7 x 1.9 = 1.33: atol 2e-5 (rounds past the first are left out: the
  sites' AdamW, m / sqrt(v) on coordinates with tiny gradients, amplifies a 1e-5 difference in
  the parameters it starts from well past the quantisation step: 1.6e-4 seen after 2 rounds).
  """
  config = str(ROOT / "tests" / "configs" / "tiny_fed_flower_secagg.py")
  c = Cluster(tmp_path / "cluster", ["a", "b", "c"]).start()
  env = dict(c.env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  try:
    for name, extra in (("secagg", []), ("plain", ["--config.fed.secure_aggregation=False"])):
      out = subprocess.run(
          [sys.executable, "-m", "jmtl.cli", "federated", "--config", config,
           "--config.fed.backend=flower", *extra, "--workdir", str(tmp_path / name),
           "--config.fed.flower.superlink=local", "--config.fed.flower.wait_s=500",
           "--config.fed.flower.round_timeout=300"],
          env=env, capture_output=True, text=True, timeout=560)
      assert out.returncode == 0, out.stdout + out.stderr + c.logs()
      assert "round 1:" in out.stdout, out.stdout
  finally:
    c.stop()
  rows = {n: [json.loads(x) for x in (tmp_path / n / "rounds.jsonl").read_text().splitlines()]
          for n in ("secagg", "plain")}
  assert [r.get("secure_aggregation") for r in rows["secagg"]] == ["secagg+"]
  assert all(r["applied"] == 1 and r["sites"] == ["a", "b", "c"] for r in rows["secagg"])
  assert all("secure_aggregation" not in r for r in rows["plain"])
  problem = flower.jmtl_problem({"config": config, "overrides": "--config.fed.backend=flower"})
  opt = problem.server_tx.init(problem.params)
  got = flower.load_checkpoint(str(tmp_path / "secagg"), problem.params, opt)
  ref = flower.load_checkpoint(str(tmp_path / "plain"), problem.params, opt)
  assert got[0] == ref[0] == 1
  moved = 0.0
  for a, b, x0 in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]),
                      jax.tree.leaves(problem.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(x0)))))
  assert moved > 1e-3  # the round moved the parameters far more than the tolerance
  assert (tmp_path / "secagg" / "eval.json").exists()
