"""Bi-LSTM + additive attention trunk: the classic pre-transformer baseline.

x = dropout(LayerNorm(word + token_type embeddings))   (unit-scale LSTM inputs)
h = [lstm_fwd(x); lstm_bwd(x)] per layer (backward runs over each row's real tokens only,
    using seq_lengths = sum(attention_mask), so right padding never enters it)
attention (additive, Bahdanau-style pooling): e_j = v . tanh(W h_j + b), alpha = softmax over real j,
    c = sum_j alpha_j h_j
out_i = tanh(W_o [h_i; c] + b_o)  -> [B, L, d_model], consumed by the same heads as the transformer.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jmtl.model import layers
from jmtl.model.layers import cfg_get, constrain
from jmtl.model.trunk import HIDDEN, require_rngs


def _lstm(in_features: int, hidden: int, in_name: str, dtype: Any, rngs: nnx.Rngs) -> nnx.RNN:
  cell = nnx.OptimizedLSTMCell(
      in_features, hidden, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=layers.param_init(nnx.initializers.lecun_normal(), (in_name, "mlp")),
      recurrent_kernel_init=layers.param_init(nnx.initializers.orthogonal(), ("kv", "mlp")),
      bias_init=layers.param_init(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
  return nnx.RNN(cell, rngs=False)


class BiLSTMTrunk(nnx.Module):
  """(input_ids, segment_ids, attention_mask) -> hidden [B, L, d_model]; assumes right padding."""

  def __init__(self, cfg: Any, vocab_size: int, *, rngs: nnx.Rngs):
    if vocab_size <= 0:
      raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    d = cfg_get(cfg, "d_model")
    hidden = cfg_get(cfg, "lstm_hidden")
    n_layers = cfg_get(cfg, "lstm_layers")
    if hidden < 1 or n_layers < 1:
      raise ValueError(f"model.lstm_hidden={hidden} and model.lstm_layers={n_layers} must be >= 1")
    self.dtype = layers.compute_dtype(cfg)
    self.hidden_size = d
    self.lstm_hidden = hidden
    init = layers.kernel_init()
    self.token_embedding = nnx.Embed(
        vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.param_init(init, ("vocab", "embed")), rngs=rngs)
    self.type_embedding = nnx.Embed(
        cfg_get(cfg, "type_vocab_size"), d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.param_init(init, (None, "embed")), rngs=rngs)
    self.embed_norm = layers.LayerNorm(d, eps=cfg_get(cfg, "layer_norm_eps"), dtype=self.dtype,
                                       rngs=rngs)
    self.dropout = layers.Dropout(cfg_get(cfg, "dropout"))
    self.lstms = nnx.List([
        nnx.Bidirectional(
            _lstm(d if i == 0 else 2 * hidden, hidden, "embed" if i == 0 else "kv",
                  self.dtype, rngs),
            _lstm(d if i == 0 else 2 * hidden, hidden, "embed" if i == 0 else "kv",
                  self.dtype, rngs),
            rngs=False)
        for i in range(n_layers)])
    self.attn_proj = layers.Dense(2 * hidden, hidden, ("kv", "mlp"), dtype=self.dtype, rngs=rngs)
    self.attn_score = layers.Dense(hidden, 1, ("mlp", None), dtype=self.dtype, use_bias=False,
                                   rngs=rngs)
    self.out = layers.Dense(4 * hidden, d, ("kv", "embed"), dtype=self.dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, attention_mask: jax.Array,
               *, deterministic: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    require_rngs(deterministic, rngs)
    x = (layers.embed_lookup(self.token_embedding, input_ids, self.dtype)
         + layers.embed_lookup(self.type_embedding, segment_ids, self.dtype))
    x = self.dropout(self.embed_norm(x), deterministic=deterministic, rngs=rngs)
    lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
    batch = input_ids.shape[0]
    zeros = jnp.zeros((batch, self.lstm_hidden), self.dtype)
    for i, lstm in enumerate(self.lstms):
      if i:
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
      carry = ((zeros, zeros), (zeros, zeros))
      x = lstm(x, initial_carry=carry, seq_lengths=lengths).astype(self.dtype)
      x = constrain(x, ("batch", "length", "kv"))
    mask = attention_mask > 0
    scores = self.attn_score(jnp.tanh(self.attn_proj(x)))[..., 0].astype(jnp.float32)
    scores = jnp.where(mask, scores, layers.NEG_INF)
    alpha = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, L]
    context = jnp.einsum("bl,bld->bd", alpha, x)
    both = jnp.concatenate([x, jnp.broadcast_to(context[:, None], x.shape)], axis=-1)
    out = jnp.tanh(self.out(self.dropout(both, deterministic=deterministic, rngs=rngs)))
    return constrain(out, HIDDEN)
