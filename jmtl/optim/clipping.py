"""Global-norm gradient clipping as one scalar multiply.

  g <- g * min(1, max_norm / ||g||_global)        (||g|| = 0 gives the factor 1)

The same rule as `optax.clip_by_global_norm`, whose select / divide makes XLA:CPU write a clipped
copy of every gradient before the optimizer reads it; a scalar factor fuses into the
optimizer's own element-wise pass instead (one norm reduction is left).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """The rule of the module docstring (state: `optax.EmptyState`)."""
  if not max_norm > 0:
    raise ValueError(f"optim.grad_clip must be > 0 to clip, got {max_norm}")

  def update_fn(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))  # norm 0 -> inf -> 1
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
