"""Which parameters weight decay applies to (`optim.weight_decay_mask`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def decay_mask(cfg: Any) -> Callable[[Any], Any] | None:
  """`optim.weight_decay_mask` as an Optax mask.

  "all": None (every parameter decays). "matrices": a function of the parameters that is True
  where `ndim >= 2` (kernels, embeddings) and False for vectors and scalars (biases, LayerNorm
  scales and offsets), the usual rule for fine-tuning BERT-type models.
  """
  kind = cfg["weight_decay_mask"]
  if kind == "all":
    return None
  if kind == "matrices":
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  raise ValueError(f"optim.weight_decay_mask must be 'all' or 'matrices', got {kind!r}")
