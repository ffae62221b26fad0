"""paper_adaptive and jmtl_adaptive against numpy re-implementations of their docstring rules.

Five steps with global-norm clipping, decoupled weight decay, warmup + linear decay, late decay
and validations arriving between steps; float64 numpy reference: parameters within 1e-6 at
every step, each step's update within 2e-4 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl.defaults import base_config
from jmtl.optim import build

T = 5
# (val_metric, val_count) passed at each step: validations 1..3 arrive before steps 1, 3, 4.
VALS = [(0.0, 0), (50.0, 1), (50.0, 1), (40.0, 2), (30.0, 3)]


def _cfg(name, **kw):
  c = base_config().optim
  c.name = name
  c.lr = 0.05
  c.warmup_steps = 2
  c.schedule = "linear"
  c.end_lr_factor = 0.0
  c.weight_decay = 0.1
  c.b1, c.b2, c.eps, c.belief_eps = 0.9, 0.99, 1e-6, 1e-7
  c.grad_clip = 3.0
  c.plateau_patience = 1
  c.plateau_factor = 0.5
  c.min_scale = 0.3
  c.late_decay_start = 0.6
  c.late_decay_rate = 0.2
  for k, v in kw.items():
    c[k] = v
  return c


# "w" is a matrix that is not a kernel (per-element s even with block_nu); the two kernels
# (inputs first, outputs last) share s per output neuron with block_nu.
SHAPES = {"w": (4, 5), "dense/kernel": (4, 5), "attn/kernel": (3, 2, 4), "b": (5,), "s": ()}


def _data(shapes=None, w_scale=1.0):
  rng = np.random.default_rng(0)
  shapes = shapes or SHAPES
  params = {k: rng.normal(size=v) * w_scale for k, v in shapes.items()}
  grads = [{k: rng.normal(size=np.shape(v)) * 1.5 for k, v in params.items()} for _ in range(T)]
  return params, grads


# ----------------------------------------------------------------- numpy reference


def _ref_factor(t, c):
  if t < c.warmup_steps:
    return (t + 1) / c.warmup_steps
  if c.schedule == "constant":
    return 1.0
  assert c.schedule == "linear"
  p = min(max((t - c.warmup_steps) / max(T - c.warmup_steps, 1), 0.0), 1.0)
  return 1.0 + (c.end_lr_factor - 1.0) * p


def _ref_late(t, c):
  s0 = c.late_decay_start * T
  return c.late_decay_rate ** min(max((t - s0) / max(T - 1 - s0, 1.0), 0.0), 1.0)


def _ref_sum(x):
  """c or a of the cautious rescale: exact below 65536 elements, else the sum of every 64th row."""
  if x.size < 65536 or x.ndim == 0:
    return x.sum()
  return x[::64].sum()


def _ref_rescale(mask, g):
  """r = 1 / max(c / a, 0.1) over elements with a gradient (a = 0: r = 1)."""
  c, a = _ref_sum(mask), _ref_sum((g != 0).astype(np.float64))
  return 1.0 / max(c / a, 0.1) if a > 0 else 1.0


class _RefPlateau:

  def __init__(self, c):
    self.c, self.scale, self.best, self.bad, self.good, self.last = c, 1.0, -np.inf, 0, 0, 0

  def see(self, x, n):
    c = self.c
    if n == self.last:
      return
    self.last = n
    improved = x > self.best + c.plateau_min_delta
    had_best = np.isfinite(self.best)
    if improved:
      self.best, self.bad = x, 0
      self.good = self.good + 1 if had_best else 0
    else:
      self.bad, self.good = self.bad + 1, 0
    if self.bad >= c.plateau_patience:
      self.scale, self.bad = self.scale * c.plateau_factor, 0
    if c.raise_after > 0 and self.good >= c.raise_after:
      self.scale, self.good = self.scale * c.raise_factor, 0
    self.scale = min(max(self.scale, c.min_scale), c.max_scale)


def _ref_is_kernel(name, x):
  return name.split("/")[-1] == "kernel" and np.ndim(x) >= 2


def _ref_run(c, params, grads, *, belief, cautious, trust_ratio, update_clip, metric_schedule,
             block_nu=False):
  w = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  s = {k: np.zeros_like(v) for k, v in w.items()}  # block_nu: broadcast, every row alike
  plat = _RefPlateau(c)
  out = []
  for t in range(T):
    g = {k: np.array(v, np.float64) for k, v in grads[t].items()}
    norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    if c.grad_clip > 0 and norm > c.grad_clip:
      g = {k: v * c.grad_clip / norm for k, v in g.items()}
    plat.see(*VALS[t])
    lr = c.lr * _ref_factor(t, c)
    if metric_schedule:
      lr *= plat.scale * _ref_late(t, c)
    for k in w:
      m[k] = c.b1 * m[k] + (1 - c.b1) * g[k]
      sq = (g[k] - m[k]) ** 2 if belief else g[k] ** 2
      if block_nu and _ref_is_kernel(k, w[k]):
        # mean over the input axes of each output neuron (the last axis)
        sq = np.broadcast_to(sq.reshape(-1, sq.shape[-1]).mean(axis=0), sq.shape)
      s[k] = c.b2 * s[k] + (1 - c.b2) * sq + (c.belief_eps if belief else 0.0)
      u = (m[k] / (1 - c.b1 ** (t + 1))) / (np.sqrt(s[k] / (1 - c.b2 ** (t + 1))) + c.eps)
      if cautious:
        mask = (u * g[k] > 0).astype(np.float64)
        u = u * mask * _ref_rescale(mask, g[k])
      u = u + c.weight_decay * w[k]
      if trust_ratio:
        wn, un = np.linalg.norm(w[k]), np.linalg.norm(u)
        u = u * (wn / un if wn > 0 and un > 0 else 1.0)
      if update_clip > 0:
        u = np.clip(u, -update_clip, update_clip)
      w[k] = w[k] - lr * u
    out.append({k: v.copy() for k, v in w.items()})
  return out


# ----------------------------------------------------------------- jax side


def _jax_run(c, params, grads):
  tx = build(c, T)
  step = jax.jit(lambda g, s, p, x, n: tx.update(g, s, p, val_metric=x, val_count=n))
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  s = jax.jit(tx.init)(p)
  out = []
  for t in range(T):
    g = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), grads[t])
    u, s = step(g, s, p, jnp.float32(VALS[t][0]), jnp.int32(VALS[t][1]))
    p = jax.tree.map(lambda a, b: a + b, p, u)
    out.append(jax.tree.map(np.asarray, p))
  return out


def _check(c, switches, shapes=None, w_scale=1.0):
  params, grads = _data(shapes, w_scale)
  ref = _ref_run(c, params, grads, **switches)
  got = _jax_run(c, params, grads)
  for t in range(T):
    for k in params:
      # Compare the parameter *change* so the check is relative to the update size.
      d_ref = ref[t][k] - (ref[t - 1][k] if t else params[k])
      d_got = got[t][k].astype(np.float64) - (got[t - 1][k] if t else params[k])
      # The bound: parameters within 1e-6 of the float64 reference at every step.
      np.testing.assert_allclose(got[t][k], ref[t][k], rtol=0, atol=1e-6,
                                 err_msg=f"step {t} leaf {k}")
      np.testing.assert_allclose(d_got, d_ref, rtol=2e-4, atol=1e-7,
                                 err_msg=f"update at step {t} leaf {k}")


PAPER = dict(belief=False, cautious=False, trust_ratio=False, update_clip=0.0,
             metric_schedule=True, block_nu=False)


def test_paper_adaptive_matches_numpy():
  _check(_cfg("paper_adaptive"), PAPER)


def test_paper_adaptive_without_clip_or_decay():
  _check(_cfg("paper_adaptive", grad_clip=0.0, weight_decay=0.0, schedule="constant",
              warmup_steps=0), PAPER)


def test_paper_adaptive_raise_after():
  # Rising metrics: raise after 1 improving validation, clamped at max_scale 1.3.
  global VALS
  old = VALS
  VALS = [(10.0, 1), (11.0, 2), (12.0, 3), (13.0, 4), (13.0, 4)]
  try:
    _check(_cfg("paper_adaptive", raise_after=1, raise_factor=1.2, max_scale=1.3), PAPER)
  finally:
    VALS = old


# jmtl_adaptive's defaults; each case below changes some of them.
DEFAULT = dict(belief=False, cautious=True, block_nu=True, trust_ratio=False, update_clip=0.0,
               metric_schedule=True)
CASES = {
    "default": {},
    "belief": dict(belief=True, block_nu=False),
    "cautious_adam": dict(block_nu=False, metric_schedule=False),
    "belief_block_lamb": dict(belief=True, cautious=False, trust_ratio=True),
    "all": dict(belief=True, trust_ratio=True, update_clip=0.5),
    "adamw_updclip": dict(cautious=False, block_nu=False, update_clip=0.8, metric_schedule=False),
    "adam_mini": dict(cautious=False, metric_schedule=False),
}
SWITCHES = [{**DEFAULT, **change} for change in CASES.values()]


@pytest.mark.parametrize("switches", SWITCHES, ids=list(CASES))
def test_jmtl_adaptive_matches_numpy(switches):
  _check(_cfg("jmtl_adaptive", **switches), switches)


def test_jmtl_adaptive_large_tensors_sample_the_count():
  """n >= 65536: c and a from every 64th first-axis slice (rows a multiple of 64 or not)."""
  shapes = {"w": (256, 512), "v": (100, 700), "b": (8,)}
  # Small weights, so float32 resolves the per-step change of every one of the many entries.
  _check(_cfg("jmtl_adaptive"), SWITCHES[0], shapes, w_scale=0.05)
  # The sampled fraction c / a is an estimate: close to the exact one, yet not equal to it.
  rng = np.random.default_rng(3)
  for shape in shapes.values():
    mask = (rng.normal(size=shape) > 0.3).astype(np.float64)
    if mask.size >= 65536:
      ones = np.ones_like(mask)
      n, p = _ref_sum(ones), mask.mean()
      # within 3 standard errors of a binomial sample of n elements
      assert abs(_ref_sum(mask) / n - p) < 3 * np.sqrt(p * (1 - p) / n)
      assert _ref_sum(mask) / _ref_sum(ones) != mask.mean()


@pytest.mark.parametrize("rows", [(0, 64, 128), (1, 2, 3), (5,)],
                         ids=["sampled", "unsampled", "one"])
def test_cautious_does_not_amplify_sparse_embedding_rows(rows):
  """A batch touches 3 of 4096 rows of an embedding table: the update of those rows keeps
  Adam's size (|u| = 1 at step 0), instead of C-AdamW's n / c ~ 1000x."""
  from jmtl.optim.jmtl_adaptive import scale_by_adaptive_moments
  tx = scale_by_adaptive_moments(belief=False, cautious=True)
  g = np.zeros((4096, 32), np.float32)
  g[list(rows)] = np.random.default_rng(0).normal(size=(len(rows), 32))
  u, _ = tx.update({"e": jnp.asarray(g)}, tx.init({"e": jnp.zeros_like(g)}))
  u = np.asarray(u["e"])
  np.testing.assert_allclose(np.abs(u[list(rows)]), 1.0, rtol=1e-4)
  assert np.count_nonzero(u) == len(rows) * 32



def test_block_nu_shares_s_per_output_neuron_of_the_model_kernels():
  """On the model's own parameter tree: every dense kernel gets s of shape (1, ..., outputs);
  embeddings, biases and norm parameters keep one s per element."""
  from flax import nnx
  from jmtl.model.multitask import HeadSpec, MultiTaskModel
  from jmtl.optim.jmtl_adaptive import scale_by_adaptive_moments
  c = base_config()
  model = MultiTaskModel(c.model, 50, {"sst2": HeadSpec("classification", 2),
                                       "squad": HeadSpec("span_qa", 0)}, rngs=nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  state = scale_by_adaptive_moments(block_nu=True).init(params)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  nu = jax.tree.leaves(state.nu)
  assert len(leaves) == len(nu)
  kernels = 0
  for (path, p), s in zip(leaves, nu):
    name = jax.tree_util.keystr(path)
    if "['kernel']" in name:
      kernels += 1
      assert s.shape == (1,) * (p.ndim - 1) + p.shape[-1:], name
    else:
      assert s.shape == p.shape, name
  assert kernels >= 6 * c.model.layers  # q, k, v, out, wi, wo per layer (+ heads)
