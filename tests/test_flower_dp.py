"""DP-FedAvg (fed.dp.*) on the Flower server: each site's (decoded) update clipped to norm C,
summed, Gaussian noise z C added with the simulation's key, divided by q S (q = 1: Flower asks
every site every round), epsilon after each round from dp-accounting. In process (the stand-in
Grid of tests/test_flower_parts.py): the server parameters after 3 rounds with site c lost in
round 2 equal the 3-site mesh simulation's (`algorithm.make_round` with the same DPConfig);
with z = 0 round 1 equals the clipped mean computed by hand in numpy (float64 local SGD);
rounds.jsonl's epsilons equal dp-accounting's RDP and PLD accountants called directly."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401
from test_flower_robust import SITES, _simulate, hand_delta  # noqa: E402

from jmtl.federated import flower  # noqa: E402
from jmtl.federated import privacy  # noqa: E402

C, Z, DELTA = 0.35, 0.8, 1e-5  # round 1: site b clipped (norm 0.38), a and c not (0.34, 0.31)
MASKS = [np.ones(3), np.array([1.0, 1.0, 0.0]), np.ones(3)]


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def test_dp_fedavg_on_the_flower_server_equals_the_simulation(tmp_path):
  wd = tmp_path / "wd"
  run_config = _run_config(wd, 3, sites=",".join(SITES), **{"dp-clip": C, "dp-z": Z,
                                                            "dp-delta": DELTA})
  flower.serve(_Grid(run_config, lost={("c", 1)}), run_config)
  rows = _rows(wd)
  assert [r["sites"] for r in rows] == [list(SITES), ["a", "b"], list(SITES)]
  assert rows[1]["weights"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3)}
  _, got, _, _ = _final(wd, run_config)
  sim = _simulate(MASKS, "fedavg", dp=privacy.DPConfig(C, Z, DELTA, 1.0))
  plain = _simulate(MASKS, "fedavg")
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["w"], plain["w"], atol=1e-3)  # clipping and noise changed it
  # Epsilon after each round: dp-accounting called here directly (Poisson-sampled Gaussian,
  # q = 1, composed r times).
  from dp_accounting import dp_event
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  for r, row in enumerate(rows, start=1):
    event = dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(Z))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, r)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, r)
    assert row["dp_epsilon_rdp"] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert row["dp_epsilon_pld"] == pytest.approx(pld.get_epsilon(DELTA), rel=1e-9)
  assert rows[0]["dp_epsilon_rdp"] < rows[2]["dp_epsilon_rdp"]


def test_round_one_without_noise_is_the_clipped_mean_by_hand(tmp_path):
  """z = 0: Delta = sum_k clip(Delta_k, C) / S, each Delta_k from 2 local SGD steps (lr 0.2)
  in float64; the server (sgd 1.0) moves x = 0 by -Delta."""
  wd = tmp_path / "wd"
  run_config = _run_config(wd, 1, sites=",".join(SITES), **{"dp-clip": C, "dp-z": 0.0})
  flower.serve(_Grid(run_config), run_config)
  total = np.zeros(fp.D + 1)
  norms = []
  for k in range(len(SITES)):
    d = hand_delta(k)
    norms.append(np.linalg.norm(d))
    total += d * min(1.0, C / np.linalg.norm(d))
  assert min(norms) < C < max(norms)  # clipped and unclipped sites
  mean = total / len(SITES)
  _, got, _, _ = _final(wd, run_config)
  np.testing.assert_allclose(got["w"], -mean[:fp.D], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["b"], -mean[fp.D], rtol=1e-5, atol=1e-6)
  row = _rows(wd)[0]
  assert row["dp_epsilon_rdp"] is None and row["dp_epsilon_pld"] is None  # z = 0: infinite
