"""The weighted aggregators `dynamic` (the paper's dynamic weighted aggregation) and `gradient`
(update alignment) on the Flower server: `flower.aggregate` calls `jmtl.federated.aggregation`'s
rules with the site axis as the leading array axis, the server keeps each site's previous loss
and last round (the simulation's `ServerState.prev_loss` / `last_round`) in its checkpoint.
In process (the stand-in Grid of tests/test_flower_parts.py): the server parameters after 4
rounds, with site c lost in round 2 (so its staleness and previous loss matter in round 3),
equal the 3-site mesh simulation's (`algorithm.make_round` with the same rule, mask and
temperature) within 1e-6; a run stopped after round 2 and resumed equals the uninterrupted
one; round 1's dynamic weights equal the rule computed by hand in numpy."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401
from test_flower_robust import SITES, _simulate  # noqa: E402

from jmtl.federated import flower  # noqa: E402

ROUNDS = 4
T = 0.5  # temperature: far from FedAvg's weights at these losses
MASKS = [np.ones(3), np.array([1.0, 1.0, 0.0]), np.ones(3), np.ones(3)]


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("aggregator", ["dynamic", "gradient"])
def test_weighted_aggregators_on_the_flower_server_equal_the_simulation(tmp_path, aggregator):
  wd = tmp_path / "wd"
  run_config = _run_config(wd, ROUNDS, sites=",".join(SITES), aggregator=aggregator,
                           temperature=T)
  flower.serve(_Grid(run_config, lost={("c", 1)}), run_config)
  rows = _rows(wd)
  assert [r["sites"] for r in rows] == [list(SITES), ["a", "b"], list(SITES), list(SITES)]
  _, got, _, _ = _final(wd, run_config)
  sim = _simulate(MASKS, aggregator, temperature=T)
  fedavg = _simulate(MASKS, "fedavg")
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)
  assert not np.allclose(got["w"], fedavg["w"], atol=1e-4)  # the rule changed the numbers
  n = np.array([10.0, 20.0, 30.0])  # flower_problem: n_k = 10 (k + 1)
  assert rows[0]["weights"] != {s: pytest.approx(v) for s, v in zip(SITES, n / n.sum())}
  assert sum(rows[0]["weights"].values()) == pytest.approx(1.0)


def test_dynamic_weights_of_round_one_by_hand(tmp_path):
  """Round 1 (no site has a previous loss: r_k = 0, tau_k = 0): w_k = n_k exp((L_k / mean L
  - 1) / T) / sum_j (...), from the site losses the rounds.jsonl line reports."""
  wd = tmp_path / "wd"
  run_config = _run_config(wd, 1, sites=",".join(SITES), aggregator="dynamic", temperature=T)
  flower.serve(_Grid(run_config), run_config)
  row = _rows(wd)[0]
  L = np.array([row["site_loss"][s] for s in SITES], np.float64)
  n = np.array([10.0, 20.0, 30.0])
  w = n * np.exp((L / L.mean() - 1.0) / T)
  w /= w.sum()
  assert [row["weights"][s] for s in SITES] == pytest.approx(list(w), rel=1e-5)


def test_a_resumed_dynamic_run_equals_the_uninterrupted_one(tmp_path):
  """Stopped after round 2 (site c lost in round 2) and resumed to round 4: the sites'
  previous losses and last rounds come back from the checkpoint, so round 3's weights (site c
  stale by one round) and the final parameters equal an uninterrupted run's."""
  wd, ref = tmp_path / "wd", tmp_path / "ref"
  kw = dict(sites=",".join(SITES), aggregator="dynamic", temperature=T)
  flower.serve(_Grid(_run_config(wd, 2, **kw), lost={("c", 1)}), _run_config(wd, 2, **kw))
  flower.serve(_Grid(_run_config(wd, ROUNDS, **kw)), _run_config(wd, ROUNDS, **kw))
  flower.serve(_Grid(_run_config(ref, ROUNDS, **kw), lost={("c", 1)}),
               _run_config(ref, ROUNDS, **kw))
  a, b = _rows(wd), _rows(ref)
  assert [r["round"] for r in a] == [1, 2, 3, 4]
  assert a[2]["weights"] == pytest.approx(b[2]["weights"], rel=1e-6)
  _, got, _, _ = _final(wd, _run_config(wd, ROUNDS, **kw))
  _, want, _, _ = _final(ref, _run_config(ref, ROUNDS, **kw))
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  sim = _simulate(MASKS, "dynamic", temperature=T)
  np.testing.assert_allclose(got["w"], sim["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("spec", [
    ("--config.fed.aggregator=dynamic", "--config.fed.temperature=0.5"),
    ("--config.fed.aggregator=gradient", "--config.fed.temperature=0.5"),
    ("--config.fed.dp.clip_norm=0.5", "--config.fed.dp.noise_multiplier=0.3"),
    ("--config.fed.participation=0.5",)])
def test_jmtl_config_with_weighted_aggregators_matches_jmtl_federated(tmp_path, data_dir, spec):
  """A real jmtl config (`tiny_fed_flower.py`: BBC topic, transformer, DiLoCo), 3 rounds with
  fed.aggregator = dynamic or gradient (T = 0.5), or DP-FedAvg, or half the sites sampled per
  round (fed.participation), through the Flower server
  (in-process stand-in Grid, the Problem of `flower.jmtl_problem`) against `jmtl federated`'s
  mesh simulation of the same config: each round's site losses (rel 1e-5), aggregation weights
  (rel 1e-4) and epsilons agree."""
  import os
  import subprocess
  import sys
  from test_flower_parts import CONFIG, ROOT
  spec = ["--config.fed.rounds=3", *spec]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sim_wd = tmp_path / "sim"
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                        "--workdir", str(sim_wd), *spec], env=env, capture_output=True,
                       text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  wd = tmp_path / "flower"
  rc = {"problem": "jmtl.federated.flower:jmtl_problem", "config": CONFIG,
        "overrides": " ".join(spec), "workdir": str(wd), "rounds": 3,
        "round-timeout": 60.0, "wait-sites": 0.0}
  flower.serve(_Grid(rc), rc)
  got = [r for r in _rows(wd) if r["round"] > 0]
  want = [r for r in _rows(sim_wd) if r["round"] > 0]
  assert [r["round"] for r in got] == [r["round"] for r in want] == [1, 2, 3]
  for g, w in zip(got, want):
    assert g["sites"] == w["sites"]
    assert g["site_loss"] == pytest.approx(w["site_loss"], rel=1e-5, abs=1e-6)
    assert g["weights"] == pytest.approx(w["weights"], rel=1e-4)
    for k in ("dp_epsilon_rdp", "dp_epsilon_pld"):
      assert g.get(k) == (None if w.get(k) is None else pytest.approx(w[k], rel=1e-9))
