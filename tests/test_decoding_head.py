"""Seq2SeqHead: parameter counts, logical axes, cached steps vs teacher forcing, dropout, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jmtl.defaults import base_config
from jmtl.model.decoder import Seq2SeqHead

V, D, F, MAXLEN = 23, 32, 48, 16


def _cfg(**kw):
  c = base_config().model
  c.d_model, c.max_len = D, MAXLEN
  c.decoder.layers, c.decoder.heads, c.decoder.d_ff = 2, 4, F
  for k, v in kw.items():
    if k.startswith("decoder_"):
      setattr(c.decoder, k[len("decoder_"):], v)
    else:
      setattr(c, k, v)
  return c


def _build(seed=0, **kw):
  """Head + embedding with random weights drawn by numpy (the structure comes from
  nnx.eval_shape; this avoids compiling the initialisers for every parameter shape)."""
  cfg = _cfg(**kw)
  gdef, state = nnx.split(nnx.eval_shape(
      lambda: (Seq2SeqHead(cfg, V, rngs=nnx.Rngs(0)), nnx.Embed(V, D, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if "['scale']" in jax.tree_util.keystr(path) else 0.0  # LayerNorm scales
    return jnp.asarray(base + 0.2 * rng.normal(size=x.shape), x.dtype)

  return nnx.merge(gdef, jax.tree.map_with_path(fill, state))


@nnx.jit
def _forward(head, enc, mask, ids, emb):
  return head(enc, mask, ids, embedding=emb, deterministic=True)


@nnx.jit
def _step(head, static, cache, tok, t, emb):
  return head.decode_step(static, cache, tok, t, embedding=emb)


def _count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _encoder(seed, b=3, length=7):
  k1, k2 = jax.random.split(jax.random.key(seed))
  enc = jax.random.normal(k1, (b, length, D))
  lens = jax.random.randint(k2, (b,), 2, length + 1)
  mask = (jnp.arange(length)[None, :] < lens[:, None]).astype(jnp.int32)
  return enc, mask


def _expected_params(activation="gelu", tied=True, layers=2):
  """Hand count: 4 projections (D*D + D) per attention, 2 attentions, FFN, 3 LayerNorms."""
  attn = 4 * (D * D + D)
  ffn = D * F + F + F * D + D + (D * F + F if activation == "swiglu" else 0)
  block = 2 * attn + ffn + 3 * 2 * D
  total = layers * block + MAXLEN * D + 2 * D
  return total if tied else total + 2 * V * D


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_parameter_counts_tied_vs_untied(activation):
  tied, _ = _build(activation=activation, decoder_tie_embeddings=True)
  untied, _ = _build(activation=activation, decoder_tie_embeddings=False)
  assert _count(tied) == _expected_params(activation, tied=True)
  assert _count(untied) == _expected_params(activation, tied=False)
  assert _count(untied) - _count(tied) == 2 * V * D


def test_logical_axis_names():
  # Without a mesh, parameters only record their logical axis names (abstract build: the
  # names do not depend on the values; test_built_sharded_under_mesh_with_rules builds for real).
  head = nnx.eval_shape(lambda: Seq2SeqHead(_cfg(decoder_tie_embeddings=False), V,
                                            rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(head, nnx.Param))
  blk = specs["blocks"][0]
  assert blk["self_attn"]["query"]["kernel"].get_value() == P("embed", "heads", "kv")
  assert blk["self_attn"]["query"]["bias"].get_value() == P("heads", "kv")
  assert blk["cross_attn"]["out"]["kernel"].get_value() == P("heads", "kv", "embed")
  assert blk["ffn"]["wi"]["kernel"].get_value() == P("embed", "mlp")
  assert blk["ffn"]["wo"]["kernel"].get_value() == P("mlp", "embed")
  assert blk["norm_ffn"]["scale"].get_value() == P("embed")
  assert specs["token_embedding"]["embedding"].get_value() == P("vocab", "embed")
  assert specs["output"]["kernel"].get_value() == P("embed", "vocab")
  assert specs["positions"]["embedding"].get_value() == P("length", "embed")
  # Every parameter is annotated with one logical name per dimension.
  for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.get_value().ndim, path


def test_built_sharded_under_mesh_with_rules():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = base_config().mesh.rules  # embed->fsdp, heads/mlp/vocab->tensor, kv/length->None
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    head = Seq2SeqHead(_cfg(decoder_tie_embeddings=False), 24, rngs=nnx.Rngs(0))
  q = head.blocks[0].self_attn.query.kernel.get_value()
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert head.token_embedding.embedding.get_value().sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("norm,activation,tied", [("post", "gelu", True),
                                                  ("pre", "swiglu", False)])
def test_cached_steps_equal_teacher_forcing(norm, activation, tied):
  head, emb = _build(seed=1, norm=norm, activation=activation, decoder_tie_embeddings=tied)
  enc, mask = _encoder(2)
  ids = jax.random.randint(jax.random.key(3), (3, 9), 0, V)
  full = _forward(head, enc, mask, ids, emb)
  assert full.shape == (3, 9, V) and full.dtype == jnp.float32
  static, cache = head.init_cache(enc, mask, 12)
  for t in range(9):
    step, cache = _step(head, static, cache, ids[:, t], jnp.int32(t), emb)
    np.testing.assert_allclose(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_causal_and_encoder_padding():
  head, emb = _build(seed=4)
  enc, mask = _encoder(5)
  ids = jax.random.randint(jax.random.key(6), (3, 6), 0, V)
  base = _forward(head, enc, mask, ids, emb)
  # Changing a later decoder token leaves earlier positions unchanged.
  ids2 = ids.at[:, 4].set((ids[:, 4] + 1) % V)
  out2 = _forward(head, enc, mask, ids2, emb)
  np.testing.assert_allclose(out2[:, :4], base[:, :4], atol=1e-6)
  assert np.abs(out2[:, 4:] - base[:, 4:]).max() > 1e-4
  # Changing padded encoder positions changes nothing; changing a real one does.
  enc_pad = jnp.where(mask[:, :, None] == 1, enc, 100.0)
  np.testing.assert_allclose(_forward(head, enc_pad, mask, ids, emb), base, atol=1e-6)
  enc_real = enc.at[:, 0].add(1.0)
  assert np.abs(_forward(head, enc_real, mask, ids, emb) - base).max() > 1e-4


def test_tied_head_uses_the_given_embedding():
  head, emb = _build(seed=7, decoder_tie_embeddings=True)
  enc, mask = _encoder(8)
  ids = jax.random.randint(jax.random.key(9), (3, 5), 3, V)  # tokens 0..2 never input
  base = np.asarray(_forward(head, enc, mask, ids, emb))
  # Output side: logits[..., w] = h . E[w], so moving row 1 changes column 1 only.
  emb.embedding[...] = emb.embedding[...].at[1].add(0.5)
  moved = np.asarray(_forward(head, enc, mask, ids, emb))
  np.testing.assert_allclose(np.delete(moved, 1, -1), np.delete(base, 1, -1), atol=1e-6)
  assert np.abs(moved[..., 1] - base[..., 1]).min() > 0
  # Input side: moving the row of an input token changes the logits.
  emb.embedding[...] = emb.embedding[...].at[ids[0, 0]].add(0.5)
  assert np.abs(np.asarray(_forward(head, enc, mask, ids, emb)) - moved).max() > 1e-3
  with pytest.raises(ValueError, match="tie_embeddings"):
    head(enc, mask, ids, embedding=None, deterministic=True)
  wrong = nnx.Embed(V + 1, D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocab_size"):
    head(enc, mask, ids, embedding=wrong, deterministic=True)


def test_dropout_rngs_at_call_time_under_jit():
  head, emb = _build(seed=10, dropout=0.3, attention_dropout=0.3, decoder_layers=1)
  enc, mask = _encoder(11)
  ids = jax.random.randint(jax.random.key(12), (3, 5), 0, V)
  gdef, state = nnx.split(head)

  @jax.jit
  def run(state, key):
    h = nnx.merge(gdef, state)
    det = h(enc, mask, ids, embedding=emb, deterministic=True)
    drop = h(enc, mask, ids, embedding=emb, deterministic=False, rngs=nnx.Rngs(dropout=key))
    return det, drop

  key = lambda seed: jax.random.key(seed, impl="rbg")  # compiles much faster than threefry
  det, a = run(state, key(0))
  _, b = run(state, key(0))
  _, c = run(state, key(1))
  np.testing.assert_allclose(det, _forward(head, enc, mask, ids, emb), atol=1e-5)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - det).max() > 1e-3
  with pytest.raises(ValueError, match="rngs"):
    head(enc, mask, ids, embedding=emb, deterministic=False)


def test_bad_config_errors():
  with pytest.raises(ValueError, match="divisible"):
    _build(decoder_heads=5)
  with pytest.raises(ValueError, match="model.norm"):
    _build(norm="sandwich")
  with pytest.raises(ValueError, match="model.activation"):
    _build(activation="relu6")
  head, emb = _build()
  enc, mask = _encoder(0)
  with pytest.raises(ValueError, match="max_len"):
    head(enc, mask, jnp.zeros((3, MAXLEN + 1), jnp.int32), embedding=emb, deterministic=True)
