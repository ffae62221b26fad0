"""Mesh invariance of the sharded step on 8 fake CPU devices, with a small NNX model.

A fast model lets every mesh of the matrix run; tests/test_parallel_step.py runs the real
MultiTaskModel on fewer meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jmtl import defaults
from jmtl.parallel import mesh as mesh_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

VOCAB, D, FF, L, B = 128, 64, 128, 16, 8


class TinyModel(nnx.Module):
  """Embedding -> dropout -> MLP -> mean pool -> classification head, with logical axes."""

  def __init__(self, rngs):
    part = nnx.with_partitioning
    init = nnx.initializers.normal(0.5)
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs,
                           embedding_init=part(init, ("vocab", "embed")))
    self.up = nnx.Linear(D, FF, rngs=rngs, kernel_init=part(init, ("embed", "mlp")),
                         bias_init=part(nnx.initializers.zeros, ("mlp",)))
    self.down = nnx.Linear(FF, D, rngs=rngs, kernel_init=part(init, ("mlp", "embed")),
                           bias_init=part(nnx.initializers.zeros, ("embed",)))
    self.head = nnx.Linear(D, 3, rngs=rngs, kernel_init=part(init, ("embed", "labels")))
    self.drop = nnx.Dropout(0.3)

  def __call__(self, batch, *, task, deterministic, rngs=None):
    x = self.embed(batch["input_ids"])
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    x = x + self.down(jax.nn.gelu(self.up(x)))
    mask = batch["attention_mask"][..., None].astype(x.dtype)
    pooled = (x * mask).sum(1) / mask.sum(1)
    return {"logits": self.head(pooled)}


def tiny_loss(kind, outputs, batch, label_smoothing=0.0):
  assert kind == "classification"
  logp = jax.nn.log_softmax(outputs["logits"])
  nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=1)[:, 0]
  w = batch["example_weight"]
  return (nll * w).sum() / w.sum(), {}


def config(data=1, fsdp=1, tensor=1):
  c = defaults.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def make_batch(seed):
  rs = np.random.RandomState(seed)
  mask = (rs.rand(B, L) < 0.9).astype(np.int32)
  mask[:, 0] = 1
  return {"toy": {
      "input_ids": rs.randint(0, VOCAB, (B, L)).astype(np.int32),
      "segment_ids": np.zeros((B, L), np.int32), "attention_mask": mask,
      "example_weight": np.ones((B,), np.float32), "index": np.arange(B, dtype=np.int32),
      "labels": rs.randint(0, 3, (B,)).astype(np.int32)}}


def build(cfg, tx=None):
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:n])
  tx = tx or optax.adamw(1e-2)
  state, graphdef, shardings = state_lib.init_train_state(
      TinyModel, cfg.seed, tx, mesh, cfg.mesh.rules)
  step_fn = step_lib.make_train_step(graphdef, tx, {"toy": "classification"}, cfg, shardings,
                                     mesh, task_loss=tiny_loss)
  return mesh, state, graphdef, shardings, step_fn


class Run:
  """Five steps on one mesh, with what the tests below check."""

  def __init__(self, sizes, steps=5):
    self.cfg = config(*sizes)
    self.mesh, state, self.graphdef, self.shardings, self.step_fn = build(self.cfg)
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
  return {sizes: Run(sizes) for sizes in [(1, 1, 1)] + MESHES}


MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.mark.parametrize("sizes", MESHES)
def test_losses_do_not_depend_on_the_mesh(runs, sizes):
  ref, run = runs[(1, 1, 1)], runs[sizes]
  np.testing.assert_allclose(run.losses, ref.losses, rtol=1e-4)
  assert int(run.state.step) == 5
  for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_dropout_is_on(runs):
  """The step's loss differs from the deterministic forward: dropout masks are applied."""
  run = runs[(1, 1, 1)]
  batch = make_batch(0)["toy"]

  @jax.jit
  def det_loss(p, r):
    model = nnx.merge(run.graphdef, p, r)
    return tiny_loss("classification", model(batch, task="toy", deterministic=True), batch)[0]

  det = det_loss(run.params0, run.rest0)
  assert abs(float(det) - run.losses[0]) > 1e-3


def _path(path):
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _by_hand(names, shape, mesh_sizes):
  """The default rules table applied by hand: embed->fsdp, mlp/vocab->tensor, labels->None."""
  table = {"embed": "fsdp", "mlp": "tensor", "vocab": "tensor", "labels": None}
  spec = []
  for n, size in zip(names, shape):
    axis = table[n]
    spec.append(axis if axis and size % mesh_sizes[axis] == 0 else None)
  while spec and spec[-1] is None:
    spec.pop()
  return jax.sharding.PartitionSpec(*spec)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 2, 4), (1, 8, 1)])
def test_parameter_shardings_follow_the_rules(runs, sizes):
  run = runs[sizes]
  state, mesh = run.state, run.mesh
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  assert len(leaves) == 7
  for path, arr in leaves:
    p = _path(path)
    names = {("embed", "embedding"): ("vocab", "embed"), ("up", "kernel"): ("embed", "mlp"),
             ("up", "bias"): ("mlp",), ("down", "kernel"): ("mlp", "embed"),
             ("down", "bias"): ("embed",), ("head", "kernel"): ("embed", "labels"),
             ("head", "bias"): None}[p[:2]]
    want = _by_hand(names, arr.shape, dict(mesh.shape)) if names else jax.sharding.PartitionSpec()
    assert arr.sharding.spec == want, (p, arr.sharding.spec, want)
    assert arr.sharding.mesh == mesh
    # the returned shardings tree says the same
  for got, want in zip(jax.tree.leaves(run.shardings.params), jax.tree.leaves(state.params)):
    assert got == want.sharding
  # Adam moments are sharded like their parameters; the step count and rng are replicated.
  mu = state.opt_state[0].mu
  for (pp, p), m in zip(leaves, jax.tree.leaves(mu)):
    assert m.sharding.spec == p.sharding.spec, pp
  assert state.step.sharding.spec == jax.sharding.PartitionSpec()
  assert state.rng.sharding.spec == jax.sharding.PartitionSpec()


def _nbytes(tree, first_shard):
  total = 0
  for x in jax.tree.leaves(tree):
    total += x.addressable_shards[0].data.nbytes if first_shard else x.nbytes
  return total


def test_fsdp8_splits_params_and_optimizer_state(runs):
  tree = (runs[(1, 8, 1)].state.params, runs[(1, 8, 1)].state.opt_state)
  full, per_device = _nbytes(tree, False), _nbytes(tree, True)
  assert per_device <= full / 8 * 1.05, (per_device, full)
  tree = (runs[(8, 1, 1)].state.params, runs[(8, 1, 1)].state.opt_state)
  assert _nbytes(tree, True) == _nbytes(tree, False)  # pure data parallel: full copies


@pytest.mark.parametrize("sizes", [(1, 1, 1)] + MESHES)
def test_no_recompilation_after_the_first_step(runs, sizes):
  assert runs[sizes].traces == [1] * 5
