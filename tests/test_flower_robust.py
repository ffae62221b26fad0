"""Byzantine-robust aggregators (fed.aggregator = median / trimmed_mean / krum) on the Flower
server: `flower.aggregate` calls `jmtl.federated.robust.aggregate` as the simulation's round
does. In process (the stand-in Grid of tests/test_flower_parts.py, every site's ClientApp run
in this process): the server parameters after 3 rounds equal the mesh simulation's
(`algorithm.make_round` with the same aggregator over a 3-site mesh), also with a site lost in
one round (its mask 0), and round 1's median equals numpy's median of the sites' deltas
computed by hand (float64 local SGD)."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401

from jmtl.federated import algorithm  # noqa: E402
from jmtl.federated import flower  # noqa: E402

SITES = ("a", "b", "c")
ROUNDS, STEPS = 3, 2


def hand_delta(k):
  """Site k's round-1 update Delta_k = x - x_k by hand: 2 local SGD steps (lr 0.2) from x = 0
  in float64 on its flower_problem batches; [w (D values), b]."""
  data, _ = fp.site_batches(0, k, 0, STEPS)
  w, b = np.zeros(fp.D), 0.0
  for t in range(STEPS):
    x, y = data["x"][t].astype(np.float64), data["y"][t].astype(np.float64)
    res = x @ w + b - y
    w, b = w - 0.2 * x.T @ res / len(y), b - 0.2 * np.mean(res)
  return np.concatenate([-w, [-b]])


def _simulate(masks, aggregator="fedavg", sites=SITES, **kw):
  """The same rounds on one mesh of len(sites) sites (`algorithm.make_round`, `aggregator`);
  masks[r]; with a `codec` that needs them, error-feedback residuals kept per site."""
  S = len(sites)
  mesh = jax.make_mesh((S,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:S])
  client_tx, server_tx = fp.optimizers("fedavg", len(masks), STEPS)
  server, clients = algorithm.init(
      {"w": np.zeros(fp.D, np.float32), "b": np.zeros((), np.float32)}, server_tx, client_tx,
      mesh, error_feedback=kw.get("codec") is not None and kw["codec"].error_feedback)
  round_fn = algorithm.make_round(fp.loss_fn, client_tx, server_tx, mesh, local_steps=STEPS,
                                  aggregator=aggregator, **kw)
  for r in range(len(masks)):
    per_site = [fp.site_batches(0, k, r, STEPS) for k in range(S)]
    batches = jax.tree.map(lambda *x: np.stack(x), *[b for b, _ in per_site])
    examples = np.array([n for _, n in per_site], np.float32)
    server, clients, _ = round_fn(server, clients, batches, examples,
                                  np.asarray(masks[r], np.float32))
  return jax.device_get(server.params)


@pytest.mark.parametrize("aggregator, extra, sim_kw", [
    ("median", {}, {}),
    ("trimmed_mean", {"trim": 0.34}, {"trim": 0.34}),
    ("krum", {"byzantine-f": 1, "krum-m": 2}, {"byzantine_f": 1, "krum_m": 2})])
def test_robust_aggregators_on_the_flower_server_equal_the_simulation(tmp_path, aggregator,
                                                                        extra, sim_kw):
  """3 rounds, site c lost in round 2 (it never gets the message): the Flower server's
  parameters equal the simulation's with that mask (<= 1e-6), and differ from FedAvg's."""
  wd = tmp_path / "wd"
  run_config = _run_config(wd, ROUNDS, sites=",".join(SITES), aggregator=aggregator, **extra)
  flower.serve(_Grid(run_config, lost={("c", 1)}), run_config)
  rows = [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]
  assert [r["sites"] for r in rows] == [list(SITES), ["a", "b"], list(SITES)]
  masks = [np.ones(3), np.array([1.0, 1.0, 0.0]), np.ones(3)]
  _, got, _, _ = _final(wd, run_config)
  sim = _simulate(masks, aggregator, **sim_kw)
  fedavg = _simulate(masks, "fedavg")
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)
  assert not np.allclose(got["w"], fedavg["w"], atol=1e-4)  # the rule changed the numbers
  if aggregator == "krum":  # m = 2 of 3 selected: weight 1/2 each, 0 for the third
    assert sorted(rows[0]["weights"].values()) == [0.0, 0.5, 0.5]
  else:  # every participant counts once
    assert rows[0]["weights"] == {s: pytest.approx(1 / 3) for s in SITES}


def test_round_one_median_is_numpys_median_of_the_sites_deltas(tmp_path):
  """By hand: each site's 2 local SGD steps (lr 0.2) from x = 0 in float64, Delta_k = x - x_k,
  np.median over the 3 sites per coordinate; the server (sgd 1.0) moves x by -median."""
  wd = tmp_path / "wd"
  run_config = _run_config(wd, 1, sites=",".join(SITES), aggregator="median")
  flower.serve(_Grid(run_config), run_config)
  med = np.median(np.stack([hand_delta(k) for k in range(len(SITES))]), axis=0)
  _, got, _, _ = _final(wd, run_config)
  np.testing.assert_allclose(got["w"], -med[:fp.D], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["b"], -med[fp.D], rtol=1e-5, atol=1e-6)


def test_the_flower_backend_accepts_every_aggregator_and_secagg_with_fedavg_only():
  from jmtl import config as config_lib
  from jmtl.config import ConfigError
  from test_flower_parts import CONFIG
  for rule in ("median", "trimmed_mean", "krum"):
    config = config_lib.complete(config_lib.load_config_file(CONFIG))
    config.fed.backend, config.fed.aggregator = "flower", rule
    config.fed.byzantine_f = 0
    assert config_lib.validate(config).fed.aggregator == rule
  for rule in ("dynamic", "gradient"):  # on Flower too (tests/test_flower_dynamic.py)
    config = config_lib.complete(config_lib.load_config_file(CONFIG))
    config.fed.backend, config.fed.aggregator = "flower", rule
    assert config_lib.validate(config).fed.aggregator == rule
    config.fed.secure_aggregation = True  # SecAgg+ on Flower: fedavg weights only
    with pytest.raises(ConfigError, match=r"config key 'fed.backend'.*with "
                                          r"fed.secure_aggregation needs fed.aggregator = "
                                          r"'fedavg', got '" + rule + "'"):
      config_lib.validate(config)
