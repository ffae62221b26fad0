"""The transformer encoder trunk (BERT when norm=post, positions=learned, activation=gelu).

embeddings = LayerNorm(word + position + token_type) -> dropout   (post-LN / BERT)
layer (post): x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))
layer (pre):  x = x + drop(attn(LN(x))); x = x + drop(ffn(LN(x))); final LN after the stack.
With positions=rope there is no position table; q and k are rotated instead.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jmtl.model import layers
from jmtl.model.layers import cfg_choice, cfg_get, constrain

HIDDEN = ("batch", "length", "embed")


def require_rngs(deterministic: bool, rngs: nnx.Rngs | None) -> None:
  """deterministic=False needs dropout rngs; raise a clear error otherwise."""
  if not deterministic and rngs is None:
    raise ValueError("deterministic=False needs rngs, e.g. rngs=nnx.Rngs(dropout=key)")


class EncoderLayer(nnx.Module):
  """One transformer encoder layer (post- or pre-LayerNorm)."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    d = cfg_get(cfg, "d_model")
    dtype = layers.compute_dtype(cfg)
    eps = cfg_get(cfg, "layer_norm_eps")
    self.pre_norm = cfg_choice(cfg, "norm", ("post", "pre")) == "pre"
    self.attn = layers.SelfAttention(
        d, cfg_get(cfg, "heads"), attention_dropout=cfg_get(cfg, "attention_dropout"),
        use_rope=cfg_choice(cfg, "positions", ("learned", "rope")) == "rope",
        dtype=dtype, rngs=rngs)
    self.attn_norm = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.ffn = layers.FeedForward(d, cfg_get(cfg, "d_ff"), activation=cfg_get(cfg, "activation"),
                                  dtype=dtype, rngs=rngs)
    self.ffn_norm = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(cfg_get(cfg, "dropout"))

  def __call__(self, x: jax.Array, attention_mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    def drop(h):
      return self.dropout(h, deterministic=deterministic, rngs=rngs)

    if self.pre_norm:
      x = x + drop(self.attn(self.attn_norm(x), attention_mask, deterministic=deterministic,
                             rngs=rngs))
      x = constrain(x, HIDDEN)
      x = x + drop(self.ffn(self.ffn_norm(x)))
    else:
      x = self.attn_norm(x + drop(self.attn(x, attention_mask, deterministic=deterministic,
                                            rngs=rngs)))
      x = constrain(x, HIDDEN)
      x = self.ffn_norm(x + drop(self.ffn(x)))
    return constrain(x, HIDDEN)


class TransformerTrunk(nnx.Module):
  """Transformer encoder: (input_ids, segment_ids, attention_mask) -> hidden [B, L, d_model]."""

  def __init__(self, cfg: Any, vocab_size: int, *, rngs: nnx.Rngs):
    if vocab_size <= 0:
      raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    d = cfg_get(cfg, "d_model")
    self.dtype = layers.compute_dtype(cfg)
    self.hidden_size = d
    self.max_len = cfg_get(cfg, "max_len")
    self.pre_norm = cfg_choice(cfg, "norm", ("post", "pre")) == "pre"
    use_rope = cfg_choice(cfg, "positions", ("learned", "rope")) == "rope"
    cfg_choice(cfg, "activation", ("gelu", "swiglu"))
    n_layers = cfg_get(cfg, "layers")
    if n_layers < 1:
      raise ValueError(f"model.layers must be >= 1, got {n_layers}")
    type_vocab = cfg_get(cfg, "type_vocab_size")
    if type_vocab < 1:
      raise ValueError(f"model.type_vocab_size must be >= 1, got {type_vocab}")
    init = layers.kernel_init()
    self.token_embedding = nnx.Embed(
        vocab_size, d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.param_init(init, ("vocab", "embed")), rngs=rngs)
    if use_rope:
      self.position_embedding = nnx.data(None)
    else:
      self.position_embedding = nnx.Embed(
          self.max_len, d, dtype=self.dtype, param_dtype=jnp.float32,
          embedding_init=layers.param_init(init, ("length", "embed")), rngs=rngs)
    self.type_embedding = nnx.Embed(
        type_vocab, d, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.param_init(init, (None, "embed")), rngs=rngs)
    eps = cfg_get(cfg, "layer_norm_eps")
    # post-LN normalises the embeddings (BERT); pre-LN normalises after the last layer.
    self.embed_norm = layers.LayerNorm(d, eps=eps, dtype=self.dtype, rngs=rngs)
    self.dropout = layers.Dropout(cfg_get(cfg, "dropout"))
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(n_layers)])

  def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, attention_mask: jax.Array,
               *, deterministic: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    require_rngs(deterministic, rngs)
    length = input_ids.shape[1]
    x = (layers.embed_lookup(self.token_embedding, input_ids, jnp.float32)
         + layers.embed_lookup(self.type_embedding, segment_ids, jnp.float32))
    if self.position_embedding is not None:
      if length > self.max_len:
        raise ValueError(f"sequence length {length} exceeds model.max_len={self.max_len}")
      x = x + self.position_embedding.embedding[...][None, :length]
    if not self.pre_norm:
      x = self.embed_norm(x)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    x = constrain(x.astype(self.dtype), HIDDEN)
    for layer in self.layers:
      x = layer(x, attention_mask, deterministic=deterministic, rngs=rngs)
    if self.pre_norm:
      x = self.embed_norm(x)
    return constrain(x, HIDDEN)
