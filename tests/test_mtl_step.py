"""jmtl.mtl inside the real train step: one SGD step of the MultiTaskModel with a weighting and a
gradient method equals the update computed by hand (per-task jax.grad of each task's loss,
numpy PCGrad / MGDA on the flattened trunk gradients, weighted sums on the heads)."""

import jax
import numpy as np
import pytest
from flax import nnx

from jmtl import defaults
from jmtl import optim
from jmtl.model.losses import task_loss
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

VOCAB, L, B = 64, 8, 4
HEADS = {"cls": HeadSpec("classification", 3), "reg": HeadSpec("regression", 1)}
KINDS = {name: spec.kind for name, spec in HEADS.items()}
LR = 0.5
pytestmark = pytest.mark.slow  # five compilations of the real model (~10-20 s each here)


def _config(weighting, gradient, fsdp=1):
  c = defaults.base_config()
  c.tasks = ("cls", "reg")
  c.mesh.data, c.mesh.fsdp = 1, fsdp
  c.model.update(layers=1, d_model=16, heads=2, d_ff=32, max_len=16, dropout=0.0,
                 attention_dropout=0.0)
  c.optim.update(name="sgd", lr=LR, warmup_steps=0, schedule="constant", grad_clip=0.0,
                 weight_decay=0.0)
  c.mtl.weighting, c.mtl.gradient = weighting, gradient
  c.mtl.weights = {"cls": 0.5, "reg": 2.0}
  return c


def _batch(seed):
  rs = np.random.RandomState(seed)
  out = {}
  for name in sorted(HEADS):
    mask = np.ones((B, L), np.int32)
    labels = (rs.randint(0, 3, B).astype(np.int32) if name == "cls"
              else rs.randn(B).astype(np.float32) * 3)
    out[name] = {"input_ids": rs.randint(1, VOCAB, (B, L)).astype(np.int32),
                 "segment_ids": np.zeros((B, L), np.int32), "attention_mask": mask,
                 "example_weight": np.ones((B,), np.float32),
                 "index": np.arange(B, dtype=np.int32), "labels": labels}
  return out


def _flat(tree, trunk):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for p, x in leaves
                         if (p[0].key == "trunk") == trunk])


def _pcgrad2(g):
  out = []
  for i, j in ((0, 1), (1, 0)):
    gi = g[i].copy()
    d = gi @ g[j]
    if d < 0:
      gi -= d / (g[j] @ g[j] + 1e-8) * g[j]
    out.append(gi)
  return out[0] + out[1]


def _mgda2(g):
  a = np.clip((g[1] - g[0]) @ g[1] / ((g[0] - g[1]) @ (g[0] - g[1])), 0, 1)
  return a * g[0] + (1 - a) * g[1]


@pytest.mark.parametrize("weighting, gradient, rule, fsdp", [
    ("static", "pcgrad", _pcgrad2, 1), ("equal", "mgda", _mgda2, 1), ("static", "none", sum, 1),
    ("static", "pcgrad", _pcgrad2, 2)])  # fsdp=2: the Gram products over sharded parameters
def test_one_step_matches_hand_computed_update(weighting, gradient, rule, fsdp):
  cfg = _config(weighting, gradient, fsdp)
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:fsdp])
  tx = optim.build(cfg.optim, 10)
  state, graphdef, shardings = state_lib.create_train_state(cfg, HEADS, VOCAB, tx, mesh)
  params0 = jax.device_get(state.params)
  batch = _batch(0)
  w = {"cls": 0.5, "reg": 2.0} if weighting == "static" else {"cls": 1.0, "reg": 1.0}

  grads = []
  for name in sorted(HEADS):
    def loss(params, name=name):
      model = nnx.merge(graphdef, params, state.rest)
      out = model(batch[name], task=name, deterministic=True, rngs=None)
      return task_loss(KINDS[name], out, batch[name], 0.0)[0]
    grads.append(jax.tree.map(lambda x, s=w[name]: s * np.asarray(x, np.float64),
                              jax.device_get(jax.grad(loss)(state.params))))
  trunk = [_flat(g, True) for g in grads]
  assert trunk[0] @ trunk[1] < 0 or gradient != "pcgrad", "toy problem has no conflict"
  want_trunk = _flat(params0, True) - LR * rule(trunk)
  want_heads = _flat(params0, False) - LR * sum(_flat(g, False) for g in grads)

  step_fn = step_lib.make_train_step(graphdef, tx, KINDS, cfg, shardings, mesh)
  new, metrics = step_fn(state, batch)
  new_params = jax.device_get(new.params)
  np.testing.assert_allclose(_flat(new_params, True), want_trunk, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(_flat(new_params, False), want_heads, rtol=1e-4, atol=1e-6)
  for name in HEADS:
    assert float(metrics[f"train/{name}/weight"]) == pytest.approx(w[name])
  if gradient == "mgda":  # beta = (a, 1 - a) of the closed form
    a = np.clip((trunk[1] - trunk[0]) @ trunk[1] / ((trunk[0] - trunk[1]) @ (trunk[0] - trunk[1])),
                0, 1)
    assert float(metrics["train/cls/grad_coef"]) == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert float(metrics["train/reg/grad_coef"]) == pytest.approx(1 - a, rel=1e-4, abs=1e-6)
  assert ("train/cls/grad_coef" in metrics) == (gradient != "none")


def test_gradient_method_refuses_a_batch_without_every_task():
  cfg = _config("equal", "cagrad")
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  tx = optim.build(cfg.optim, 10)
  state, graphdef, shardings = state_lib.create_train_state(cfg, HEADS, VOCAB, tx, mesh)
  step_fn = step_lib.make_train_step(graphdef, tx, KINDS, cfg, shardings, mesh)
  with pytest.raises(ValueError, match="every task in every batch"):
    step_fn(state, {"cls": _batch(0)["cls"]})
