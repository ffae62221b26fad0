"""Byzantine-robust aggregation of stacked site deltas: coordinate median, trimmed mean, Multi-Krum.

These rules need every participant's delta at once, so, unlike the weighted means of
`jmtl.federated.aggregation` (sums, i.e. collectives inside `shard_map`), they work on stacks:
every leaf of `deltas` is [S, ...] (site k's Delta_k in row k), in the global view of the jitted
round (the stack is sharded along `site`; XLA inserts the gathers the sorts need).

Who enters: for a leaf of group g (0 = the shared trunk, g >= 1 = one task's head; see
`aggregation`), the valid set is V_g = {k : m_k = 1 and h_kg = 1} (participants holding the
leaf), c_g = |V_g|. Non-participants and non-holders are masked, never cut out, so shapes never
change between rounds. A leaf with c_g = 0 aggregates to 0 (the server does not move it).

Coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning: towards optimal
statistical rates", arXiv 1803.01498, Definition 1): for each coordinate i,
  agg_i = med{Delta_k,i : k in V_g}
the mean of the two middle values when c_g is even (numpy's `np.median`).

Coordinate-wise trimmed mean (Yin et al. 2018, Definition 2): with b = floor(beta c_g), sort the
c_g values of each coordinate, drop the b smallest and the b largest and average the c_g - 2b
left (the rule of `scipy.stats.trim_mean`); beta in [0, 1/2), so at least one value is left.

Multi-Krum (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant
gradient descent", NeurIPS, Section 4 (Krum) and its m-Krum variant; El Mhamdi et al. 2018,
arXiv 1802.07927, Section 3.1): over the participants P (n = |P|), on the trunk's leaves
(group 0, which every participant holds),
  d_kj = ||Delta_k - Delta_j||^2,
  score_k = sum of the q smallest d_kj over j in P, j != k,   q = n - f - 2
(Krum's guarantee needs n > 2f + 2; for fewer participants q is clamped to
max(n - f - 2, min(1, n - 1)), so the rule still runs). The m participants with the lowest
scores are selected (ties: lower site index first), m = `krum_m`, or n - f when `krum_m` = 0
(clamped to [1, n]); m = 1 is Krum. The aggregate is the plain mean of the selected deltas; a
head leaf is the mean over the selected sites that hold it (0 when none does).

Every participant counts once: example counts n_k do not enter these rules (a Byzantine site
could claim any n_k). The `weights` reported per site are 1/c_0 for each participant (median,
trimmed mean: every participant is an input of every coordinate) and 1/m for each site Krum
selects (0 otherwise).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

RULES = ("median", "trimmed_mean", "krum")


def _sorted_valid(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [S, ...] float32 sorted along axis 0 with the invalid rows (as +inf) last; count c."""
  shape = valid.shape + (1,) * (x.ndim - 1)
  v = valid.reshape(shape)
  return jnp.sort(jnp.where(v, x, jnp.inf), axis=0), jnp.sum(valid.astype(jnp.int32))


def coordinate_median(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Median over the rows k of `x` [S, ...] with valid[k] (bool [S]), per coordinate (float32,
  shape x.shape[1:]); zeros when no row is valid."""
  s, c = _sorted_valid(x.astype(jnp.float32), valid)
  lo = jax.lax.dynamic_index_in_dim(s, jnp.maximum((c - 1) // 2, 0), 0, keepdims=False)
  hi = jax.lax.dynamic_index_in_dim(s, jnp.minimum(c // 2, x.shape[0] - 1), 0, keepdims=False)
  return jnp.where(c > 0, 0.5 * (jnp.where(c > 0, lo, 0.0) + jnp.where(c > 0, hi, 0.0)), 0.0)


def trimmed_mean(x: jax.Array, valid: jax.Array, beta: float) -> jax.Array:
  """Yin et al.'s coordinate-wise trimmed mean (module docstring) over the valid rows of `x`
  [S, ...]; b = floor(beta c) dropped at each end; zeros when no row is valid (float32)."""
  s, c = _sorted_valid(x.astype(jnp.float32), valid)
  b = jnp.floor(float(beta) * c.astype(jnp.float32) + 1e-6).astype(jnp.int32)
  pos = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
  keep = (pos >= b) & (pos < c - b)
  total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
  return jnp.where(c > 0, total / jnp.maximum(c - 2 * b, 1).astype(jnp.float32), 0.0)


def pairwise_sq_dists(deltas: Any, groups: Any) -> jax.Array:
  """d_kj = ||Delta_k - Delta_j||^2 over the group-0 (trunk) leaves of stacked `deltas`
  (leaves [S, ...]); float32 [S, S]. Differences, not a Gram expansion (exact for close
  updates), one column j at a time: S x the leaf's size in memory, not S^2 x."""
  total = 0.0
  for d, g in zip(jax.tree.leaves(deltas), jax.tree.leaves(groups)):
    if g != 0:
      continue
    d = d.astype(jnp.float32).reshape(d.shape[0], -1)
    total = total + jnp.stack([jnp.sum(jnp.square(d - d[j][None]), axis=1)
                               for j in range(d.shape[0])], axis=1)
  return total


def krum_select(dists: jax.Array, valid: jax.Array, f: int, m: int) -> jax.Array:
  """Multi-Krum's selection (module docstring): 0/1 float32 [S] of the sites with the m lowest
  scores among the valid ones, from `dists` [S, S] (d_kj), `valid` bool [S], f >= 0, m >= 0
  (0 = n - f)."""
  s = dists.shape[0]
  n = jnp.sum(valid.astype(jnp.int32))
  q = jnp.maximum(n - int(f) - 2, jnp.minimum(1, n - 1))
  pair = valid[:, None] & valid[None, :] & ~jnp.eye(s, dtype=bool)
  near = jnp.sort(jnp.where(pair, dists, jnp.inf), axis=1)
  score = jnp.sum(jnp.where(jnp.arange(s)[None, :] < q, near, 0.0), axis=1)
  score = jnp.where(valid, score, jnp.inf)
  want = jnp.clip(n - int(f) if not m else jnp.int32(m), 1, jnp.maximum(n, 1))
  rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
  return ((rank < want) & valid).astype(jnp.float32)


def aggregate(deltas: Any, groups: Any, mask: jax.Array, holds: jax.Array, rule: str, *,
              trim: float = 0.1, byzantine_f: int = 0, krum_m: int = 0) -> tuple[Any, jax.Array]:
  """(aggregate, weights [S]) of stacked `deltas` (leaves [S, ...]) by `rule` in `RULES`.

  `groups`: a tree like one site's delta of ints (group g of each leaf); `mask` [S] 0/1
  (participants); `holds` [S, G] 0/1 (column 0 all ones). Leaves of the aggregate have the
  delta leaves' shapes without the site axis, in float32. ValueError for an unknown rule.
  """
  if rule not in RULES:
    raise ValueError(f"robust rule must be one of {RULES}, got {rule!r}")
  part = mask > 0
  valid = part[:, None] & (holds > 0)  # [S, G]
  if rule == "krum":
    sel = krum_select(pairwise_sq_dists(deltas, groups), part, byzantine_f, krum_m)

    def one(d, g):
      w = sel * holds[:, g]
      den = jnp.sum(w)
      num = jnp.tensordot(w, d.astype(jnp.float32), axes=1)
      return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    weights = sel / jnp.maximum(jnp.sum(sel), 1.0)
  else:
    def one(d, g):
      if rule == "median":
        return coordinate_median(d, valid[:, g])
      return trimmed_mean(d, valid[:, g], trim)
    count = jnp.sum(part.astype(jnp.float32))
    weights = part.astype(jnp.float32) / jnp.maximum(count, 1.0)
  return jax.tree.map(one, deltas, groups), weights
