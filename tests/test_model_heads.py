"""Heads and the multi-task model: numpy references, span masking, outputs, functional dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmtl.model import layers
from jmtl.model.heads import ClassificationHead, SpanHead
from jmtl.model.multitask import HeadSpec, MultiTaskModel

from test_model_trunk import ALL_HEADS, B, L, VOCAB, batch_arrays, tiny_cfg

T = 5


def full_batch():
  ids, seg, mask = batch_arrays()
  context = mask.copy()
  context[:, :3] = 0  # question part
  rng = np.random.default_rng(1)
  return dict(input_ids=ids, segment_ids=seg, attention_mask=mask, context_mask=context,
              decoder_input_ids=rng.integers(1, VOCAB, (B, T)).astype(np.int32),
              example_weight=np.ones(B, np.float32))


def _np(v):
  return np.asarray(v.get_value(), np.float64)


def test_classification_first_pooling_matches_numpy():
  head = ClassificationHead(16, 3, pooling="first", dropout=0.1, rngs=nnx.Rngs(0))
  h = np.random.default_rng(0).normal(size=(B, L, 16)).astype(np.float32)
  mask = np.ones((B, L), np.int32)
  got = np.asarray(head(jnp.asarray(h), mask, deterministic=True))
  pooled = np.tanh(h[:, 0] @ _np(head.pooler.kernel) + _np(head.pooler.bias))
  ref = pooled @ _np(head.classifier.kernel) + _np(head.classifier.bias)
  assert got.shape == (B, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_classification_mean_pooling_matches_numpy_and_ignores_padding():
  head = ClassificationHead(16, 1, pooling="mean", dropout=0.1, rngs=nnx.Rngs(0))
  h = np.random.default_rng(0).normal(size=(B, L, 16)).astype(np.float32)
  mask = np.array([[1] * L, [1] * 3 + [0] * 5], np.int32)
  got = np.asarray(head(jnp.asarray(h), mask, deterministic=True))
  means = np.stack([h[0].mean(0), h[1, :3].mean(0)])
  ref = means @ _np(head.classifier.kernel) + _np(head.classifier.bias)
  assert got.shape == (B, 1)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_span_head_masks_outside_context_except_cls():
  head = SpanHead(16, rngs=nnx.Rngs(0))
  h = np.random.default_rng(0).normal(size=(B, L, 16)).astype(np.float32)
  mask = np.array([[1] * L, [1] * 6 + [0] * 2], np.int32)
  context = np.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
  start, end = (np.asarray(x) for x in head(jnp.asarray(h), mask, context))
  raw = h @ _np(head.qa_outputs.kernel) + _np(head.qa_outputs.bias)  # [B, L, 2]
  allowed = np.array([[1, 0, 0, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 0, 0]], bool)
  for got, col in ((start, 0), (end, 1)):
    assert got.shape == (B, L) and got.dtype == np.float32
    np.testing.assert_allclose(got[allowed], raw[..., col][allowed], atol=1e-5)
    assert np.all(got[~allowed] == layers.NEG_INF)


@pytest.mark.parametrize("trunk_kind", ["transformer", "bilstm"])
def test_multitask_outputs_for_every_head_kind(trunk_kind):
  model = MultiTaskModel(tiny_cfg(trunk=trunk_kind), VOCAB, ALL_HEADS, rngs=nnx.Rngs(0))
  assert isinstance(model.heads, nnx.Dict) and set(model.heads) == set(ALL_HEADS)
  batch = full_batch()
  shapes = {"cls": {"logits": (B, 3)}, "reg": {"logits": (B, 1)},
            "qa": {"start_logits": (B, L), "end_logits": (B, L)},
            "sum": {"logits": (B, T, VOCAB)}}
  run = nnx.jit(lambda m, b: {t: m(b, task=t, deterministic=True) for t in shapes})
  outs = run(model, batch)
  for task, expected in shapes.items():
    out = outs[task]
    assert {k: v.shape for k, v in out.items()} == expected, task
    assert all(v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all()
               for v in out.values()), task


def test_dropout_is_functional_after_split_merge():
  model = MultiTaskModel(tiny_cfg(), VOCAB, {"cls": HeadSpec("classification", 3),
                                             "qa": HeadSpec("span_qa", 0)}, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest)  # no RNG (or any other) state stored in the model
  batch = full_batch()

  @jax.jit
  def run(params, rest, batch, key):
    m = nnx.merge(graphdef, params, rest)
    train = m(batch, task="cls", deterministic=False, rngs=nnx.Rngs(dropout=key))
    evals = m(batch, task="cls", deterministic=True)
    return train["logits"], evals["logits"]

  a1, e1 = run(params, rest, batch, jax.random.key(1))
  a1b, _ = run(params, rest, batch, jax.random.key(1))
  a2, e2 = run(params, rest, batch, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a1b))
  assert np.abs(np.asarray(a1) - np.asarray(a2)).max() > 1e-4
  assert np.abs(np.asarray(a1) - np.asarray(e1)).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  eager = model(batch, task="cls", deterministic=True)["logits"]
  np.testing.assert_allclose(np.asarray(e1), np.asarray(eager), atol=1e-5)
  with pytest.raises(ValueError, match="rngs"):
    model(batch, task="cls", deterministic=False)


def test_multitask_bad_inputs_raise():
  cfg = tiny_cfg()
  with pytest.raises(ValueError, match="'a'.*num_labels"):
    MultiTaskModel(cfg, VOCAB, {"a": HeadSpec("classification", 1)}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'r'.*regression"):
    MultiTaskModel(cfg, VOCAB, {"r": HeadSpec("regression", 2)}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ranking"):
    MultiTaskModel(cfg, VOCAB, {"x": HeadSpec("ranking", 2)}, rngs=nnx.Rngs(0))
  model = MultiTaskModel(cfg, VOCAB, {"qa": HeadSpec("span_qa", 0)}, rngs=nnx.Rngs(0))
  batch = full_batch()
  with pytest.raises(KeyError, match="nope"):
    model(batch, task="nope", deterministic=True)
  del batch["context_mask"]
  with pytest.raises(KeyError, match="context_mask"):
    model(batch, task="qa", deterministic=True)
