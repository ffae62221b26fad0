"""Per-task training losses: weighted means over rows (tokens for seq2seq).

loss = sum_i w_i * l_i / sum_i w_i   (0 when sum_i w_i == 0), w_i = example_weight (times
decoder_mask for seq2seq tokens). Per-row l_i:
  classification: -log softmax(logits)[label]       (rows with label < 0 get weight 0)
  regression:     (logits[:, 0] - label)^2
  span_qa:        (CE(start_logits, start) + CE(end_logits, end)) / 2
  seq2seq:        per token CE(logits, smoothed one-hot(target)), smoothing = label_smoothing
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

KINDS = ("classification", "regression", "span_qa", "seq2seq")


def _need(mapping: Mapping[str, Any], key: str, where: str) -> jax.Array:
  if key not in mapping:
    raise KeyError(f"{where} lacks {key!r} (has {sorted(mapping)})")
  return jnp.asarray(mapping[key])


def _weighted_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  total = jnp.sum(weights)
  mean = jnp.where(total > 0, jnp.sum(values * weights) / jnp.maximum(total, 1e-12), 0.0)
  return mean, total


def task_loss(kind: str, outputs: Mapping[str, jax.Array], task_batch: Mapping[str, Any],
              label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, aux) for one task; aux has `loss`, `weight` (the normaliser) and `accuracy`
  (classification / span_qa: exact start and end / seq2seq: token accuracy) where defined."""
  if kind not in KINDS:
    raise ValueError(f"unknown task kind {kind!r}; known: {KINDS}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  weight = _need(task_batch, "example_weight", "task_batch").astype(jnp.float32)
  aux: dict[str, jax.Array] = {}
  if kind == "classification":
    logits = _need(outputs, "logits", "outputs").astype(jnp.float32)
    labels = _need(task_batch, "labels", "task_batch").astype(jnp.int32)
    weight = weight * (labels >= 0)
    safe = jnp.maximum(labels, 0)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    aux["accuracy"], _ = _weighted_mean(correct, weight)
  elif kind == "regression":
    logits = _need(outputs, "logits", "outputs").astype(jnp.float32)
    labels = _need(task_batch, "labels", "task_batch").astype(jnp.float32)
    per_row = optax.squared_error(logits[:, 0], labels)
  elif kind == "span_qa":
    start = _need(outputs, "start_logits", "outputs").astype(jnp.float32)
    end = _need(outputs, "end_logits", "outputs").astype(jnp.float32)
    s_pos = _need(task_batch, "start_positions", "task_batch").astype(jnp.int32)
    e_pos = _need(task_batch, "end_positions", "task_batch").astype(jnp.int32)
    per_row = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(start, s_pos)
                     + optax.softmax_cross_entropy_with_integer_labels(end, e_pos))
    correct = ((jnp.argmax(start, -1) == s_pos) & (jnp.argmax(end, -1) == e_pos))
    aux["accuracy"], _ = _weighted_mean(correct.astype(jnp.float32), weight)
  else:
    logits = _need(outputs, "logits", "outputs").astype(jnp.float32)
    targets = _need(task_batch, "decoder_target_ids", "task_batch").astype(jnp.int32)
    mask = _need(task_batch, "decoder_mask", "task_batch").astype(jnp.float32)
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
      one_hot = optax.smooth_labels(one_hot, label_smoothing)
    per_row = optax.softmax_cross_entropy(logits, one_hot)  # [B, T] per token
    weight = weight[:, None] * mask
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    aux["accuracy"], _ = _weighted_mean(correct, weight)
  loss, total = _weighted_mean(per_row, weight)
  aux["loss"] = loss
  aux["weight"] = total
  return loss, aux
