"""Multi-task balancing: task weightings (`mtl.weighting`) and gradient combination on the
shared parameters (`mtl.gradient`). The rules live in `weighting.py` and `gradient.py`, each a
pure function with its paper and equation; this module builds them from the config and holds
the pytree helpers the train step uses (which parameters are shared, Gram matrices and
weighted sums of per-task gradient trees).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmtl.mtl import gradient
from jmtl.mtl import weighting

WEIGHTINGS = weighting.METHODS
GRADIENTS = gradient.METHODS
SHARED_ROOT = "trunk"  # MultiTaskModel: params["trunk"] is shared, params["heads"][task] is not


class MTL(NamedTuple):
  """The balancing of one run over the tasks `names` (sorted; the order of every vector)."""
  names: tuple[str, ...]
  weighting: weighting.Weighting
  gradient: str
  cagrad_c: float

  @property
  def task_grads(self) -> bool:
    """Whether the step needs one gradient per task (gradient methods, GradNorm)."""
    return self.gradient != "none" or self.weighting.needs_grad_norms


def build(mtl_cfg: Any, task_names: Sequence[str]) -> MTL:
  """The `MTL` of config section `mtl` for `task_names` (ValueError on an unknown method; the
  config declarations in `jmtl.defaults` reject those first)."""
  names = tuple(sorted(task_names))
  k = len(names)
  kind = mtl_cfg.weighting
  if kind == "equal":
    w = weighting.equal(k)
  elif kind == "static":
    missing = [t for t in names if t not in mtl_cfg.weights]
    if missing:
      raise ValueError(f"mtl.weights has no weight for tasks {missing}")
    w = weighting.static([float(mtl_cfg.weights[t]) for t in names])
  elif kind == "uncertainty":
    w = weighting.uncertainty(k, float(mtl_cfg.lr))
  elif kind == "dwa":
    w = weighting.dwa(k, float(mtl_cfg.dwa_temperature), int(mtl_cfg.dwa_period))
  elif kind == "gradnorm":
    w = weighting.gradnorm(k, float(mtl_cfg.gradnorm_alpha), float(mtl_cfg.lr))
  elif kind == "famo":
    w = weighting.famo(k, float(mtl_cfg.lr), float(mtl_cfg.famo_gamma))
  else:
    raise ValueError(f"mtl.weighting must be one of {WEIGHTINGS}, got {kind!r}")
  if mtl_cfg.gradient not in GRADIENTS:
    raise ValueError(f"mtl.gradient must be one of {GRADIENTS}, got {mtl_cfg.gradient!r}")
  return MTL(names, w, mtl_cfg.gradient, float(mtl_cfg.cagrad_c))


def coefficients(mtl: MTL, gram: jax.Array, key: jax.Array) -> jax.Array:
  """beta [k] of `mtl.gradient` for the Gram matrix [k, k] of the (weighted) shared task
  gradients; `key` draws PCGrad's orders. "none": ones (the plain sum)."""
  k = gram.shape[0]
  if mtl.gradient == "pcgrad":
    return gradient.pcgrad(gram, gradient.pcgrad_orders(key, k))
  if mtl.gradient == "mgda":
    return gradient.mgda(gram)
  if mtl.gradient == "cagrad":
    return gradient.cagrad(gram, mtl.cagrad_c)
  return jnp.ones((k,), jnp.float32)


def shared_mask(params: Any) -> Any:
  """A pytree of bools like `params`: True for leaves under `params[SHARED_ROOT]`."""
  def is_shared(path, _):
    first = path[0] if path else None
    name = getattr(first, "key", getattr(first, "name", None))
    return name == SHARED_ROOT
  return jax.tree_util.tree_map_with_path(is_shared, params)


def gram_matrix(trees: Sequence[Any], mask: Any) -> jax.Array:
  """G[i, j] = sum over the masked leaves of <trees[i], trees[j]> (float32, [k, k])."""
  k = len(trees)
  leaves = [jax.tree.leaves(t) for t in trees]
  keep = jax.tree.leaves(mask)
  g = [[None] * k for _ in range(k)]
  for i in range(k):
    for j in range(i, k):
      terms = [jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))
               for a, b, m in zip(leaves[i], leaves[j], keep) if m]
      g[i][j] = g[j][i] = sum(terms) if terms else jnp.zeros((), jnp.float32)
  return jnp.stack([jnp.stack(row) for row in g])


def combine(trees: Sequence[Any], mask: Any, shared_coef: jax.Array,
            specific_coef: jax.Array) -> Any:
  """sum_i coef_i trees[i], with `shared_coef` [k] on masked leaves, `specific_coef` on the
  others (each leaf keeps its dtype)."""
  def leaf(m, *xs):
    c = shared_coef if m else specific_coef
    return sum(c[i].astype(x.dtype) * x for i, x in enumerate(xs))
  return jax.tree.map(leaf, mask, *trees)
