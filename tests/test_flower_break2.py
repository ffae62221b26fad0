"""Break-it review of the Flower server's weighted aggregators (`dynamic`, `gradient`) and
DP-FedAvg, in process (the stand-in Grid of tests/test_flower_parts.py, no Flower processes).

Each case checks against an independent reference: the 3-site mesh simulation
(`algorithm.make_round`) with the same masks, rule, codec and DPConfig, or values computed by
hand in numpy. Covered: a site whose reported loss (or update) is not finite is refused and
does not zero every `dynamic` weight of that round and the rounds after it (fixed here); a
Problem with DP and a robust rule is refused before round 1 instead of silently dropping the
noise (fixed here); `gradient`'s trunk-only cosine and DP's S_g with sites holding different
heads (`flower.aggregate` against numpy); all sites lost in a DP round (nothing applied,
not the noise alone); a site that first takes part in round 3 (staleness 2, `dynamic`);
`dynamic` / `gradient` / DP with int8 and top-k compression (error feedback); epsilons of a
DP run stopped and resumed = an uninterrupted run's; a resume with another aggregator or
with DP switched on is refused."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401
from test_flower_robust import SITES, _simulate  # noqa: E402

from jmtl.federated import compression  # noqa: E402
from jmtl.federated import flower  # noqa: E402
from jmtl.federated import privacy  # noqa: E402

C, Z, DELTA, T = 0.35, 0.8, 1e-5, 0.5
DP = {"dp-clip": C, "dp-z": Z, "dp-delta": DELTA}


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def test_a_site_with_a_non_finite_loss_does_not_zero_the_dynamic_weights(tmp_path, capsys):
  """Site b's targets are NaN (its loss and update NaN) in every round. Before the fix the
  server aggregated it: dynamic's weights were all 0 (a NaN mean loss), so each round applied a
  zero update while claiming `applied` 1, and b's NaN previous loss (kept in the checkpoint
  meta) zeroed the weights of every later round. Now b's reply is refused: a and c are weighed
  as the simulation weighs them with b masked out, and the parameters move."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, problem="test_flower_fixes:nan_problem", sites=",".join(SITES),
                   aggregator="dynamic", temperature=T)
  flower.serve(_Grid(rc), rc)
  rows = _rows(wd)
  for row in rows:
    assert row["sites"] == ["a", "c"] and row["dropped"] == ["b"] and row["applied"] == 1
    assert row["site_loss"]["b"] is None and row["site_loss"]["a"] > 0
    assert sum(row["weights"].values()) == pytest.approx(1.0)
    (err,) = row["errors"].values()
    assert "site 'b'" in err and "non-finite loss" in err
  assert "non-finite loss" in capsys.readouterr().err
  # Round 1 by hand: w_k = n_k exp((L_k / mean L - 1) / T), normalised over a and c.
  L, n = np.array([rows[0]["site_loss"]["a"], rows[0]["site_loss"]["c"]]), np.array([10., 30.])
  w = n * np.exp((L / L.mean() - 1.0) / T)
  assert [rows[0]["weights"]["a"], rows[0]["weights"]["c"]] == pytest.approx(w / w.sum(),
                                                                           rel=1e-5)
  _, got, _, meta = _final(wd, rc)
  assert np.all(np.isfinite(meta["site_memory"]["prev_loss"]))
  assert meta["site_memory"]["last_round"] == [1, -1, 1]
  sim = _simulate([np.array([1.0, 0.0, 1.0])] * 2, "dynamic", temperature=T)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)
  assert np.abs(got["w"]).max() > 0.05


def test_a_non_finite_update_with_fedavg_is_refused_not_averaged(tmp_path):
  """FedAvg: b's NaN update no longer turns the server parameters into NaN."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1, problem="test_flower_fixes:nan_problem", sites=",".join(SITES))
  flower.serve(_Grid(rc), rc)
  _, got, _, _ = _final(wd, rc)
  sim = _simulate([np.array([1.0, 0.0, 1.0])], "fedavg")
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)


def test_all_sites_lost_in_a_dp_round_applies_nothing(tmp_path):
  """Round 2 without any reply: the noise alone is not applied (the simulation keeps the
  parameters in a round with no participant); epsilon still counts the round."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 3, sites=",".join(SITES), **DP)
  flower.serve(_Grid(rc, lost={(s, 1) for s in SITES}), rc)
  rows = _rows(wd)
  assert rows[1]["applied"] == 0 and rows[1]["weights"] == {}
  assert rows[0]["dp_epsilon_rdp"] < rows[1]["dp_epsilon_rdp"] < rows[2]["dp_epsilon_rdp"]
  _, got, _, _ = _final(wd, rc)
  sim = _simulate([np.ones(3), np.zeros(3), np.ones(3)], "fedavg",
                  dp=privacy.DPConfig(C, Z, DELTA, 1.0))
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-5, atol=1e-6)


def test_all_sites_lost_with_dynamic_applies_nothing_and_keeps_the_memory(tmp_path):
  """Round 2 without any reply, `dynamic`: nothing applied, no weights, and round 3 weighs
  with staleness 1 and the round-1 losses, as the simulation (mask all 0 in round 2)."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 3, sites=",".join(SITES), aggregator="dynamic", temperature=T)
  flower.serve(_Grid(rc, lost={(s, 1) for s in SITES}), rc)
  rows = _rows(wd)
  assert rows[1]["applied"] == 0 and rows[1]["weights"] == {}
  _, got, _, meta = _final(wd, rc)
  assert meta["site_memory"]["last_round"] == [2, 2, 2]
  sim = _simulate([np.ones(3), np.zeros(3), np.ones(3)], "dynamic", temperature=T)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)


def test_a_site_first_taking_part_in_round_three_is_weighed_as_the_simulation(tmp_path):
  """Site c lost in rounds 1 and 2: in round 3 its staleness is 2 and it has no previous
  loss; `dynamic` weighs it as the simulation's ServerState (last_round -1) does."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 4, sites=",".join(SITES), aggregator="dynamic", temperature=T)
  flower.serve(_Grid(rc, lost={("c", 0), ("c", 1)}), rc)
  masks = [np.array([1.0, 1.0, 0.0])] * 2 + [np.ones(3)] * 2
  sim = _simulate(masks, "dynamic", temperature=T)
  _, got, _, _ = _final(wd, rc)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["dynamic", "gradient", "dp"])
@pytest.mark.parametrize("spec", ["int8", "topk:0.4"])
def test_weighted_rules_and_dp_with_compression_equal_the_simulation(tmp_path, rule, spec):
  """The decoded updates are what the rules weigh / DP clips, as in the simulation (its
  codec hook runs before the weights and the clipping); site c lost in round 2."""
  wd = tmp_path / "wd"
  kw = DP if rule == "dp" else {"aggregator": rule, "temperature": T}
  rc = _run_config(wd, 3, sites=",".join(SITES), compress=spec, **kw)
  flower.serve(_Grid(rc, lost={("c", 1)}), rc)
  masks = [np.ones(3), np.array([1.0, 1.0, 0.0]), np.ones(3)]
  skw = ({"dp": privacy.DPConfig(C, Z, DELTA, 1.0)} if rule == "dp" else {"temperature": T})
  sim = _simulate(masks, "fedavg" if rule == "dp" else rule, codec=compression.parse(spec),
                  **skw)
  _, got, _, _ = _final(wd, rc)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], sim[k], rtol=1e-5, atol=1e-6)


def test_dp_epsilons_of_a_resumed_run_equal_the_uninterrupted_runs(tmp_path):
  wd, ref = tmp_path / "wd", tmp_path / "ref"
  kw = dict(sites=",".join(SITES), **DP)
  flower.serve(_Grid(_run_config(wd, 2, **kw)), _run_config(wd, 2, **kw))
  flower.serve(_Grid(_run_config(wd, 4, **kw)), _run_config(wd, 4, **kw))
  flower.serve(_Grid(_run_config(ref, 4, **kw)), _run_config(ref, 4, **kw))
  a, b = _rows(wd), _rows(ref)
  assert [r["round"] for r in a] == [1, 2, 3, 4]
  for key in ("dp_epsilon_rdp", "dp_epsilon_pld", "weights"):
    assert [r[key] for r in a] == [r[key] for r in b]
  _, got, _, _ = _final(wd, _run_config(wd, 4, **kw))
  _, want, _, _ = _final(ref, _run_config(ref, 4, **kw))
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, named", [
    ({"aggregator": "dynamic"}, "aggregator None -> 'dynamic'"),
    ({"aggregator": "dynamic", "temperature": 2.0}, "temperature"),
    (DP, "dp-clip None -> 0.35")])
def test_a_resume_with_another_rule_or_dp_switched_on_is_refused(tmp_path, change, named):
  wd = tmp_path / "wd"
  kw = dict(sites=",".join(SITES))
  first = {"aggregator": "dynamic", "temperature": 0.5} if "temperature" in change else {}
  flower.serve(_Grid(_run_config(wd, 1, **kw, **first)), _run_config(wd, 1, **kw, **first))
  rc = _run_config(wd, 2, **kw, **change)
  with pytest.raises(ValueError) as e:
    flower.serve(_Grid(rc), rc)
  assert len(str(e.value).splitlines()) == 1 and named in str(e.value)


def test_a_problem_with_dp_and_a_robust_rule_is_refused_before_round_one(tmp_path):
  """A Problem (not a jmtl config, whose fed.dp.clip_norm rule refuses it) with dp and
  aggregator median: before the fix `aggregate` took the robust path and silently dropped the
  clipping and noise while rounds.jsonl reported an epsilon each round."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 1, sites=",".join(SITES), aggregator="median", **DP)
  with pytest.raises(ValueError) as e:
    flower.serve(_Grid(rc), rc)
  assert len(str(e.value).splitlines()) == 1 and "'median'" in str(e.value)
  assert not (wd / "rounds.jsonl").exists()


# Sites holding different tasks: 4 sites, trunk t (group 0) and heads h1, h2 (groups 1, 2);
# site 3 lost. Leaves in tree order: h1, h2, t.
HOLDS = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]], np.float64)
GROUPS = {"h1": 1, "h2": 2, "t": 0}
N = np.array([10.0, 20.0, 30.0, 40.0])


def _grouped_deltas():
  rng = np.random.default_rng(7)
  deltas = [{"h1": rng.normal(size=2), "h2": rng.normal(size=2), "t": rng.normal(size=3)}
            for _ in range(3)]
  deltas[1]["t"] = -deltas[1]["t"]  # one site against the others: cosines far apart
  like = {k: np.zeros(v.shape, np.float32) for k, v in deltas[0].items()}
  f32 = [{k: v.astype(np.float32) for k, v in d.items()} for d in deltas]
  return deltas, f32 + [None], like


def test_gradient_weights_use_the_trunk_cosine_with_holds_by_hand():
  """w_k = m_k n_k exp(c_k / T) / sum_j (...), c_k = cos(trunk of Delta_k, trunk of the
  FedAvg grouped mean) (a head's leaves never enter), then each leaf averaged over its
  holders: numpy float64 by hand."""
  deltas, f32, like = _grouped_deltas()
  m = np.array([1.0, 1.0, 1.0, 0.0])
  f = m * N / np.sum(m * N)

  def grouped(w):
    out = {}
    for leaf, g in GROUPS.items():
      wg = np.array([w[k] * HOLDS[k, g] for k in range(3)])
      out[leaf] = sum(wg[k] * deltas[k][leaf] for k in range(3)) / wg.sum()
    return out
  mean = grouped(f)
  cos = np.array([d["t"] @ mean["t"] / np.linalg.norm(d["t"]) / np.linalg.norm(mean["t"])
                  for d in deltas] + [0.0])
  w = m * N * np.exp(cos / T)
  w /= w.sum()
  want = grouped(w)
  got, gw = flower.aggregate(f32, N, like, GROUPS, HOLDS, rule="gradient", temperature=T)
  np.testing.assert_allclose(gw, w, rtol=1e-5, atol=1e-7)
  for leaf in GROUPS:
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, atol=1e-6)


def test_dp_with_holds_divides_each_leaf_by_its_holders_by_hand():
  """DP-FedAvg, z = 0: each arrived delta with the leaves of groups its site does not hold
  zeroed, clipped to global norm C, summed, divided by q S_g (S_g = the sites holding the
  leaf's group, the lost one too: the simulation's `holders`); w_k = m_k / (q S)."""
  deltas, f32, like = _grouped_deltas()
  clip = 1.2
  total = {leaf: np.zeros(np.shape(like[leaf])) for leaf in GROUPS}
  norms = []
  for k, d in enumerate(deltas):
    sent = {leaf: d[leaf] * HOLDS[k, g] for leaf, g in GROUPS.items()}
    norm = np.sqrt(sum(np.sum(v * v) for v in sent.values()))
    norms.append(norm)
    for leaf in GROUPS:
      total[leaf] += sent[leaf] * min(1.0, clip / norm)
  assert min(norms) < clip < max(norms)  # clipped and unclipped sites
  dp = privacy.DPConfig(clip, 0.0, 1e-5, 1.0)
  got, w = flower.aggregate(f32, N, like, GROUPS, HOLDS, dp=dp, noise_key=flower.noise_key(0, 0))
  for leaf, g in GROUPS.items():
    np.testing.assert_allclose(got[leaf], total[leaf] / HOLDS[:, g].sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, [0.25, 0.25, 0.25, 0.0])
