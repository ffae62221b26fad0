"""`jmtl_adaptive`: AdamW with switchable published components and a metric-driven lr.

Components (each an `optim.*` switch, so an ablation shows what each one buys):
  belief         AdaBelief second moment (Zhuang et al. 2020, arXiv 2010.07468).
  cautious       C-AdamW update mask (Liang et al. 2024, arXiv 2411.16085).
  block_nu       one second moment per output neuron of each kernel (Adam-mini, Zhang et al.
                 2024, arXiv 2406.16793).
  trust_ratio    LAMB layer-wise trust ratio (You et al. 2019, arXiv 1904.00962).
  update_clip    element-wise clip of the normalised update (as in Adafactor / ADOPT).
  metric_schedule  plateau / raise / late exponential decay of `jmtl.optim.plateau`.

Update rule, for step `t = 0, 1, ...` (gradient `g`, parameters `w`; per parameter tensor):

  1. g <- g * min(1, grad_clip / ||g||_global)                  (if grad_clip > 0)
  2. m <- b1 * m + (1 - b1) * g
     belief:      s <- b2 * s + (1 - b2) * (g - m)**2 + belief_eps   (uses the new m)
     otherwise:   s <- b2 * s + (1 - b2) * g**2
     block_nu, for a kernel (a leaf named "kernel" with ndim >= 2; inputs first, outputs
     last): the squared term is replaced by its mean over every axis but the last, so s has
     shape (1, ..., 1, outputs) and is shared by the weights into one output neuron;
     embeddings, biases and norms keep one s per element (Adam-mini keeps Adam for embeddings).
     u <- (m / (1 - b1**(t+1))) / (sqrt(s / (1 - b2**(t+1))) + eps)      (s broadcast)
  3. cautious:    mask = [u * g > 0],  act = [g != 0]  (elements that have a gradient)
                  c = sum(mask), a = sum(act)  (for tensors with n >= 65536 elements: the sums
                  over every 64th slice of the first axis, mask[::64] and act[::64])
                  u <- u * mask * r,  r = 1 / max(c / a, 0.1)  if a > 0, else r = 1
                  (the C-AdamW rescaling, which keeps the mean update size, with the agreeing
                  fraction taken over elements that have a gradient: C-AdamW's n / c would
                  amplify the few rows of an embedding table a batch touches by ~1 / (their
                  fraction), ~100x for a 30k vocabulary. r is at most 10.)
  4. u <- u + weight_decay * w      (decoupled; where the mask of optim.weight_decay_mask is on)
  5. trust_ratio: u <- u * ||w|| / ||u||   (1 when either norm is 0; per tensor)
  6. update_clip: u <- clip(u, -update_clip, update_clip)        (if update_clip > 0)
  7. lr_t = lr * factor(t) * (scale_t * late(t) if metric_schedule else 1)
  8. w <- w - lr_t * u                                           (returned update: -lr_t * u)

Implementation notes (XLA:CPU is memory-bandwidth bound here: cost ~ full passes over the
parameter-sized arrays):
  * Step 1 multiplies by one scalar (`jmtl.optim.clipping`), so XLA fuses it into the moment
    updates instead of writing a clipped copy of the gradients.
  * Step 3's counts must be known before u is written. Exact counts are a separate reduction
    over the whole tensor (about 2x the whole update on a BERT-sized tree on XLA:CPU); every
    64th slice of the first axis is contiguous memory, so the sample reads 1/64 of g and m.
    Measured on the 21M-parameter bench tree without clipping or block_nu (XLA:CPU, 2 runs
    each), update time / optax.adamw: 1.23-1.24 sampling every 16th row, 1.09-1.19 every
    64th, 1.09-1.10 with no count at all (the mask reads g once more than Adam does). Splitting
    the first axis as (k, 64) keeps the sample local to each shard when the first axis is
    sharded (shard sizes multiples of 64). The sampled c / a estimates the agreeing fraction
    of the whole tensor (standard error <= 0.5 / sqrt(sampled active elements): about 1 % for
    a 384 x 384 kernel, 6 sampled rows of 384). Counts are int32 sums (exact).
  * block_nu turns the s update of a kernel into a reduction that reads g once and writes a
    vector, and the u pass reads that vector instead of a parameter-sized s: for kernels,
    8 parameter-sized reads and writes per step instead of Adam's 10 (11 with the cautious
    mask), and no parameter-sized s in memory. Measured on the bench tree (kernels are 60 % of
    its 21M parameters; the rest is mostly the token embedding), no clipping, XLA:CPU: update
    time / optax.adamw 0.87 with block_nu, 1.11 without it.
  * belief reads one more parameter-sized array per step than Adam's g**2 (the new m, in the
    s update; XLA:CPU writes m, s and u in three separate loop fusions); the optimizer study's
    ablation found no gain from it on fine-tuning, so it is off by default.
  * belief_eps is added to s at every step, so after bias correction it contributes
    belief_eps / (1 - b2) to the squared denominator: with Adam's eps = 1e-8 that is a floor of
    sqrt(1e-5) ~ 3e-3, ten times the per-element gradient of a fine-tuned BERT (global norm ~1
    over ~1e7 weights), which would shrink every update ~10x. Hence AdaBelief's (and
    `optax.adabelief`'s) 1e-16 by default, a separate key from the outer `eps`.
  * With belief, the state stores s without its accumulated eps,
    s' = s - belief_eps * (1 - b2**(t+1)) / (1 - b2), and adds that scalar back in step 2.
    Same rule, but the per-element update has no broadcast constant, so XLA fuses the moment
    updates as it does for Adam.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmtl.optim import clipping
from jmtl.optim import masks
from jmtl.optim import plateau as plateau_lib
from jmtl.optim import schedules


class AdaptiveMomentsState(NamedTuple):
  """Update count, first moment `mu`, second moment `nu` (belief: s minus its summed eps)."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adaptive_moments(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    belief: bool = False,
    belief_eps: float = 1e-16,
    cautious: bool = True,
    block_nu: bool = False,
) -> optax.GradientTransformation:
  """Steps 2-3 of the module docstring: (AdaBelief or Adam) direction, optional cautious mask,
  and (block_nu) one second moment per output neuron of each kernel."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.result_type(p, jnp.float32))

    def nu_zeros(path, p):
      if block_nu and is_kernel(path, p):
        return jnp.zeros(_block_shape(p.shape), jnp.result_type(p, jnp.float32))
      return zeros(p)

    return AdaptiveMomentsState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree_util.tree_map_with_path(nu_zeros, params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1 = 1.0 - jnp.power(jnp.float32(b1), count.astype(jnp.float32))
    c2 = 1.0 - jnp.power(jnp.float32(b2), count.astype(jnp.float32))

    # Accumulated eps of the belief rule: eps * (b2**t + ... + 1) = eps * c2 / (1 - b2).
    acc = belief_eps * c2 / (1.0 - b2) if belief else 0.0

    def leaf(g, m, s):
      g32 = g.astype(m.dtype)
      m = b1 * m + (1.0 - b1) * g32
      sq = jnp.square(g32 - m) if belief else jnp.square(g32)  # belief: s' (eps sum below)
      if s.shape != m.shape:  # block_nu: one value per output neuron
        sq = jnp.mean(sq, axis=tuple(range(sq.ndim - 1)), keepdims=True)
      s = b2 * s + (1.0 - b2) * sq
      u = (m / c1) / (jnp.sqrt((s + acc) / c2) + eps)
      if cautious:
        mask = m * g32 > 0  # = [u * g > 0]: u has the sign of m
        c, a = _sample_sum(mask), _sample_sum(g32 != 0)
        r = jnp.where(a > 0, 1.0 / jnp.maximum(c / jnp.maximum(a, 1.0), CAUTIOUS_MIN_FRACTION),
                      1.0)
        u = jnp.where(mask, u, 0.0) * r
      return u.astype(g.dtype), m, s

    flat_g, treedef = jax.tree.flatten(updates)
    out = [leaf(g, m, s) for g, m, s in zip(flat_g, treedef.flatten_up_to(state.mu),
                                            treedef.flatten_up_to(state.nu))]
    u, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return u, AdaptiveMomentsState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def is_kernel(path: Any, leaf: Any) -> bool:
  """A dense kernel: ndim >= 2 and named "kernel" (the last dict key of its tree path, or the
  last "/"-separated part of that key). Flax kernels hold the input axes first, outputs last."""
  if jnp.ndim(leaf) < 2:
    return False
  names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return bool(names) and names[-1].split("/")[-1] == "kernel"


def _block_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """(1, ..., 1, outputs): one entry per output neuron (the last axis)."""
  return (1,) * (len(shape) - 1) + (shape[-1],)


CAUTIOUS_EXACT_BELOW = 65536  # tensors smaller than this count their cautious mask exactly
CAUTIOUS_STRIDE = 64  # sampling stride along the first axis for larger tensors
CAUTIOUS_MIN_FRACTION = 0.1  # the rescale r is at most 1 / 0.1


def _sample_sum(x: jax.Array) -> jax.Array:
  """sum(x) below 65536 elements, else sum(x[::64]) along the first axis (an exact int32 sum,
  returned as float32)."""
  if x.size < CAUTIOUS_EXACT_BELOW or x.ndim == 0:
    return jnp.sum(x, dtype=jnp.int32).astype(jnp.float32)
  rows = x.shape[0]
  if rows % CAUTIOUS_STRIDE == 0:
    # Split the first axis as (k, 64) and keep slice 0: contiguous rows, local to each shard.
    sample = x.reshape(rows // CAUTIOUS_STRIDE, CAUTIOUS_STRIDE, *x.shape[1:])[:, 0]
  else:
    sample = x[::CAUTIOUS_STRIDE]
  return jnp.sum(sample, dtype=jnp.int32).astype(jnp.float32)


def jmtl_adaptive(
    learning_rate: optax.Schedule,
    *,
    total_steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    belief_eps: float = 1e-16,
    weight_decay: float = 0.01,
    decay_mask: Any = None,
    grad_clip: float = 0.0,
    belief: bool = False,
    cautious: bool = True,
    block_nu: bool = False,
    trust_ratio: bool = False,
    update_clip: float = 0.0,
    metric_schedule: bool = True,
    plateau: plateau_lib.PlateauConfig = plateau_lib.PlateauConfig(),
) -> optax.GradientTransformationExtraArgs:
  """The chained transformation of the module docstring (steps 1-8)."""
  schedules.check_total_steps(total_steps)
  if update_clip < 0:
    raise ValueError(f"optim.update_clip must be >= 0, got {update_clip}")
  parts = []
  if grad_clip > 0:
    parts.append(clipping.clip_by_global_norm(grad_clip))
  parts.append(scale_by_adaptive_moments(b1, b2, eps, belief=belief, belief_eps=belief_eps,
                                         cautious=cautious, block_nu=block_nu))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if trust_ratio:
    parts.append(optax.scale_by_trust_ratio())
  if update_clip > 0:
    parts.append(optax.clip(update_clip))
  if metric_schedule:
    parts.append(plateau_lib.scale_by_metric_schedule(learning_rate, total_steps, plateau))
  else:
    parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def from_config(cfg: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """Builds `jmtl_adaptive` from the `optim` config section."""
  return jmtl_adaptive(
      schedules.build_schedule(cfg, total_steps),
      total_steps=total_steps,
      b1=float(cfg["b1"]),
      b2=float(cfg["b2"]),
      eps=float(cfg["eps"]),
      belief_eps=float(cfg["belief_eps"]),
      weight_decay=float(cfg["weight_decay"]),
      decay_mask=masks.decay_mask(cfg),
      grad_clip=float(cfg["grad_clip"]),
      belief=bool(cfg["belief"]),
      cautious=bool(cfg["cautious"]),
      block_nu=bool(cfg["block_nu"]),
      trust_ratio=bool(cfg["trust_ratio"]),
      update_clip=float(cfg["update_clip"]),
      metric_schedule=bool(cfg["metric_schedule"]),
      plateau=plateau_lib.PlateauConfig.from_config(cfg),
  )
