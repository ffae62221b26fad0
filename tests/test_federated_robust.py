"""Byzantine-robust aggregation (`jmtl.federated.robust`) and simulated faults
(`jmtl.federated.faults`) against numpy references: np.median, scipy's trimmed mean, a hand-worked
and a brute-force Multi-Krum, rounds with masks and task heads, corrupted deltas, dropout, and a
Byzantine site that breaks FedAvg but not the robust rules."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from scipy import stats

from faults import cli_in_process  # tests/faults.py (not jmtl.federated.faults)
from jmtl import federated as fed
from jmtl.federated import faults, robust

D = 4


def _mesh(n):
  return jax.make_mesh((n,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


MASKS = [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0],
         [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1]]


@pytest.mark.parametrize("mask", MASKS)
def test_coordinate_median_and_trimmed_mean_equal_numpy_and_scipy_over_valid_rows(mask):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3, 2)).astype(np.float32)
  x[2] += 50.0  # an outlier row
  valid = np.array(mask, bool)
  med = np.asarray(robust.coordinate_median(jnp.asarray(x), jnp.asarray(valid)))
  want = np.median(x[valid], axis=0) if valid.any() else np.zeros((3, 2))
  np.testing.assert_allclose(med, want, rtol=1e-6, atol=1e-6)
  for beta in (0.0, 0.2, 0.34, 0.49):
    got = np.asarray(robust.trimmed_mean(jnp.asarray(x), jnp.asarray(valid), beta))
    want = (stats.trim_mean(x[valid].astype(np.float64), beta, axis=0) if valid.any()
            else np.zeros((3, 2)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trimmed_mean_hand_worked():
  # 5 values, beta 0.2: b = floor(1.0) = 1: drop -100 and 40, mean of 1, 2, 3 = 2.
  x = jnp.array([[3.0], [-100.0], [1.0], [40.0], [2.0]])
  assert float(robust.trimmed_mean(x, jnp.ones(5, bool), 0.2)[0]) == pytest.approx(2.0)
  # beta 0.19: b = floor(0.95) = 0: the plain mean.
  assert float(robust.trimmed_mean(x, jnp.ones(5, bool), 0.19)[0]) == pytest.approx(-54 / 5)


def test_multi_krum_hand_worked():
  # Scalar deltas 0, 1, 2, 3, 100; f = 1, n = 5: q = n - f - 2 = 2 nearest.
  # scores: 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 1 = 2; 3: 1 + 4 = 5; 4: 97^2 + 98^2.
  d = {"w": jnp.array([[0.0], [1.0], [2.0], [3.0], [100.0]])}
  groups = {"w": 0}
  holds = jnp.ones((5, 1))
  agg, w = robust.aggregate(d, groups, jnp.ones(5), holds, "krum", byzantine_f=1, krum_m=1)
  assert float(agg["w"][0]) == 1.0  # Krum: the tie 1 / 2 goes to the lower index
  np.testing.assert_array_equal(np.asarray(w), [0, 1, 0, 0, 0])
  agg, w = robust.aggregate(d, groups, jnp.ones(5), holds, "krum", byzantine_f=1)
  assert float(agg["w"][0]) == pytest.approx(1.5)  # m = n - f = 4: sites 0..3
  np.testing.assert_allclose(np.asarray(w), [0.25, 0.25, 0.25, 0.25, 0])
  # Site 1 out: n = 4, q = 1: scores 0: 4, 2: 1, 3: 1, 4: 97^2; m = 3: sites 2, 3, 0.
  mask = jnp.array([1.0, 0, 1, 1, 1])
  agg, w = robust.aggregate(d, groups, mask, holds, "krum", byzantine_f=1)
  assert float(agg["w"][0]) == pytest.approx(5 / 3)
  np.testing.assert_allclose(np.asarray(w), [1 / 3, 0, 1 / 3, 1 / 3, 0], rtol=1e-6)


def _np_krum(deltas, valid, f, m):
  """Brute force: scores from every pair, then the m lowest (stable)."""
  idx = [k for k in range(len(deltas)) if valid[k]]
  n = len(idx)
  q = max(n - f - 2, min(1, n - 1))
  scores = {}
  for k in idx:
    d = sorted(float(np.sum((deltas[k] - deltas[j]) ** 2)) for j in idx if j != k)
    scores[k] = sum(d[:q])
  mm = m or n - f
  mm = min(max(mm, 1), max(n, 1))
  return sorted(idx, key=lambda k: (scores[k], k))[:mm]


@pytest.mark.parametrize("f,m", [(0, 0), (1, 0), (1, 1), (2, 3)])
def test_multi_krum_equals_brute_force_numpy(f, m):
  rng = np.random.default_rng(f * 10 + m)
  x = rng.normal(size=(6, 7)).astype(np.float32)
  x[4] *= 8.0
  for mask in MASKS[:4]:
    valid = np.array(mask, bool)
    sel = np.asarray(robust.krum_select(robust.pairwise_sq_dists({"w": jnp.asarray(x)}, {"w": 0}),
                                        jnp.asarray(valid), f, m))
    want = np.zeros(6)
    want[_np_krum(x.astype(np.float64), valid, f, m)] = 1
    np.testing.assert_array_equal(sel, want)


# ---------------------------------------------------------------- rounds with masks and heads
S = 4
HOLDS = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)  # [S, G]: t1, t2
GROUPS = {"trunk": {"w": 0}, "heads": {"t1": {"b": 1}, "t2": {"b": 2}}}


def _data(seed, steps, sites=S, rows=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(sites, steps, rows, D)).astype(np.float32)
  y = (x @ rng.normal(size=D) + 0.3 * rng.normal(size=(sites, steps, rows))).astype(np.float32)
  y += np.arange(sites, dtype=np.float32)[:, None, None]  # sites disagree: heads differ
  tw = np.broadcast_to(HOLDS[:sites, None, 1:], (sites, steps, 2)).astype(np.float32)
  return {"x": x, "y": y, "tw": tw}


def _loss(p, b, key=None):
  z = b["x"] @ p["trunk"]["w"]
  l1 = 0.5 * jnp.mean(jnp.square(z + p["heads"]["t1"]["b"] - b["y"])) * b["tw"][0]
  l2 = 0.5 * jnp.mean(jnp.square(z - p["heads"]["t2"]["b"] - b["y"])) * b["tw"][1]
  return l1 + l2


def _np_deltas(ref, data, lr):
  """Each site's Delta_k = x - x_k after local SGD on _loss (float64)."""
  out = []
  for k in range(S):
    q = dict(ref)
    for t in range(data["x"].shape[1]):
      x, y, tw = data["x"][k, t].astype(np.float64), data["y"][k, t], HOLDS[k, 1:]
      z = x @ q["w"]
      r1, r2 = (z + q["b1"] - y) * tw[0], (z - q["b2"] - y) * tw[1]
      g = {"w": x.T @ (r1 + r2) / len(y), "b1": np.mean(r1), "b2": -np.mean(r2)}
      q = {j: q[j] - lr * g[j] for j in q}
    out.append({j: ref[j] - q[j] for j in ref})
  return out


def _np_robust(deltas, mask, rule, trim=0.25, f=1, m=0):
  out = {}
  part = np.asarray(mask) > 0
  if rule == "krum":
    trunk = [d["w"] for d in deltas]
    sel = _np_krum(trunk, part, f, m)
  for j, g in (("w", 0), ("b1", 1), ("b2", 2)):
    valid = part & (HOLDS[:, g] > 0)
    vals = np.array([deltas[k][j] for k in range(S)], np.float64)
    if rule == "krum":
      who = [k for k in sel if HOLDS[k, g]]
      out[j] = vals[who].mean(axis=0) if who else 0 * vals[0]
    elif not valid.any():
      out[j] = 0 * vals[0]
    elif rule == "median":
      out[j] = np.median(vals[valid], axis=0)
    else:
      out[j] = stats.trim_mean(vals[valid], trim, axis=0)
  return out


def _params():
  return {"trunk": {"w": jnp.zeros(D)}, "heads": {"t1": {"b": jnp.zeros(())},
                                                  "t2": {"b": jnp.zeros(())}}}


def _flat(server):
  p = server.params
  return {"w": np.asarray(p["trunk"]["w"]), "b1": np.asarray(p["heads"]["t1"]["b"]),
          "b2": np.asarray(p["heads"]["t2"]["b"])}


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_robust_round_equals_numpy_over_participants_and_head_holders(rule):
  mesh = _mesh(S)
  lr, steps = 0.1, 2
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS,
                            aggregator=rule, trim=0.25, byzantine_f=1)
  n = np.array([30.0, 10.0, 20.0, 40.0])  # example counts do not enter these rules
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  masks = [np.ones(S), np.array([1, 0, 1, 1.0]), np.array([0, 0, 1, 0.0]), np.zeros(S)]
  seen = []
  for r, m in enumerate(masks):
    data = _data(r, steps)
    server, clients, metrics = round_fn(server, clients, data, n, m, HOLDS)
    seen.append(_flat(server))
    d = _np_robust(_np_deltas(ref, data, lr), m, rule)
    ref = {j: ref[j] - d[j] for j in ref}
    got = _flat(server)
    for j in ref:
      np.testing.assert_allclose(got[j], ref[j], rtol=2e-5, atol=2e-6)
    assert int(metrics["applied"]) == int(m.any())
  # Round 2: only site 2 took part; it does not hold t1, so t1 did not move; round 3: nothing.
  assert seen[2]["b1"] == seen[1]["b1"] and seen[2]["b2"] != seen[1]["b2"]
  assert all(np.array_equal(seen[3][j], seen[2][j]) for j in ref) and int(server.round) == 4
  assert round_fn.trace_count() == 1  # four participation patterns, one compilation


def test_corrupted_deltas_in_a_fedavg_round_equal_numpy():
  mesh = _mesh(S)
  lr, steps = 0.1, 2
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS,
                            byzantine=True, byzantine_scale=7.0)
  n, m = np.array([30.0, 10.0, 20.0, 40.0]), np.ones(S)
  modes = np.array([faults.MODES.index(x) for x in ("sign_flip", "none", "scale", "none")])
  data = _data(3, steps)
  server, clients, _ = round_fn(server, clients, data, n, m, HOLDS, modes)
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  deltas = _np_deltas(ref, data, lr)
  factor = np.array([-1.0, 1.0, 7.0, 1.0])
  got = _flat(server)
  for j, g in (("w", 0), ("b1", 1), ("b2", 2)):
    wg = n * HOLDS[:, g]
    want = -sum(wg[k] * factor[k] * deltas[k][j] for k in range(S)) / wg.sum()
    np.testing.assert_allclose(got[j], want, rtol=2e-5, atol=2e-6)
  assert round_fn.trace_count() == 1
  with pytest.raises(ValueError, match="modes must be 4 ints"):
    round_fn(server, clients, data, n, m, HOLDS, np.array([0, 0, 9, 0]))
  honest = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS)
  with pytest.raises(ValueError, match="without byzantine=True"):
    honest(server, clients, data, n, m, HOLDS, modes)


def test_noise_attack_has_the_update_scale_and_is_seeded_per_site_and_round():
  delta = {"a": jnp.full((100, 100), 0.5), "b": jnp.full((50,), -3.0)}
  d = 100 * 100 + 50
  norm = np.sqrt(0.25 * 100 * 100 + 9.0 * 50)
  base = jax.random.key(0)
  corrupt = jax.jit(faults.corrupt, static_argnums=2)
  out = corrupt(delta, jnp.int32(3), 10.0, faults.noise_key(base, 1, 2))
  flat = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
  assert np.linalg.norm(flat) == pytest.approx(norm, rel=0.03)  # E||z||^2 sigma^2 = ||Delta||^2
  assert abs(flat.mean()) < 4 * norm / np.sqrt(d) / np.sqrt(d)  # zero mean (4 standard errors)
  again = corrupt(delta, jnp.int32(3), 10.0, faults.noise_key(base, 1, 2))
  other = corrupt(delta, jnp.int32(3), 10.0, faults.noise_key(base, 1, 3))
  np.testing.assert_array_equal(np.asarray(again["a"]), np.asarray(out["a"]))
  assert not np.allclose(np.asarray(other["a"]), np.asarray(out["a"]))
  np.testing.assert_array_equal(np.asarray(corrupt(delta, jnp.int32(0), 10.0, base)["b"]),
                                np.full(50, -3.0))
  np.testing.assert_array_equal(np.asarray(corrupt(delta, jnp.int32(2), 10.0, base)["b"]),
                                np.full(50, -30.0))


def test_dropout_is_seeded_drops_only_sampled_sites_at_its_rate():
  sampled = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
  rounds = [faults.dropout(sampled, 0.3, 7, r) for r in range(1, 2001)]
  for mask, lost in rounds[:50]:
    assert np.all(mask + lost == sampled) and np.all(lost[sampled == 0] == 0)
  rate = np.mean([lost.sum() / sampled.sum() for _, lost in rounds])
  assert rate == pytest.approx(0.3, abs=0.01)  # 12,000 draws: 4 standard errors
  np.testing.assert_array_equal(faults.dropout(sampled, 0.3, 7, 5)[0], rounds[4][0])
  assert any(m.sum() == 0 for m, _ in rounds)  # some rounds lose every site
  np.testing.assert_array_equal(faults.dropout(sampled, 0.0, 7, 5)[0], sampled)


def test_byzantine_sites_by_name_or_seeded_fraction():
  names = ["a", "b", "c", "d", "e"]
  assert faults.byzantine_sites(("d", "b"), 0.0, names, 0) == (1, 3)
  picks = {faults.byzantine_sites((), 0.4, names, s) for s in range(20)}
  assert all(len(p) == 2 for p in picks) and len(picks) > 3  # round(0.4 x 5), varies by seed
  assert faults.byzantine_sites((), 0.4, names, 3) == faults.byzantine_sites((), 0.4, names, 3)
  assert faults.byzantine_sites((), 0.0, names, 0) == ()
  with pytest.raises(ValueError, match="'z', which is not a site"):
    faults.byzantine_sites(("z",), 0.0, names, 0)
  f = faults.Faults(byzantine=(1, 3), attack="noise")
  np.testing.assert_array_equal(f.modes(5), [0, 3, 0, 3, 0])


# ---------------------------------------------------------------- robust vs FedAvg under attack
def _attack_errors(aggregator, attacks, rounds=12, sites=5, steps=3, lr=0.3):
  """Linear regression over 5 IID sites; site 0 is Byzantine with each attack of `attacks` (None:
  honest) in turn; returns the held-out mean squared errors after `rounds` rounds, and the zero
  model's. One compiled round serves every attack (the attack is an input)."""
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=D)
  x = rng.normal(size=(sites, steps, 16, D)).astype(np.float32)
  y = (x @ w_true + 0.1 * rng.normal(size=(sites, steps, 16))).astype(np.float32)
  xt = rng.normal(size=(500, D))
  yt = xt @ w_true
  mesh = _mesh(sites)
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)

  def loss(p, b, key=None):
    return 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))

  round_fn = fed.make_round(loss, client, server_tx, mesh, local_steps=steps,
                            aggregator=aggregator, byzantine_f=1, trim=0.2, byzantine=True)
  errors = []
  for attack in attacks:
    server, clients = fed.init({"w": jnp.zeros(D)}, server_tx, client, mesh)
    modes = np.zeros(sites, np.int32)
    if attack:
      modes[0] = faults.MODES.index(attack)
    # The Byzantine site also claims as many examples as all others (FedAvg trusts n_k).
    n = np.array([4.0 if attack else 1.0] + [1.0] * (sites - 1))
    for _ in range(rounds):
      server, clients, _ = round_fn(server, clients, {"x": x, "y": y}, n, np.ones(sites),
                                    modes=modes)
    w = np.asarray(server.params["w"], np.float64)
    errors.append(float(np.mean((xt @ w - yt) ** 2)) if np.all(np.isfinite(w)) else np.inf)
  assert round_fn.trace_count() == 1
  return errors, float(np.mean(yt ** 2))


def test_robust_aggregators_keep_the_clean_accuracy_where_fedavg_breaks():
  (clean, scaled, flipped), start = _attack_errors("fedavg", [None, "scale", "sign_flip"])
  assert clean < 0.01 * start  # the clean run learns
  assert scaled > start and flipped > 0.5 * start  # one Byzantine site of five breaks FedAvg
  for rule in ("median", "trimmed_mean", "krum"):
    errors, _ = _attack_errors(rule, ["scale", "sign_flip"])
    # measured: clean 3.4e-4, robust 6e-4 .. 1.3e-3, FedAvg 4e11 (scale) / 1.7 (sign_flip)
    assert max(errors) < 0.005 * start, (rule, errors, clean)


# ---------------------------------------------------------------- the job (`jmtl federated`)
REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_fed.py"


def _env(data_dir, cache=None):
  """8 CPU devices and the data root; with `cache`, the session's JAX compilation cache
  (conftest.py: the job's programs are the same as tests/test_federated_job.py's, loaded, not
  compiled again)."""
  env = dict(os.environ, JMTL_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env.pop("JMTL_FAULT", None)
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


BAD_KEYS = [
    ("--config.fed.faults.byzantine=a,zz", "config key 'fed.faults.byzantine' = ('a', 'zz') names "
                                           "'zz', which is not a site of fed.sites"),
    ("--config.fed.faults.dropout=1", "config key 'fed.faults.dropout' = 1.0 must be in [0, 1)"),
    ("--config.fed.faults.attack=lie", "config key 'fed.faults.attack' = 'lie' is not one of: "
                                       "sign_flip, scale, noise"),
    ("--config.fed.trim=0.5", "config key 'fed.trim' = 0.5 must be in [0, 0.5)"),
]


def _bad_key_run(override, tmp_path, data_dir, capfd=None, monkeypatch=None):
  """`jmtl federated` on the tiny config with `override`: in this process (`cli.main`, the
  same exit code and stderr) when given capfd, else as a `python -m jmtl.cli` process."""
  argv = ["federated", "--config", str(TINY), "--workdir", str(tmp_path / "w"), override]
  if capfd is not None:
    return cli_in_process(argv, capfd, monkeypatch, _env(data_dir), cwd=REPO)
  return subprocess.run([sys.executable, "-m", "jmtl.cli", *argv], env=_env(data_dir),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_one_line_exit_2(out, message, tmp_path):
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("jmtl: error: "), out.stderr
  assert message in out.stderr, out.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,message", BAD_KEYS)
def test_bad_fault_and_robust_keys_are_one_line_exit_2(override, message, tmp_path, data_dir,
                                                       capfd, monkeypatch):
  _assert_one_line_exit_2(_bad_key_run(override, tmp_path, data_dir, capfd, monkeypatch),
                          message, tmp_path)


def test_a_bad_fault_key_ends_the_process_with_exit_2_and_one_line(tmp_path, data_dir):
  """The same check on the `python -m jmtl.cli` process itself (exit status, all of stderr,
  start-up and exit included), for one of the keys above."""
  override, message = BAD_KEYS[0]
  _assert_one_line_exit_2(_bad_key_run(override, tmp_path, data_dir), message, tmp_path)


@pytest.mark.slow
def test_job_with_dropout_and_a_byzantine_site_under_krum_logs_both(tmp_path, data_dir,
                                                                    jax_cache):
  # Seed 0, dropout 0.6 over 4 sites (faults.dropout): round 1 loses all four (skipped), round 2
  # keeps a, b, d; a is Byzantine (x10), so Krum (f = 1, m = n - f = 2) keeps b and d.
  wd = tmp_path / "w"
  out = subprocess.run(
      [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(TINY), "--workdir",
       str(wd), "--config.fed.rounds=2", "--config.fed.eval_every=0",
       "--config.fed.aggregator=krum", "--config.fed.faults.dropout=0.6",
       "--config.fed.faults.byzantine=a", "--config.fed.faults.attack=scale"],
      env=_env(data_dir, jax_cache), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "round 1: no site left after the deadline and dropout; round skipped" in out.stderr
  rows = [json.loads(line) for line in (wd / "rounds.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2]
  assert rows[0]["applied"] == 0 and rows[0]["sites"] == [] and rows[0]["loss"] is None
  assert rows[0]["dropout"] == ["a", "b", "c", "d"] and rows[0]["byzantine"] == []
  assert rows[1]["applied"] == 1 and rows[1]["sites"] == ["a", "b", "d"]
  assert rows[1]["dropout"] == ["c"] and rows[1]["dropped"] == ["c"]
  assert rows[1]["byzantine"] == ["a"]
  assert rows[1]["weights"] == {"a": 0.0, "b": 0.5, "d": 0.5}
  assert math.isfinite(rows[1]["loss"])
  assert (wd / "eval.json").is_file()
