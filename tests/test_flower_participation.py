"""fed.participation < 1 on the Flower server: each round the server samples
m = max(1, round(q S)) sites with the simulation's draw (`loop.sample_participants(seed, round,
S, q)`), only those train; a node known to hold an unsampled site gets the round's config
without parameters and replies `skipped`. In process (the stand-in Grid of
tests/test_flower_parts.py): 4 rounds of 4 sites at q = 0.5 equal the 4-site mesh simulation
with the same masks (<= 1e-6), rounds.jsonl names the sampled sites and drops none, bytes_down
counts the parameters only where they were sent; with DP the epsilons are dp-accounting's at
sampling rate 1/2."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401
from test_flower_robust import _simulate  # noqa: E402

from jmtl.federated import flower  # noqa: E402
from jmtl.federated import loop  # noqa: E402
from jmtl.federated import privacy  # noqa: E402

SITES = ("a", "b", "c", "d")
ROUNDS, STEPS, Q = 4, 2, 0.5


def _masks():
  return [loop.sample_participants(0, r + 1, len(SITES), Q) for r in range(ROUNDS)]


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def test_sampled_rounds_on_the_flower_server_equal_the_simulation(tmp_path):
  masks = _masks()
  assert all(m.sum() == 2 for m in masks) and len({tuple(m) for m in masks}) > 1
  wd = tmp_path / "wd"
  run_config = _run_config(wd, ROUNDS, sites=",".join(SITES), participation=Q)
  flower.serve(_Grid(run_config), run_config)
  rows = _rows(wd)
  for row, mask in zip(rows, masks):
    assert row["sites"] == [s for s, m in zip(SITES, mask) if m]
    assert row["dropped"] == [] and "errors" not in row and "timed_out" not in row
  _, got, _, _ = _final(wd, run_config)
  sim = _simulate(masks, sites=SITES)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)
  # bytes_down: 4 values of w + 1 of b, float32 = 24 bytes a copy; round 1 sends every node
  # the parameters (no node is known yet), later rounds only the 2 sampled sites' nodes.
  per_copy = 4 * (fp.D + 1)
  assert rows[0]["bytes_down"]["total"] == 4 * per_copy
  assert [r["bytes_down"]["total"] for r in rows[1:]] == [2 * per_copy] * (ROUNDS - 1)
  assert rows[1]["bytes_down"] == {**{s: per_copy for s in rows[1]["sites"]},
                                   "total": 2 * per_copy}


def test_a_sampled_site_lost_is_dropped_and_an_unsampled_one_is_not(tmp_path):
  masks = _masks()
  r = 2  # round 3 (0-based 2): lose one sampled and one unsampled site
  on = [s for s, m in zip(SITES, masks[r]) if m]
  off = [s for s, m in zip(SITES, masks[r]) if not m]
  wd = tmp_path / "wd"
  run_config = _run_config(wd, ROUNDS, sites=",".join(SITES), participation=Q)
  flower.serve(_Grid(run_config, lost={(on[0], r), (off[0], r)}), run_config)
  row = _rows(wd)[r]
  assert row["sites"] == on[1:] and row["dropped"] == [on[0]]
  assert row["timed_out"] == sorted([on[0], off[0]])  # the unsampled node did not answer either
  masks[r] = np.array([1.0 if s in on[1:] else 0.0 for s in SITES])
  _, got, _, _ = _final(wd, run_config)
  np.testing.assert_allclose(got["w"], _simulate(masks, sites=SITES)["w"], rtol=1e-6, atol=1e-6)


def test_dp_with_sampled_sites_accounts_at_rate_m_over_s(tmp_path):
  wd = tmp_path / "wd"
  C, Z = 0.35, 0.8
  run_config = _run_config(wd, ROUNDS, sites=",".join(SITES), participation=Q,
                           **{"dp-clip": C, "dp-z": Z})
  flower.serve(_Grid(run_config), run_config)
  rows = _rows(wd)
  assert rows[0]["weights"] == {s: pytest.approx(1 / (0.5 * 4)) for s in rows[0]["sites"]}
  _, got, _, _ = _final(wd, run_config)
  sim = _simulate(_masks(), sites=SITES, dp=privacy.DPConfig(C, Z, 1e-5, 0.5))
  np.testing.assert_allclose(got["w"], sim["w"], rtol=1e-5, atol=1e-6)
  from dp_accounting import dp_event
  from dp_accounting.rdp import rdp_privacy_accountant
  rdp = rdp_privacy_accountant.RdpAccountant()
  rdp.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(Z)), ROUNDS)
  assert rows[-1]["dp_epsilon_rdp"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)


def test_participation_with_secure_aggregation_on_flower_is_one_config_line():
  from jmtl import config as config_lib
  from jmtl.config import ConfigError
  from test_flower_parts import CONFIG
  config = config_lib.complete(config_lib.load_config_file(CONFIG))
  config.fed.backend, config.fed.participation = "flower", 0.5
  assert config_lib.validate(config).fed.participation == 0.5
  config.fed.secure_aggregation = True
  with pytest.raises(ConfigError, match=r"fed.backend.*with fed.secure_aggregation needs "
                                        r"fed.participation = 1"):
    config_lib.validate(config)
