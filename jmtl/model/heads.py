"""Task heads on the trunk's hidden states [B, L, D].

ClassificationHead: pooling "first" = BERT pooler (tanh(dense(h[:, 0]))), "mean" = masked mean
  sum_l(mask * h) / max(sum_l mask, 1); then dropout and a dense to num_labels logits
  (num_labels = 1 is regression).
SpanHead: start/end logits = dense(h) -> [B, L] each; positions that are padding or outside
  `context_mask` get NEG_INF, except index 0 ([CLS], the no-answer position).
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jmtl.model import layers


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_l(mask[b,l] * h[b,l]) / max(sum_l mask[b,l], 1), computed in float32."""
  m = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class ClassificationHead(nnx.Module):
  """hidden [B, L, D] -> logits [B, num_labels] float32."""

  def __init__(self, hidden_size: int, num_labels: int, *, pooling: str, dropout: float,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if pooling not in ("first", "mean"):
      raise ValueError(f"model.pooling={pooling!r} is not one of ('first', 'mean')")
    if num_labels < 1:
      raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    self.pooling = pooling
    self.dtype = dtype
    if pooling == "first":
      self.pooler = layers.Dense(hidden_size, hidden_size, ("embed", "mlp"), dtype=dtype,
                                 rngs=rngs)
    else:
      self.pooler = nnx.data(None)
    self.dropout = layers.Dropout(dropout)
    self.classifier = layers.Dense(hidden_size, num_labels, ("embed", "labels"), dtype=dtype,
                                   rngs=rngs)

  def __call__(self, hidden: jax.Array, attention_mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if self.pooling == "first":
      pooled = jnp.tanh(self.pooler(hidden[:, 0]))
    else:
      pooled = masked_mean(hidden, attention_mask).astype(self.dtype)
    pooled = layers.constrain(pooled, ("batch", "embed" if self.pooler is None else "mlp"))
    pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
    return self.classifier(pooled).astype(jnp.float32)


class SpanHead(nnx.Module):
  """hidden [B, L, D] -> (start_logits, end_logits), each [B, L] float32, masked as above."""

  def __init__(self, hidden_size: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.qa_outputs = layers.Dense(hidden_size, 2, ("embed", "labels"), dtype=dtype, rngs=rngs)

  def __call__(self, hidden: jax.Array, attention_mask: jax.Array,
               context_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = self.qa_outputs(hidden).astype(jnp.float32)  # [B, L, 2]
    first = jnp.arange(hidden.shape[1])[None, :] == 0
    allowed = ((jnp.asarray(context_mask) > 0) & (jnp.asarray(attention_mask) > 0)) | first
    logits = jnp.where(allowed[..., None], logits, layers.NEG_INF)
    return logits[..., 0], logits[..., 1]
