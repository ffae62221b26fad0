"""Aggregation weights and the per-group weighted mean of site deltas (the robust rules: `robust`).

Every function here works on per-site values in one of two layouts: a vector over sites (axis 0,
`axis_name=None`: tests, host code) or one site's value inside `jax.shard_map` over the `site`
mesh axis (`axis_name="site"`: sums are `lax.psum`, i.e. collectives). Same code, same numbers.

FedAvg (McMahan et al. 2017, arXiv 1602.05629, Algorithm 1): w_k = m_k n_k, with n_k the site's
training examples and m_k in {0, 1} whether it takes part in the round.

Dynamic weighted aggregation (arXiv 2410.19130 names weights from each cloud's recent loss, its
improvement, data size and staleness; it gives no formula, so this is the rule chosen here):

  Lbar = sum_k m_k L_k / sum_k m_k                    (participants' mean loss)
  r_k  = (P_k - L_k) / P_k if P_k > 0 else 0          (relative improvement since its last round)
  rbar = sum_k m_k r_k / sum_k m_k
  z_k  = (L_k / Lbar - 1) + (r_k - rbar)              (both centred: 0 for an average site)
  w_k  = m_k n_k exp(clip(z_k / T, -30, 30)) / sqrt(1 + tau_k),   then normalised to sum 1

L_k is site k's loss at the round's server parameters (its first local batch), P_k its L when it
last took part (0 = never), tau_k the rounds since it last took part minus one (0 when it took
part in the previous round), T the temperature. Why this rule: a site the global model fits
worst (L_k above the mean) and one whose loss is falling fastest carry more weight, so their
data pulls the model toward them (loss-aware weighting as in q-FFL, Li et al. 2020); the
exponential with a temperature is a softmax over sites, whose T -> infinity limit is exactly
FedAvg; data size enters as FedAvg's n_k; staleness uses FedBuff's 1/sqrt(1 + tau) (Nguyen et
al. 2022, arXiv 2106.06639). Both terms are relative, so the weights do not depend on the
loss's scale.

Gradient-based aggregation (arXiv 2410.19130's "gradient-based" family; the rule chosen here):
weights from each update's alignment with the mean update,

  Dbar = sum_k f_k Delta_k                 (f = fedavg_weights: the FedAvg mean update)
  c_k  = <Delta_k, Dbar> / (||Delta_k|| ||Dbar|| + 1e-12)   over the shared trunk's leaves
  w_k  = m_k n_k exp(c_k / T), normalised to sum 1

Only the trunk, which every site trains, is compared (a head is held by some sites only). A site
whose update points away from the consensus (a drifting or faulty site) gets weight
exp(-1/T) relative to an aligned one; T -> infinity is FedAvg.

Byzantine-robust rules (`jmtl.federated.robust`, which has their formulas): coordinate-wise
median and trimmed mean (Yin et al. 2018, arXiv 1803.01498, Definitions 1 and 2) and Multi-Krum
(Blanchard et al. 2017; El Mhamdi et al. 2018, arXiv 1802.07927). They need every participant's
delta at once, so the round stacks the deltas [S, ...] along `site` and applies them in the
global view instead of the weighted sums below; each participant counts once (no n_k).

Per-group mean (federated multi-task): each parameter leaf belongs to a group g (0 = the shared
trunk, g >= 1 = one task's head); h_kg = 1 when site k holds group g (always for g = 0). The
aggregate of a leaf in group g is sum_k w_k h_kg Delta_k / sum_k w_k h_kg, and 0 when no
participant holds g: a head is averaged only over the sites that train it, weights renormalised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return jax.lax.psum(x, axis_name) if axis_name else jnp.sum(x, axis=0)


def fedavg_weights(examples: jax.Array, mask: jax.Array, axis_name: str | None = None
                   ) -> jax.Array:
  """w_k = m_k n_k / sum_j m_j n_j (float32; all zero when no site takes part)."""
  w = mask.astype(jnp.float32) * examples.astype(jnp.float32)
  total = _sum(w, axis_name)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def dynamic_weights(loss: jax.Array, prev_loss: jax.Array, examples: jax.Array,
                    staleness: jax.Array, mask: jax.Array, temperature: float,
                    axis_name: str | None = None) -> jax.Array:
  """The module docstring's dynamic rule, normalised over participants (float32)."""
  m = mask.astype(jnp.float32)
  loss = jnp.where(m > 0, loss.astype(jnp.float32), 0.0)
  prev = prev_loss.astype(jnp.float32)
  count = jnp.maximum(_sum(m, axis_name), 1.0)
  mean_loss = _sum(m * loss, axis_name) / count
  safe_mean = jnp.where(mean_loss > 0, mean_loss, 1.0)
  r = jnp.where(prev > 0, (prev - loss) / jnp.where(prev > 0, prev, 1.0), 0.0) * m
  mean_r = _sum(r, axis_name) / count
  z = (loss / safe_mean - 1.0) + (r - mean_r)
  score = jnp.exp(jnp.clip(z / float(temperature), -30.0, 30.0))
  w = m * examples.astype(jnp.float32) * score / jnp.sqrt(1.0 + staleness.astype(jnp.float32))
  total = _sum(w, axis_name)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def grouped_mean(deltas: Any, groups: Any, weight: jax.Array, holds: jax.Array,
                 axis_name: str | None = None) -> Any:
  """sum_k w_k h_kg Delta_k / sum_k w_k h_kg per leaf of group g (0 where no holder takes part).

  `deltas`: a pytree of per-site leaves ([S, ...] with axis_name None, one site's inside
  shard_map); `groups`: the same tree of ints; `weight`: [S] or one site's scalar; `holds`:
  [S, G] or one site's [G] (float, column 0 all ones). Sums in float32; leaves keep their dtype.
  """
  def one(d, g):
    wg = weight.astype(jnp.float32) * holds[..., g].astype(jnp.float32)
    den = _sum(wg, axis_name)
    shape = wg.shape + (1,) * (d.ndim - wg.ndim)
    num = _sum(wg.reshape(shape) * d.astype(jnp.float32), axis_name)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0).astype(d.dtype)
  return jax.tree.map(one, deltas, groups)


def alignment_weights(cosine: jax.Array, examples: jax.Array, mask: jax.Array,
                      temperature: float, axis_name: str | None = None) -> jax.Array:
  """w_k = m_k n_k exp(c_k / T) / sum_j (...) from the cosines c_k (module docstring)."""
  m = mask.astype(jnp.float32)
  w = m * examples.astype(jnp.float32) * jnp.exp(
      jnp.clip(cosine.astype(jnp.float32) / float(temperature), -30.0, 30.0))
  total = _sum(w, axis_name)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def trunk_cosine(deltas: Any, groups: Any, mean: Any) -> jax.Array:
  """cos(Delta_k, Dbar) over the leaves of group 0 of one site's `deltas` (or of each site's,
  leaves [S, ...]: then a vector [S]); `mean` holds the mean update's leaves (no site axis)."""
  dot = nk = nm = 0.0
  for d, g, a in zip(jax.tree.leaves(deltas), jax.tree.leaves(groups), jax.tree.leaves(mean)):
    if g != 0:
      continue
    d = d.astype(jnp.float32)
    a = a.astype(jnp.float32)
    axes = tuple(range(d.ndim - a.ndim, d.ndim))
    dot = dot + jnp.sum(d * a, axis=axes)
    nk = nk + jnp.sum(d * d, axis=axes)
    nm = nm + jnp.sum(a * a)
  return dot / (jnp.sqrt(nk) * jnp.sqrt(nm) + 1e-12)
