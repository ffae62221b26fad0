"""Every registry name builds, inits (sharded like the params) and updates under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jmtl.defaults import base_config
from jmtl.optim import NAMES, build, eval_params

SPECS = {"w": P("data", "fsdp"), "emb": P(None, "fsdp"), "b": P("fsdp"), "gain": P()}
SHAPES = {"w": (8, 16), "emb": (256, 256), "b": (16,), "gain": ()}  # emb: sampled cautious count


def _cfg(name, **kw):
  c = base_config().optim
  c.name = name
  c.warmup_steps = 2
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def sharded():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  params = {k: jax.device_put(jnp.asarray(rng.normal(size=s), jnp.float32),
                              NamedSharding(mesh, SPECS[k])) for k, s in SHAPES.items()}
  grads = {k: jax.device_put(jnp.asarray(rng.normal(size=s), jnp.float32),
                             NamedSharding(mesh, SPECS[k])) for k, s in SHAPES.items()}
  return mesh, params, grads


def test_names():
  expected = {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion",
              "lamb", "adafactor", "schedule_free_adamw", "paper_adaptive", "jmtl_adaptive"}
  assert set(NAMES) == expected


@pytest.mark.parametrize("name", NAMES)
def test_build_init_update_sharded(name, sharded):
  mesh, params, grads = sharded
  tx = build(_cfg(name), total_steps=10)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = jax.jit(tx.init)(params)
  # Every state leaf that belongs to a parameter and has its shape has its sharding.
  matched = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    key = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
    if key in params and leaf.shape == params[key].shape:
      assert leaf.sharding.is_equivalent_to(params[key].sharding, leaf.ndim), (name, path)
      matched += 1
    else:
      assert leaf.sharding.mesh == mesh, (name, path, leaf.sharding)  # on the mesh, not device 0
  # sgd keeps no per-parameter state; adafactor factors `emb` into row/column statistics.
  expected = {"sgd": 0, "adafactor": len(params) - 1}.get(name, len(params))
  assert matched >= expected, (name, matched)
  traces = []

  def step(g, s, p, x, n):
    traces.append(1)
    return tx.update(g, s, p, val_metric=x, val_count=n)

  step = jax.jit(step)
  p = params
  for i in range(3):
    u, state = step(grads, state, p, jnp.float32(50.0 - i), jnp.int32(i))
    p = optax.apply_updates(p, u)
  assert len(traces) == 1
  for k in params:
    assert np.all(np.isfinite(np.asarray(p[k]))), (name, k)
    assert not np.array_equal(np.asarray(p[k]), np.asarray(params[k])), (name, k)


def test_adamw_matches_optax_chain():
  """Registry adamw = clip_by_global_norm + optax.adamw with the linear warmup schedule."""
  c = _cfg("adamw", lr=0.01, grad_clip=0.5, weight_decay=0.1)
  sched = lambda t: 0.01 * jnp.where(t < 2, (t + 1.0) / 2.0, 1.0 - (t - 2.0) / 8.0)
  ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(sched, weight_decay=0.1))
  tx = build(c, 10)
  rng = np.random.default_rng(1)
  p = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  s, rs = tx.init(p), ref.init(p)
  for _ in range(4):
    g = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    u, s = tx.update(g, s, p, val_metric=0.0, val_count=0)
    ru, rs = ref.update(g, rs, p)
    np.testing.assert_allclose(u["a"], ru["a"], rtol=1e-6, atol=1e-9)
    p = optax.apply_updates(p, u)


def test_schedule_free_eval_params():
  tx = build(_cfg("schedule_free_adamw", warmup_steps=0), 10)
  p = {"a": jnp.ones((3,))}
  s = tx.init(p)
  for _ in range(3):
    u, s = tx.update({"a": jnp.array([1.0, -2.0, 0.5])}, s, p, val_metric=0.0, val_count=0)
    p = optax.apply_updates(p, u)
  ev = eval_params(s, p)
  sf_state = next(x for x in jax.tree.leaves(
      s, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState))
      if isinstance(x, optax.contrib.ScheduleFreeState))
  np.testing.assert_allclose(ev["a"], optax.contrib.schedule_free_eval_params(sf_state, p)["a"])
  assert not np.allclose(ev["a"], p["a"])  # the averaged point differs from the train point
  adam_state = build(_cfg("adam"), 10).init(p)
  assert eval_params(adam_state, p) is p


def test_server_optimizer_without_metric():
  """As a federated server optimizer: applied to a pseudo-gradient, no validation args."""
  tx = build(_cfg("jmtl_adaptive", grad_clip=0.0), 4)
  p = {"a": jnp.ones((4,))}
  s = tx.init(p)
  pseudo_grad = {"a": jnp.array([0.1, -0.2, 0.3, -0.4])}
  u, s = jax.jit(tx.update)(pseudo_grad, s, p)
  assert np.all(np.sign(np.asarray(u["a"])) == -np.sign(np.asarray(pseudo_grad["a"])))


@pytest.mark.parametrize("name", ["paper_adaptive", "jmtl_adaptive", "adamw"])
def test_python_scalar_extra_args(name):
  tx = build(_cfg(name), 4)
  p = {"a": jnp.ones((4,))}
  u, s = tx.update({"a": jnp.ones((4,))}, tx.init(p), p, val_metric=1.0, val_count=1)
  assert np.all(np.asarray(u["a"]) < 0)


def test_unknown_name_lists_known():
  with pytest.raises(KeyError, match="adamw.*jmtl_adaptive"):
    build(_cfg("adamx"), 10)


def test_bad_values():
  with pytest.raises(ValueError, match="grad_clip"):
    build(_cfg("adam", grad_clip=-1.0), 10)
  with pytest.raises(ValueError, match="total_steps"):
    build(_cfg("adam"), 0)
  with pytest.raises(ValueError, match="schedule"):
    build(_cfg("jmtl_adaptive", schedule="step"), 10)
  with pytest.raises(ValueError, match="update_clip"):
    build(_cfg("jmtl_adaptive", update_clip=-1.0), 10)
  with pytest.raises(KeyError, match="optim.name"):
    build({"lr": 1.0}, 10)


def test_clip_by_global_norm_matches_the_rule_and_optax():
  from jmtl.optim import clipping
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # ||g|| = 13
  out, _ = clipping.clip_by_global_norm(6.5).update(g, optax.EmptyState())
  np.testing.assert_allclose(out["a"], [1.5, 2.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[6.0]], rtol=1e-6)
  ref, _ = optax.clip_by_global_norm(6.5).update(g, optax.EmptyState())
  for k in g:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6)
  same, _ = clipping.clip_by_global_norm(20.0).update(g, optax.EmptyState())  # below the norm
  np.testing.assert_array_equal(same["a"], g["a"])
  zero, _ = clipping.clip_by_global_norm(1.0).update({"a": jnp.zeros(3)}, optax.EmptyState())
  np.testing.assert_array_equal(zero["a"], np.zeros(3))


DECAYING = ("adamw", "lion", "lamb", "adafactor", "schedule_free_adamw", "paper_adaptive",
            "jmtl_adaptive")


@pytest.mark.parametrize("name", DECAYING)
@pytest.mark.parametrize("mask", ["all", "matrices"])
def test_weight_decay_mask(name, mask):
  """With zero gradients only weight decay moves a parameter: under "matrices" the kernel
  (ndim 2) moves and the bias and scalar (ndim < 2) stay exactly where they are."""
  c = _cfg(name, weight_decay=0.1, weight_decay_mask=mask, warmup_steps=0, schedule="constant",
           lr=0.1)
  tx = build(c, 10)
  params = {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0), "gain": jnp.float32(2.0)}
  grads = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  p = params
  for _ in range(2):
    u, state = tx.update(grads, state, p, val_metric=0.0, val_count=0)
    p = optax.apply_updates(p, u)
  p = eval_params(state, p)
  assert np.all(np.asarray(p["kernel"]) < 2.0), name
  for k in ("bias", "gain"):
    moved = np.asarray(p[k]) != 2.0
    assert np.all(moved) if mask == "all" else not np.any(moved), (name, mask, k, p[k])


def test_weight_decay_mask_on_nnx_params():
  from flax import nnx
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  model.bias.set_value(jnp.ones((2,)))  # non-zero, so decay would move it
  _, params = nnx.split(model, nnx.Param)
  tx = build(_cfg("adamw", weight_decay=0.5, weight_decay_mask="matrices", warmup_steps=0), 10)
  grads = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(u["kernel"][...]) != 0) and np.all(np.asarray(u["bias"][...]) == 0)


def test_bad_weight_decay_mask_names_the_key():
  with pytest.raises(ValueError, match="optim.weight_decay_mask.*'some'"):
    build(_cfg("adamw", weight_decay_mask="some"), 10)


def test_block_nu_state_sharded_on_the_output_axis():
  """block_nu's per-neuron second moment (shape (1, ..., outputs)) keeps the kernel's mesh axis
  on its output axis when the init is jitted without explicit shardings (federated `fed.init`)."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  specs = {"dense": {"kernel": P("data", "fsdp")}, "attn": {"kernel": P("data", None, "fsdp")},
           "bias": P("fsdp")}
  shapes = {"dense": {"kernel": (8, 16)}, "attn": {"kernel": (4, 6, 8)}, "bias": (16,)}
  params = jax.tree.map(lambda s, sp: jax.device_put(jnp.ones(s), NamedSharding(mesh, sp)),
                        shapes, specs, is_leaf=lambda x: isinstance(x, tuple))
  state = jax.jit(build(_cfg("jmtl_adaptive", block_nu=True), total_steps=10).init)(params)
  nu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu"))
        if hasattr(s, "nu")][0].nu
  assert nu["dense"]["kernel"].shape == (1, 16)
  assert nu["attn"]["kernel"].shape == (1, 1, 8)
  assert nu["dense"]["kernel"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)
  assert nu["attn"]["kernel"].sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, None, "fsdp")), 3)
  assert nu["bias"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 1)
