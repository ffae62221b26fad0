"""task_loss against numpy re-implementations of the published definitions."""

import numpy as np
import pytest

from jmtl.model.losses import task_loss

RNG = np.random.default_rng(0)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_classification_weighted_cross_entropy():
  logits = RNG.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, -1], np.int32)  # -1 = unlabelled: ignored
  w = np.array([1.0, 0.5, 0.0, 1.0], np.float32)
  loss, aux = task_loss("classification", {"logits": logits},
                        {"labels": labels, "example_weight": w})
  nll = -np_log_softmax(logits.astype(np.float64))[np.arange(3), labels[:3]]
  ref = (nll * w[:3]).sum() / w[:3].sum()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(aux["weight"]) == pytest.approx(1.5)
  correct = (logits[:3].argmax(-1) == labels[:3]).astype(float)
  assert float(aux["accuracy"]) == pytest.approx((correct * w[:3]).sum() / 1.5)


def test_regression_weighted_mse():
  pred = np.array([[0.5], [2.0], [-1.0]], np.float32)
  labels = np.array([1.0, 2.5, 3.0], np.float32)
  w = np.array([1.0, 1.0, 2.0], np.float32)
  loss, _ = task_loss("regression", {"logits": pred}, {"labels": labels, "example_weight": w})
  # (0.25 + 0.25 + 2 * 16) / 4
  assert float(loss) == pytest.approx((0.25 + 0.25 + 32.0) / 4.0)


def test_span_qa_mean_of_start_and_end_cross_entropy():
  start = RNG.normal(size=(3, 6)).astype(np.float32)
  end = RNG.normal(size=(3, 6)).astype(np.float32)
  start[:, 4:] = -1e9  # masked positions as the span head produces them
  s_pos, e_pos = np.array([1, 0, 3]), np.array([2, 0, 3])
  w = np.array([1.0, 1.0, 0.0], np.float32)
  loss, aux = task_loss("span_qa", {"start_logits": start, "end_logits": end},
                        {"start_positions": s_pos, "end_positions": e_pos, "example_weight": w})
  ls, le = np_log_softmax(start.astype(np.float64)), np_log_softmax(end.astype(np.float64))
  per = -0.5 * (ls[np.arange(3), s_pos] + le[np.arange(3), e_pos])
  np.testing.assert_allclose(float(loss), (per * w).sum() / w.sum(), rtol=1e-5)
  assert np.isfinite(float(aux["accuracy"]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_seq2seq_token_cross_entropy_with_label_smoothing(smoothing):
  b, t, v = 2, 4, 7
  logits = RNG.normal(size=(b, t, v)).astype(np.float32)
  targets = RNG.integers(0, v, (b, t)).astype(np.int32)
  dmask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
  w = np.array([1.0, 2.0], np.float32)
  loss, aux = task_loss("seq2seq", {"logits": logits},
                        {"decoder_target_ids": targets, "decoder_mask": dmask,
                         "example_weight": w}, label_smoothing=smoothing)
  # smoothed target: (1 - a) one_hot + a / V (Szegedy et al. 2016)
  q = np.eye(v)[targets] * (1 - smoothing) + smoothing / v
  per = -(q * np_log_softmax(logits.astype(np.float64))).sum(-1)
  tw = dmask * w[:, None]
  np.testing.assert_allclose(float(loss), (per * tw).sum() / tw.sum(), rtol=1e-5)
  assert float(aux["weight"]) == pytest.approx(3 * 1 + 2 * 2)


def test_all_zero_weights_give_zero_not_nan():
  loss, aux = task_loss("classification", {"logits": np.zeros((2, 3), np.float32)},
                        {"labels": np.array([0, 1]), "example_weight": np.zeros(2, np.float32)})
  assert float(loss) == 0.0 and float(aux["weight"]) == 0.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="kind"):
    task_loss("ranking", {}, {"example_weight": np.ones(1)})
  with pytest.raises(KeyError, match="labels"):
    task_loss("classification", {"logits": np.zeros((1, 2))}, {"example_weight": np.ones(1)})
