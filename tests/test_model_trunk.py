"""Trunks: shapes, variants, padding invariance, rope, logical axis names, mesh sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmtl.defaults import base_config
from jmtl.model import layers
from jmtl.model.multitask import HeadSpec, MultiTaskModel, build_trunk

VOCAB = 40
B, L = 2, 8
RULES = tuple(base_config().mesh.rules)


def tiny_cfg(**overrides):
  cfg = base_config().model
  cfg.update(dict(layers=2, d_model=16, heads=2, d_ff=32, max_len=16, lstm_hidden=8,
                  lstm_layers=2, dropout=0.1, attention_dropout=0.1))
  cfg.decoder.update(dict(layers=1, heads=2, d_ff=32))
  cfg.update(overrides)
  return cfg


def batch_arrays(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, (B, L)).astype(np.int32)
  mask = np.array([[1] * L, [1] * 5 + [0] * 3], np.int32)
  seg = np.array([[0] * 4 + [1] * 4, [0] * 3 + [1] * 2 + [0] * 3], np.int32)
  return ids * mask, seg, mask


def forward(trunk, ids, seg, mask):
  return nnx.jit(lambda t, a, b, c: t(a, b, c, deterministic=True))(trunk, ids, seg, mask)


TRUNK_CASES = {
    "bert": dict(),
    "pre_rope_swiglu": dict(norm="pre", positions="rope", activation="swiglu"),
    "bilstm": dict(trunk="bilstm"),
}


@pytest.mark.parametrize("case", sorted(TRUNK_CASES))
def test_shape_and_padding_invariance(case):
  """Changing the tokens (and segments) at padded positions leaves real positions unchanged."""
  trunk = build_trunk(tiny_cfg(**TRUNK_CASES[case]), VOCAB, rngs=nnx.Rngs(0))
  ids, seg, mask = batch_arrays()
  out = np.asarray(forward(trunk, ids, seg, mask))
  assert out.shape == (B, L, 16) and out.dtype == np.float32 and np.isfinite(out).all()
  ids2, seg2 = ids.copy(), seg.copy()
  ids2[1, 5:] = [7, 11, 13]
  seg2[1, 5:] = 1
  out2 = np.asarray(forward(trunk, ids2, seg2, mask))
  np.testing.assert_allclose(out2[mask == 1], out[mask == 1], atol=1e-6)
  # ... while a change at a real position does change the (bidirectional) representations.
  ids3 = ids.copy()
  ids3[1, 4] = (ids3[1, 4] % (VOCAB - 1)) + 1
  out3 = np.asarray(forward(trunk, ids3, seg, mask))
  assert np.abs(out3[1, 0] - out[1, 0]).max() > 1e-4


@pytest.mark.parametrize("overrides", [
    dict(norm="pre", positions="rope", activation="swiglu", dtype="bfloat16"),
    dict(dtype="bfloat16"),
    dict(trunk="bilstm", dtype="bfloat16"),
])
def test_variants_finite_with_float32_params(overrides):
  trunk = build_trunk(tiny_cfg(**overrides), VOCAB, rngs=nnx.Rngs(1))
  ids, seg, mask = batch_arrays()
  out = forward(trunk, ids, seg, mask)
  assert out.shape == (B, L, 16) and out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out, np.float32)).all()
  params = jax.tree.leaves(nnx.state(trunk, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None]
  got = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(pos)))
  # numpy: rotate pairs (i, i + 4) by angle p * 10000^(-2i/8).
  theta = pos[0][:, None] * 10000.0 ** (-np.arange(4) * 2 / 8)
  c, s = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
  ref = np.concatenate([x[..., :4] * c - x[..., 4:] * s, x[..., 4:] * c + x[..., :4] * s], -1)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  # q.k depends only on the offset: positions (1, 3) and (2, 4) give the same products.
  q = np.broadcast_to(x[:, :1], x.shape)
  k = np.broadcast_to(x[:, 1:2], x.shape)
  rq, rk = np.asarray(layers.rope(q, pos)), np.asarray(layers.rope(k, pos))
  dot = lambda i, j: np.sum(rq[0, i] * rk[0, j], -1)  # noqa: E731
  np.testing.assert_allclose(dot(1, 3), dot(2, 4), atol=1e-5)
  assert np.abs(dot(1, 3) - dot(1, 4)).max() > 1e-3


def test_bad_config_values_raise():
  with pytest.raises(ValueError, match="norm"):
    build_trunk(tiny_cfg(norm="middle"), VOCAB, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible"):
    build_trunk(tiny_cfg(heads=3), VOCAB, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="trunk"):
    build_trunk(tiny_cfg(trunk="cnn"), VOCAB, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    trunk = build_trunk(tiny_cfg(max_len=4), VOCAB, rngs=nnx.Rngs(0))
    trunk(*batch_arrays(), deterministic=True)


ALL_HEADS = {"cls": HeadSpec("classification", 3), "reg": HeadSpec("regression", 1),
             "qa": HeadSpec("span_qa", 0), "sum": HeadSpec("seq2seq", 0)}


@pytest.mark.parametrize("trunk_kind", ["transformer", "bilstm"])
def test_every_param_has_logical_axis_names(trunk_kind):
  model = nnx.eval_shape(lambda: MultiTaskModel(
      tiny_cfg(trunk=trunk_kind), VOCAB, ALL_HEADS, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) > 10
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{path} has no logical axis names"
    assert len(names) == len(var.shape), f"{path}: names {names} vs shape {var.shape}"
    assert all(n is None or n in layers.LOGICAL_AXES for n in names), (path, names)
    assert any(n is not None for n in names), path
  specs = nnx.get_partition_spec(nnx.state(model.trunk, nnx.Param))
  assert specs["token_embedding"]["embedding"].get_value() == jax.P("vocab", "embed")


def test_logical_to_spec_and_constrain_without_mesh():
  x = jnp.ones((2, 3, 4))
  assert layers.logical_to_spec(("batch", "length", "embed")) is None
  assert layers.constrain(x, ("batch", "length", "embed")) is x
  with nnx.logical_axis_rules(RULES):  # rules but no mesh: still a no-op
    assert layers.constrain(x, ("batch", "length", "embed")) is x


def _mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_logical_to_spec_on_mesh():
  with jax.set_mesh(_mesh()), nnx.logical_axis_rules(RULES):
    # batch takes (data, fsdp), so embed cannot reuse fsdp in the same array.
    assert layers.logical_to_spec(("batch", "length", "embed")) == jax.P(("data", "fsdp"),
                                                                         None, None)
    assert layers.logical_to_spec(("batch", "length", "mlp")) == jax.P(("data", "fsdp"), None,
                                                                       "tensor")
    assert layers.logical_to_spec(("vocab", "embed")) == jax.P("tensor", "fsdp")


def test_built_and_called_on_a_mesh_matches_no_mesh():
  heads = {"cls": HeadSpec("classification", 2), "qa": HeadSpec("span_qa", 0)}
  cfg = tiny_cfg(layers=1)
  ids, seg, mask = batch_arrays()
  ids, seg, mask = (np.concatenate([a, a]) for a in (ids, seg, mask))  # 4 rows
  batch = dict(input_ids=ids, segment_ids=seg, attention_mask=mask, context_mask=mask)

  def run(model):
    g, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params, rest, batch, key):
      m = nnx.merge(g, params, rest)
      det = m(batch, task="qa", deterministic=True)
      drop = m(batch, task="cls", deterministic=False, rngs=nnx.Rngs(dropout=key))
      return det, drop
    return f(params, rest, batch, jax.random.key(3))

  ref_det, ref_drop = run(MultiTaskModel(cfg, VOCAB, heads, rngs=nnx.Rngs(0)))
  with jax.set_mesh(_mesh()), nnx.logical_axis_rules(RULES):
    model = MultiTaskModel(cfg, VOCAB, heads, rngs=nnx.Rngs(0))
    emb = model.trunk.token_embedding.embedding.get_value()
    assert emb.sharding.spec == jax.P("tensor", "fsdp")
    ffn = model.trunk.layers[0].ffn.wi.kernel.get_value()
    assert ffn.sharding.spec == jax.P("fsdp", "tensor")
    det, drop = run(model)
  np.testing.assert_allclose(np.asarray(det["start_logits"]),
                             np.asarray(ref_det["start_logits"]), atol=1e-5)
  assert drop["logits"].shape == (4, 2) and np.isfinite(np.asarray(drop["logits"])).all()
