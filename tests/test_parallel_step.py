"""Sharded train state and jitted step of the real MultiTaskModel on 8 fake CPU devices.

Compiling the real model is slow on CPU, so it runs on two meshes (and is checked against a
single-device reference); tests/test_parallel_invariance.py covers the whole mesh matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jmtl import defaults
from jmtl import optim
from jmtl.model.losses import task_loss
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

VOCAB, L, B = 1024, 16, 8  # a vocabulary big enough that unsharded biases stay < 0.5 %
HEADS = {"cls": HeadSpec("classification", 3), "reg": HeadSpec("regression", 1)}
KINDS = {name: spec.kind for name, spec in HEADS.items()}


def config(data=1, fsdp=1, tensor=1):
  c = defaults.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.model.update(layers=1, d_model=64, heads=4, d_ff=128, max_len=32, dropout=0.2,
                 attention_dropout=0.2)
  c.optim.update(name="adamw", lr=3e-3, warmup_steps=0, schedule="constant")
  return c


def make_batch(seed):
  """A mixed batch: B rows of a 3-class task and B rows of a regression task."""
  rs = np.random.RandomState(seed)
  out = {}
  for name in sorted(HEADS):
    lengths = rs.randint(4, L + 1, B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    labels = (rs.randint(0, 3, B).astype(np.int32) if name == "cls"
              else rs.randn(B).astype(np.float32))
    out[name] = {
        "input_ids": (rs.randint(1, VOCAB, (B, L)) * mask).astype(np.int32),
        "segment_ids": (np.arange(L)[None] >= lengths[:, None] // 2).astype(np.int32) * mask,
        "attention_mask": mask, "example_weight": np.ones((B,), np.float32),
        "index": np.arange(B, dtype=np.int32), "labels": labels}
  return out


def record_extra_args() -> optax.GradientTransformationExtraArgs:
  """Identity on updates; its state keeps the last (val_metric, val_count) it was given."""

  def init(params):
    del params
    return (jnp.float32(-1), jnp.int32(-1))

  def update(updates, state, params=None, *, val_metric, val_count, **extra):
    del params, extra, state
    return updates, (val_metric, val_count)

  return optax.GradientTransformationExtraArgs(init, update)


OVERFLOW = 99


def overflow_on_request() -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by inf when val_count == OVERFLOW: the loss and gradients stay
  finite but the new parameters would not be."""

  def update(updates, state, params=None, *, val_count, **extra):
    del params, extra
    scale = jnp.where(val_count == OVERFLOW, jnp.inf, 1.0)
    return jax.tree.map(lambda u: u * scale, updates), state

  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def build(cfg):
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:n])
  tx = optax.chain(record_extra_args(), optim.build(cfg.optim, 100), overflow_on_request())
  state, graphdef, shardings = state_lib.create_train_state(cfg, HEADS, VOCAB, tx, mesh)
  step_fn = step_lib.make_train_step(graphdef, tx, KINDS, cfg, shardings, mesh)
  return mesh, state, graphdef, shardings, step_fn, tx


class Run:
  """Five steps on one mesh, with what the tests below check."""

  def __init__(self, sizes, steps=5):
    self.cfg = config(*sizes)
    self.mesh, state, self.graphdef, self.shardings, self.step_fn, self.tx = build(self.cfg)
    self.params0 = jax.device_get(state.params)
    self.rest0 = jax.device_get(state.rest)
    self.rng0 = jax.device_get(state.rng)
    self.metrics, self.traces = [], []
    for i in range(steps):
      state, m = self.step_fn(state, make_batch(i), float(i), i)
      self.metrics.append(jax.device_get(m))
      self.traces.append(self.step_fn.trace_count())
      if i == 0:
        self.params1 = jax.device_get(state.params)
    self.state = state
    self.losses = np.array([m["train/loss"] for m in self.metrics])


@pytest.fixture(scope="module")
def runs():
  return {sizes: Run(sizes) for sizes in [(2, 2, 2), (1, 8, 1)]}


def test_losses_do_not_depend_on_the_mesh(runs):
  ref, run = runs[(2, 2, 2)], runs[(1, 8, 1)]
  np.testing.assert_allclose(run.losses, ref.losses, rtol=1e-4)
  for task in HEADS:
    np.testing.assert_allclose([m[f"train/{task}/loss"] for m in run.metrics],
                               [m[f"train/{task}/loss"] for m in ref.metrics], rtol=1e-4)
  assert int(run.state.step) == 5
  for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_total_loss_is_the_sum_of_task_losses(runs):
  for m in runs[(2, 2, 2)].metrics:
    np.testing.assert_allclose(m["train/loss"], m["train/cls/loss"] + m["train/reg/loss"],
                               rtol=1e-6)


def _loss_and_grads(run):
  """value_and_grad of the sum of task losses on one device, outside the step."""

  @jax.jit
  def f(p, batch, key):
    model = nnx.merge(run.graphdef, p, run.rest0)
    rngs = nnx.Rngs(dropout=key)
    total = 0.0
    for name in sorted(batch):
      out = model(batch[name], task=name, deterministic=False, rngs=rngs)
      total += task_loss(KINDS[name], out, batch[name])[0]
    return total

  return jax.value_and_grad(f)


def test_first_step_matches_a_single_device_reference(runs):
  """Step 1 on (2,2,2) equals value_and_grad + the optimizer applied by hand on one device."""
  run = runs[(2, 2, 2)]
  batch = make_batch(0)
  vg = _loss_and_grads(run)
  ref_loss, grads = vg(run.params0, batch, jax.random.fold_in(run.rng0, 0))
  tx = run.tx
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, val_metric=jnp.float32(0),
                                              val_count=jnp.int32(0)))(grads, run.params0)
  ref_params = optax.apply_updates(run.params0, updates)
  m = run.metrics[0]
  np.testing.assert_allclose(m["train/loss"], float(ref_loss), rtol=1e-5)
  g = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                  for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(m["grad_norm"], g, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(run.params1), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # dropout is on: another dropout key gives clearly different gradients
  other = vg(run.params0, batch, jax.random.fold_in(run.rng0, 1))[1]
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, other, grads))
  assert float(diff) > 0.05 * g


def _by_hand(names, shape, mesh_shape):
  """The default rules table applied by hand."""
  table = {"batch": ("data", "fsdp"), "length": None, "embed": "fsdp", "mlp": "tensor",
           "heads": "tensor", "kv": None, "vocab": "tensor", "labels": None}
  spec, used = [], set()
  for n, size in zip(names, shape):
    axis = table[n] if n else None
    ok = axis and axis not in used and size % mesh_shape[axis] == 0
    spec.append(axis if ok else None)
    used.add(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 8, 1)])
def test_parameter_shardings_follow_the_rules(runs, sizes):
  run = runs[sizes]
  state, mesh = run.state, run.mesh
  is_var = lambda x: isinstance(x, nnx.Variable)
  variables = jax.tree.leaves(state.params, is_leaf=is_var)
  assert len(variables) > 20
  annotated = 0
  for var in variables:
    names = var.get_metadata().get("out_sharding")
    arr = var.get_value()
    want = _by_hand(names, arr.shape, dict(mesh.shape)) if names else P()
    annotated += bool(names)
    assert arr.sharding.spec == want, (names, arr.shape, arr.sharding.spec, want)
    assert arr.sharding.mesh == mesh
  assert annotated == len(variables)
  for got, arr in zip(jax.tree.leaves(run.shardings.params), jax.tree.leaves(state.params)):
    assert got == arr.sharding
  # Adam moments are sharded like their parameters; counts and the rng are replicated.
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
          if hasattr(s, "mu")]
  assert len(adam) == 1
  for p, m, v in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam[0].mu),
                     jax.tree.leaves(adam[0].nu)):
    assert m.sharding.spec == p.sharding.spec == v.sharding.spec
  assert adam[0].count.sharding.spec == P()
  assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


def _nbytes(tree, first_shard):
  return sum(x.addressable_shards[0].data.nbytes if first_shard else x.nbytes
             for x in jax.tree.leaves(tree))


def test_fsdp8_splits_params_and_optimizer_state(runs):
  tree = (runs[(1, 8, 1)].state.params, runs[(1, 8, 1)].state.opt_state)
  full, per_device = _nbytes(tree, False), _nbytes(tree, True)
  assert per_device <= full / 8 * 1.05, (per_device, full)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 8, 1)])
def test_no_recompilation_after_the_first_step(runs, sizes):
  assert runs[sizes].traces == [1] * 5


def test_nonfinite_batch_is_dropped(runs):
  run = runs[(2, 2, 2)]
  state = jax.tree.map(jnp.copy, run.state)  # the step donates its input
  before = jax.device_get((state.params, state.rest, state.opt_state))
  bad = make_batch(1)
  bad["reg"]["input_ids"][0, 0] = 0
  bad["reg"]["labels"][0] = np.inf
  state, m = run.step_fn(state, bad, 0.0, 0)
  assert int(m["nonfinite"]) == 1 and int(m["skipped"]) == 1
  assert not np.isfinite(m["train/loss"])
  assert int(state.step) == 6  # step counts batches, skipped or not
  after = jax.device_get((state.params, state.rest, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  state, m = run.step_fn(state, make_batch(2), 0.0, 0)
  assert int(m["nonfinite"]) == 0 and int(m["skipped"]) == 0 and np.isfinite(m["train/loss"])
  assert run.step_fn.trace_count() == 1
  assert all(int(m["nonfinite"]) == 0 for m in run.metrics)


def test_extra_args_reach_the_optimizer_and_overflow_is_dropped(runs):
  run = runs[(1, 8, 1)]
  # the last of the 5 steps passed val_metric=4.0, val_count=4 to every transform
  assert tuple(map(float, run.state.opt_state[0])) == (4.0, 4.0)
  state = jax.tree.map(jnp.copy, run.state)
  before = jax.device_get((state.params, state.opt_state))
  state, m = run.step_fn(state, make_batch(5), 0.5, OVERFLOW)
  assert int(m["nonfinite"]) == 1 and np.isfinite(m["train/loss"]) and np.isfinite(m["grad_norm"])
  after = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)  # the record of (val_metric, val_count) too
  state, m = run.step_fn(state, make_batch(5), 0.5, 5)
  assert int(m["nonfinite"]) == 0
  assert tuple(map(float, state.opt_state[0])) == (0.5, 5.0)
  assert int(state.step) == 7 and run.step_fn.trace_count() == 1


def test_predict_fn_is_the_deterministic_forward(runs):
  run = runs[(2, 2, 2)]
  predict = step_lib.make_predict_fn(run.graphdef, run.cfg, run.shardings, run.mesh)
  batch = make_batch(3)
  params, rest = jax.device_get(run.state.params), jax.device_get(run.state.rest)

  @jax.jit
  def ref(p, r, b):
    model = nnx.merge(run.graphdef, p, r)
    return {"reg": model(b["reg"], task="reg", deterministic=True)}

  want = ref(params, rest, batch)
  out = predict(run.state.params, run.state.rest, batch["reg"], "reg")
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(want["reg"]["logits"]),
                             rtol=1e-5, atol=1e-6)


def test_bad_batch_errors(runs):
  run = runs[(2, 2, 2)]
  with pytest.raises(KeyError, match="nope"):
    run.step_fn(run.state, {"nope": make_batch(0)["cls"]}, 0.0, 0)
  small = {"cls": {k: v[:6] for k, v in make_batch(0)["cls"].items()}}
  with pytest.raises(ValueError, match="multiple of 4"):
    run.step_fn(run.state, small, 0.0, 0)


def _broadcast_of(shape, param_shapes):
  return any(len(shape) == len(q) and shape != q and all(a in (1, b) for a, b in zip(shape, q))
             for q in param_shapes)


def _state_leaves_follow_params(state, name):
  """Every optimizer state leaf with its parameter's shape has its parameter's sharding; the
  rest (counts, factored statistics) is replicated on the same mesh, except statistics
  broadcast over some axes of a parameter (checked by the block_nu test below)."""
  params = jax.tree.leaves(state.params)
  by_shape = {}
  for p in params:
    by_shape.setdefault(p.shape, set()).add(p.sharding.spec)
  matched = 0
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.sharding.mesh == params[0].sharding.mesh, name
    if leaf.shape in by_shape and leaf.ndim:
      assert leaf.sharding.spec in by_shape[leaf.shape], (name, leaf.shape, leaf.sharding.spec)
      matched += leaf.sharding.spec != P()
    elif not (name == "jmtl_adaptive" and _broadcast_of(leaf.shape, by_shape)):
      assert leaf.sharding.spec == P(), (name, leaf.shape, leaf.sharding.spec)
  return matched


@pytest.mark.parametrize("name", optim.NAMES)
def test_every_optimizer_state_is_created_sharded(name):
  """The trainer's sharded init works for every registry optimizer (Adafactor's factored
  row / column statistics have shapes unlike their parameters')."""
  cfg = config(2, 4, 1)
  cfg.optim.name = name
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:8])
  tx = optim.build(cfg.optim, 100)
  state, _, _ = state_lib.create_train_state(cfg, HEADS, VOCAB, tx, mesh)
  matched = _state_leaves_follow_params(state, name)
  assert (matched > 0) == (name != "sgd"), (name, matched)  # sgd has no parameter-shaped state


def test_adafactor_trains_sharded():
  cfg = config(2, 4, 1)
  cfg.optim.name = "adafactor"
  mesh, state, _, _, step_fn, _ = build(cfg)
  # d_model = 64 is below Adafactor's factoring size: its row / column slots hold (1,) arrays
  assert any(x.shape == (1,) for x in jax.tree.leaves(state.opt_state))
  before = jax.device_get(state.params)
  losses = []
  for i in range(3):
    state, m = step_fn(state, make_batch(i), 0.0, i)
    losses.append(float(m["train/loss"]))
  assert np.all(np.isfinite(losses)) and int(m["skipped"]) == 0
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                jax.tree.leaves(before))]
  assert max(moved) > 0
  _state_leaves_follow_params(state, "adafactor")


def test_block_nu_second_moment_is_sharded_like_its_kernel():
  """jmtl_adaptive's per-neuron second moment (1, ..., outputs) keeps its kernel's mesh axes on
  the output axis (fsdp 4 x tensor 2: kernels are split on both)."""
  cfg = config(1, 4, 2)
  cfg.optim.name = "jmtl_adaptive"
  assert cfg.optim.block_nu
  _, state, _, _, step_fn, tx = build(cfg)
  for i in range(2):  # the sharded step keeps the layout and trains
    state, m = step_fn(state, make_batch(i), 0.0, i)
    assert np.isfinite(float(m["train/loss"])) and int(m["skipped"]) == 0
  pairs = []
  optax.tree_map_params(tx, lambda s, p: pairs.append((s, p)) or s, state.opt_state,
                        state.params, transform_non_params=lambda s: s)
  blocks = [(s, p) for s, p in pairs if s.shape != p.shape]
  assert blocks, "no per-neuron second moment found"
  split_outputs = 0
  for s, p in blocks:
    assert s.shape == (1,) * (p.ndim - 1) + p.shape[-1:], (s.shape, p.shape)
    spec = tuple(p.sharding.spec) + (None,) * (p.ndim - len(p.sharding.spec))
    assert tuple(s.sharding.spec) + (None,) * (s.ndim - len(s.sharding.spec)) == \
        (None,) * (p.ndim - 1) + spec[-1:], (s.sharding.spec, p.sharding.spec)
    split_outputs += spec[-1] is not None
  assert split_outputs > 0  # some kernels are split on their output axis, and so is their s
