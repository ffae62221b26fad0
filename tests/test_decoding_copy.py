"""Copy (pointer-generator) mechanism of Seq2SeqHead: parameters, the scatter, normalisation,
hand-built p_gen extremes, cached steps vs teacher forcing, the loss, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmtl.defaults import base_config
from jmtl.model import losses
from jmtl.model.decoder import COPY_EPS, Seq2SeqHead, copy_distribution

V, D, F, MAXLEN = 23, 32, 48, 16
B, S, T = 3, 7, 6


def _cfg(copy=True, **kw):
  c = base_config().model
  c.d_model, c.max_len = D, MAXLEN
  c.decoder.layers, c.decoder.heads, c.decoder.d_ff = 2, 4, F
  c.decoder.copy = copy
  for k, v in kw.items():
    setattr(c.decoder if k in ("tie_embeddings", "layers") else c, k, v)
  return c


def _build(seed=0, copy=True, **kw):
  """Head + embedding with O(1) random weights drawn by numpy (no per-shape init compiles)."""
  cfg = _cfg(copy, **kw)
  gdef, state = nnx.split(nnx.eval_shape(
      lambda: (Seq2SeqHead(cfg, V, rngs=nnx.Rngs(0)), nnx.Embed(V, D, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if "['scale']" in jax.tree_util.keystr(path) else 0.0  # LayerNorm scales
    return jnp.asarray(base + 0.3 * rng.normal(size=x.shape), x.dtype)

  return nnx.merge(gdef, jax.tree.map_with_path(fill, state))


def _inputs(seed):
  """Encoder states, mask (some padding), source ids with repeated tokens (PAD=0 on padding),
  decoder inputs."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  enc = jax.random.normal(k1, (B, S, D))
  lens = jnp.array([S, 4, 2])
  mask = (jnp.arange(S)[None, :] < lens[:, None]).astype(jnp.int32)
  src = jnp.where(mask == 1, jax.random.randint(k2, (B, S), 3, 9), 0).astype(jnp.int32)
  ids = jax.random.randint(k3, (B, T), 0, V)
  return enc, mask, src, ids


@nnx.jit
def _forward(head, enc, mask, ids, emb, src):
  return head(enc, mask, ids, embedding=emb, source_ids=src, deterministic=True)


@nnx.jit
def _step(head, static, cache, tok, t, emb):
  return head.decode_step(static, cache, tok, t, embedding=emb)


def _count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_copy_gate_parameters_and_axis_names():
  plain = nnx.eval_shape(lambda: Seq2SeqHead(_cfg(False), V, rngs=nnx.Rngs(0)))
  copy = nnx.eval_shape(lambda: Seq2SeqHead(_cfg(True), V, rngs=nnx.Rngs(0)))
  assert _count(copy) - _count(plain) == 3 * D + 1  # w over [h; context; x] and b
  assert "copy_gate" not in nnx.state(plain, nnx.Param)
  specs = nnx.get_partition_spec(nnx.state(copy, nnx.Param))
  assert specs["copy_gate"]["kernel"].get_value() == P(None, "embed", None)
  assert specs["copy_gate"]["bias"].get_value() == P(None)


def test_copy_distribution_matches_numpy_loop():
  rng = np.random.default_rng(0)
  w = rng.random((2, 3, 5)).astype(np.float32)
  src = np.array([[4, 1, 4, 4, 0], [2, 3, 1, 2, 6]], np.int32)  # repeated tokens add up
  got = np.asarray(jax.jit(copy_distribution, static_argnums=2)(w, src, 7))
  want = np.zeros((2, 3, 7))
  for b in range(2):
    for t in range(3):
      for s in range(5):
        want[b, t, src[b, s]] += w[b, t, s]
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_normalised_and_cached_steps_equal_teacher_forcing():
  # Pre-norm, untied as in the quickstart; post-norm / tied copying heads are compared with
  # naive decoding in test_decoding_search.py.
  head, emb = _build(seed=1, norm="pre", tie_embeddings=False)
  enc, mask, src, ids = _inputs(2)
  full = np.asarray(_forward(head, enc, mask, ids, emb, src))
  assert full.shape == (B, T, V) and full.dtype == np.float32
  # The outputs are log p for a normalised p (up to COPY_EPS per token) ...
  np.testing.assert_allclose(np.exp(full.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
  assert full.min() >= np.log(COPY_EPS) - 1e-3
  # ... so log_softmax leaves them unchanged and the usual loss applies as it is.
  np.testing.assert_allclose(jax.nn.log_softmax(full, axis=-1), full, atol=1e-6)
  static, cache = head.init_cache(enc, mask, 10, source_ids=src)
  for t in range(T):
    step, cache = _step(head, static, cache, ids[:, t], jnp.int32(t), emb)
    np.testing.assert_allclose(step, full[:, t], atol=1e-5, rtol=1e-5)


def _plain_twin(head, seed):
  """A copy=False head with the same parameters as `head` (all but the copy gate)."""
  plain, _ = _build(seed=seed + 1, copy=False)
  state = nnx.state(head)
  state.pop("copy_gate")
  nnx.update(plain, state)
  return plain


@pytest.mark.parametrize("bias", [-40.0, 0.0, 1.5, 40.0])
def test_hand_built_p_gen_and_uniform_attention(bias):
  # Zero copy-gate kernel: p_gen = sigmoid(bias) everywhere. Zero query projection in the
  # last layer's cross-attention: equal scores, so a = uniform over the real source tokens.
  # Then p(w) = p_gen * softmax(generator logits)(w) + (1 - p_gen) * count_w / n_real.
  head, emb = _build(seed=3)
  last = head.blocks[-1].cross_attn.query
  last.kernel[...] = jnp.zeros_like(last.kernel[...])
  last.bias[...] = jnp.zeros_like(last.bias[...])
  head.copy_gate.kernel[...] = jnp.zeros_like(head.copy_gate.kernel[...])
  head.copy_gate.bias[...] = jnp.full_like(head.copy_gate.bias[...], bias)
  plain = _plain_twin(head, 3)
  enc, mask, src, ids = _inputs(4)
  got = np.exp(np.asarray(_forward(head, enc, mask, ids, emb, src), np.float64))
  gen = np.exp(np.asarray(jax.nn.log_softmax(_forward(plain, enc, mask, ids, emb, None)),
                          np.float64))
  src, mask = np.asarray(src), np.asarray(mask)
  p_gen = 1.0 / (1.0 + np.exp(-bias))
  for b in range(B):
    real = src[b][mask[b] == 1]
    copy = np.bincount(real, minlength=V) / len(real)
    want = p_gen * gen[b] + (1.0 - p_gen) * copy[None, :]
    np.testing.assert_allclose(got[b], want + COPY_EPS, atol=1e-6)
  if bias < -30:  # p_gen = 0: all mass on the source's tokens, none on padding's PAD
    assert got[:, :, 0].max() < 1e-6 and got[:, :, 9:].max() < 1e-6


def test_loss_with_label_smoothing_and_gradient_to_the_gate():
  head, emb = _build(seed=5, layers=1)
  enc, mask, src, ids = _inputs(6)
  targets = jnp.roll(ids, -1, axis=1)
  batch = {"decoder_target_ids": targets, "decoder_mask": jnp.ones((B, T), jnp.int32),
           "example_weight": jnp.ones((B,), jnp.float32)}
  gdef, state = nnx.split(head)

  def loss_fn(state):
    h = nnx.merge(gdef, state)
    out = h(enc, mask, ids, embedding=emb, source_ids=src, deterministic=True)
    return losses.task_loss("seq2seq", {"logits": out}, batch, label_smoothing=0.1)[0], out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
  # Reference: smoothed cross-entropy against log p directly, q = 0.9 one-hot + 0.1 / V.
  logp = np.asarray(out, np.float64)
  q = 0.1 / V + 0.9 * np.eye(V)[np.asarray(targets)]
  np.testing.assert_allclose(float(loss), -(q * logp).sum(-1).mean(), rtol=1e-5)
  assert np.abs(np.asarray(grads["copy_gate"]["kernel"][...])).max() > 1e-6


def test_copy_needs_source_ids():
  head, emb = _build(seed=0)
  enc, mask, src, ids = _inputs(0)
  with pytest.raises(ValueError, match="source_ids"):
    head(enc, mask, ids, embedding=emb, deterministic=True)
  with pytest.raises(ValueError, match="source_ids"):
    head.init_cache(enc, mask, 8)
  with pytest.raises(ValueError, match="source_ids shape"):
    head(enc, mask, ids, embedding=emb, source_ids=src[:, :3], deterministic=True)
