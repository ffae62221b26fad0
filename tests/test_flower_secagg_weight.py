"""Flower SecAgg+ and the sites' example counts (`jmtl.federated.flower.secagg_check`): Flower
1.42's `secaggplus_mod` sends clip(n_k / max_weight x delta_k, -8, 8), so a site whose n_k is
above max_weight (the workflow's, default 1000) with a large enough delta makes the securely
aggregated mean wrong while Flower only logs a warning. In process (seconds): the mod's and the
workflow's arithmetic, line for line with Flower's own functions (each site's private mask is
added and removed as there; the pairwise masks, which cancel mod 2**32, are left out), against
the float64 numpy weighted mean."""

import numpy as np
import pytest

pytest.importorskip("flwr")
from flwr.common import Error  # noqa: E402
from flwr.common.secure_aggregation.ndarrays_arithmetic import (  # noqa: E402
    factor_combine, factor_extract, parameters_addition, parameters_mod, parameters_multiply,
    parameters_subtraction)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402

from jmtl.federated import flower  # noqa: E402

C, Q, M = 8.0, 2**22, 2**32  # Flower's clipping_range, quantization_range, modulus_range


def _flower_secagg_mean(deltas, ns, max_weight):
  """What the server of Flower 1.42's SecAgg+ gets: `secaggplus_mod._collect_masked_vectors`
  per site (ratio = n_k / max_weight; q_k = round(ratio Q); multiply by q_k / Q; quantize;
  factor_combine), the sum mod M, then `SecAggPlusWorkflow.unmask_stage` (factor_extract,
  dequantize, + offset -(K - 1) C, x Q / sum q_k)."""
  total, masks = None, []
  for k, (x, n) in enumerate(zip(deltas, ns)):
    q = round(n / max_weight * Q)
    p = parameters_multiply([np.asarray(x, np.float32)], q / Q)
    p = factor_combine(q, quantize(p, C, Q))
    masks.append(pseudo_rand_gen(bytes([k + 1]) * 32, M, [a.shape for a in p]))
    p = parameters_mod(parameters_addition(p, masks[-1]), M)
    total = p if total is None else parameters_addition(total, p)
  total = parameters_mod(total, M)
  for mask in masks:
    total = parameters_subtraction(total, mask)
  q_total, rec = factor_extract(parameters_mod(total, M))
  vec = dequantize(rec, C, Q)[0]
  return (vec - (len(ns) - 1) * C) * (Q / q_total), q_total


def _weighted_mean(deltas, ns):
  d, n = np.asarray(deltas, np.float64), np.asarray(ns, np.float64)
  return (n[:, None] * d).sum(0) / n.sum()


def _bound(q_total, K):
  # K sites, each quantised on a grid of 2C/Q (stochastic rounding: < one step), divided by
  # q_total / Q: <= K 2C / q_total per coordinate (+ float32 products).
  return K * 2 * C / q_total + 1e-6


def test_a_site_above_max_weight_is_clipped_silently_by_flower_and_refused_by_jmtl():
  rng = np.random.default_rng(0)
  ns = [5000, 300, 40]  # site 0: 5x the default max_weight 1000
  deltas = [rng.uniform(-1, 1, 64).astype(np.float32) for _ in ns]
  deltas[0][:4] = [3.0, -3.0, 2.5, -2.0]  # 5000/1000 x 3 = 15 > 8: Flower clips it to 8
  ref = _weighted_mean(deltas, ns)
  got, q_total = _flower_secagg_mean(deltas, ns, 1000.0)
  # The evidence: Flower's result is wrong (by ~ 7/5 x 5000/5340 on those coordinates).
  assert np.abs(got - ref)[:2].min() > 1.0
  # jmtl's site refuses before the mod clips, naming the key and the value that fits.
  with pytest.raises(flower.SecAggRangeError, match="secagg-max-weight to >= 1875") as e:
    flower.secagg_check([deltas[0]], ns[0], 1000.0, C, Q, site="a")
  assert str(e.value).startswith(flower.SECAGG_REFUSAL) and "'a'" in str(e.value)
  for k in (1, 2):  # the others fit
    assert flower.secagg_check([deltas[k]], ns[k], 1000.0, C, Q) <= C
  # With the suggested max_weight (5000 x 3 / 8) the check passes and the mean is right.
  assert flower.secagg_check([deltas[0]], ns[0], 1875.0, C, Q) == pytest.approx(8.0)
  got, q_total = _flower_secagg_mean(deltas, ns, 1875.0)
  np.testing.assert_allclose(got, ref, rtol=0, atol=_bound(q_total, 3))


def test_a_site_above_max_weight_with_small_deltas_is_exact():
  """n_k > max_weight only scales the site's values up (and the weights' grid is finer): when
  n_k / max_weight x |delta_k| <= 8 nothing is clipped and the sum is the weighted sum."""
  rng = np.random.default_rng(1)
  ns = [5000, 300, 40]
  deltas = [rng.uniform(-0.5, 0.5, 256).astype(np.float32) for _ in ns]  # 5 x 0.5 = 2.5 <= 8
  for x, n in zip(deltas, ns):
    flower.secagg_check([x], n, 1000.0, C, Q)
  got, q_total = _flower_secagg_mean(deltas, ns, 1000.0)
  assert q_total == sum(round(n / 1000 * Q) for n in ns) < M
  np.testing.assert_allclose(got, _weighted_mean(deltas, ns), rtol=0, atol=_bound(q_total, 3))


def test_precision_follows_max_weight():
  """The error bound K 2C max_weight / (Q sum n_k): a 1000x larger max_weight, 1000x coarser."""
  rng = np.random.default_rng(2)
  ns = [20, 30, 25]
  deltas = [rng.uniform(-0.5, 0.5, 4096).astype(np.float32) for _ in ns]
  ref = _weighted_mean(deltas, ns)
  errs = {}
  for w in (100.0, 1e5):
    got, q_total = _flower_secagg_mean(deltas, ns, w)
    assert _bound(q_total, 3) == pytest.approx(3 * 2 * C * w / (Q * sum(ns)) + 1e-6, rel=1e-3)
    errs[w] = np.abs(got - ref).max()
    assert errs[w] <= _bound(q_total, 3)
  assert errs[1e5] > 100 * errs[100.0]


def test_refused_zero_weight_and_non_finite():
  x = [np.ones(3, np.float32)]
  with pytest.raises(flower.SecAggRangeError, match="weight 0"):  # round(1e-7 x 2**22) = 0
    flower.secagg_check(x, 1, 1e7, C, Q)
  with pytest.raises(flower.SecAggRangeError, match="not finite"):
    flower.secagg_check([np.array([0.1, np.nan], np.float32)], 10, 1000.0, C, Q)
  assert flower.secagg_check(x, 0, 1000.0, C, Q) == 0.0  # n_k = 0 weighs nothing: fine


def test_refusals_are_read_from_flowers_failures():
  msg = f"{flower.SECAGG_REFUSAL}: site 'a': n_k = 5000 examples x ..."
  # What the SuperNode sends for an exception raised in the ClientApp (run_clientapp.py).
  reason = str(type(flower.SecAggRangeError())) + ":<'" + msg + "'>"
  failures = [Exception(Error(code=2, reason=reason)), Exception(Error(code=3, reason="lost"))]
  assert flower.secagg_refusals(failures) == [msg]
  assert flower.secagg_refusals([Exception(Error(code=3, reason="timeout"))]) == []


def test_max_weight_run_config_key():
  assert flower.secagg_max_weight({}) == 1000.0
  assert flower.secagg_max_weight({"secagg-max-weight": 250000.0}) == 250000.0
  for bad in (-1.0, float("inf"), "abc"):  # one line naming the key, not float()'s error
    with pytest.raises(ValueError, match="secagg-max-weight"):
      flower.secagg_max_weight({"secagg-max-weight": bad})
