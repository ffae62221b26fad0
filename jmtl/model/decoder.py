"""Seq2seq head: a transformer decoder over the trunk's states (summarization).

Each block is causal self-attention, cross-attention to the encoder states and a feed-forward
layer, with residual connections and LayerNorm placed by `model.norm` ("post": BERT,
x = LN(x + f(x)); "pre": x = x + f(LN(x)) and a final LN). Decoder positions are a learned table
of `model.max_len` rows. With `decoder.tie_embeddings` the trunk's token embedding embeds the
decoder inputs and gives the output logits (`embedding.attend(h)`); otherwise the head owns both.

Besides the teacher-forced `__call__`, the head exposes the incremental interface used by
`jmtl.model.decoding`: `init_cache` (cross-attention K/V computed once, an empty self-attention
K/V buffer) and `decode_step` (one token per sequence, K/V appended at the step's position).

With `decoder.copy` (pointer-generator, See et al. 2017) the head mixes generating and copying:
p(w) = p_gen * softmax(logits)(w) + (1 - p_gen) * sum_{i: src_i = w} a_i, with a the last
layer's cross-attention (mean over heads, padding masked) and
p_gen = sigmoid(w . [h_t; context_t; x_t] + b) (h_t: final decoder state, context_t: the last
layer's cross-attention output, x_t: the decoder input embedding). The head then returns
log(p + COPY_EPS) as its "logits"; log_softmax of them is log p up to COPY_EPS, so losses and
search treat them like ordinary logits. The source token ids come in as `source_ids`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jmtl.model import layers
from jmtl.model.layers import constrain

Array = jax.Array
# init_cache returns (static, cache): static = per-layer cross-attention K/V and the encoder
# mask (fixed for the whole decode); cache = per-layer self-attention K/V buffers.
StaticCache = dict[str, Any]
SelfCache = list[tuple[Array, Array]]
HIDDEN = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "kv")
COPY_EPS = 1e-9  # added to p(w) before the log when copying


def _attention_weights(q: Array, k: Array, mask: Array) -> Array:
  """softmax(q k^T / sqrt(d_head)) over keys, in float32; `mask` [B,T,S] (True = may attend)."""
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None, :, :], scores, layers.NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention, queries from one sequence, keys/values given (self or cross)."""

  def __init__(self, d_model: int, heads: int, attention_dropout: float, dtype, *,
               rngs: nnx.Rngs):
    if d_model % heads:
      raise ValueError(f"model.d_model={d_model} is not divisible by "
                       f"model.decoder.heads={heads}")
    self.heads = heads
    self.d_head = d_model // heads
    shape, names = (heads, self.d_head), ("embed", "heads", "kv")
    self.query = layers.Dense(d_model, shape, names, dtype=dtype, rngs=rngs)
    self.key = layers.Dense(d_model, shape, names, dtype=dtype, rngs=rngs)
    self.value = layers.Dense(d_model, shape, names, dtype=dtype, rngs=rngs)
    self.out = layers.Dense(shape, d_model, ("heads", "kv", "embed"), dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(attention_dropout)

  def project_kv(self, x: Array) -> tuple[Array, Array]:
    """Keys and values [B,S,H,Dh] of `x` [B,S,D]."""
    return constrain(self.key(x), HEADS), constrain(self.value(x), HEADS)

  def attend(self, x: Array, k: Array, v: Array, mask: Array, *, deterministic: bool,
             rngs: nnx.Rngs | None) -> tuple[Array, Array]:
    """Attention of queries from `x` [B,T,D] over `k`/`v` [B,S,H,Dh]; mask [B,T,S].

    Returns the output [B,T,D] and the attention weights before dropout [B,H,T,S] float32."""
    q = constrain(self.query(x), HEADS)
    weights = _attention_weights(q, k, mask)
    w = self.dropout(weights, deterministic=deterministic, rngs=rngs)
    out = self.out(constrain(jnp.einsum("bhts,bshd->bthd", w.astype(v.dtype), v), HEADS))
    return out, weights


class DecoderBlock(nnx.Module):
  """Causal self-attention, cross-attention, FFN; each a residual branch with dropout."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, dec, dtype = cfg.d_model, cfg.decoder, layers.compute_dtype(cfg)
    self.pre_norm = layers.cfg_choice(cfg, "norm", ("post", "pre")) == "pre"
    self.self_attn = MultiHeadAttention(d, dec.heads, cfg.attention_dropout, dtype, rngs=rngs)
    self.cross_attn = MultiHeadAttention(d, dec.heads, cfg.attention_dropout, dtype, rngs=rngs)
    self.ffn = layers.FeedForward(d, dec.d_ff, activation=cfg.activation, dtype=dtype, rngs=rngs)
    eps = cfg.layer_norm_eps
    self.norm_self = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.norm_cross = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.norm_ffn = layers.LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(cfg.dropout)

  def _residual(self, x: Array, norm: layers.LayerNorm, f, deterministic: bool,
                rngs: nnx.Rngs | None) -> Array:
    if self.pre_norm:
      x = x + self.dropout(f(norm(x)), deterministic=deterministic, rngs=rngs)
    else:
      x = norm(x + self.dropout(f(x), deterministic=deterministic, rngs=rngs))
    return constrain(x, HIDDEN)

  def __call__(self, x: Array, kv_fn: Callable[[Array], tuple[Array, Array]],
               self_mask: Array, cross_kv: tuple[Array, Array], cross_mask: Array, *,
               deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[Array, tuple[Array, Array], tuple[Array, Array]]:
    """One block on `x` [B,T,D]. `kv_fn` maps the (normed) self-attention input to the keys
    and values to attend over: its own K/V (teacher forcing) or the cache with this step's K/V
    written in. Returns (x, those K/V, (cross-attention weights [B,H,T,S] before dropout,
    cross-attention output [B,T,D]))."""
    kv, cross = None, None

    def self_branch(h):
      nonlocal kv
      kv = kv_fn(h)
      return self.self_attn.attend(h, *kv, self_mask, deterministic=deterministic, rngs=rngs)[0]

    def cross_branch(h):
      nonlocal cross
      out, weights = self.cross_attn.attend(h, *cross_kv, cross_mask,
                                            deterministic=deterministic, rngs=rngs)
      cross = (weights, out)
      return out

    x = self._residual(x, self.norm_self, self_branch, deterministic, rngs)
    x = self._residual(x, self.norm_cross, cross_branch, deterministic, rngs)
    x = self._residual(x, self.norm_ffn, self.ffn, deterministic, rngs)
    return x, kv, cross


class Seq2SeqHead(nnx.Module):
  """Transformer decoder head: logits[b,t] = P(y_t | y_<t, encoder states) before softmax."""

  def __init__(self, model_cfg, vocab_size: int, *, rngs: nnx.Rngs):
    dec = model_cfg.decoder
    if vocab_size <= 0:
      raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if dec.layers <= 0:
      raise ValueError(f"model.decoder.layers must be positive, got {dec.layers}")
    d, dtype = model_cfg.d_model, layers.compute_dtype(model_cfg)
    self.vocab_size = vocab_size
    self.d_model = d
    self.max_len = model_cfg.max_len
    self.tie_embeddings = bool(dec.tie_embeddings)
    self.pre_norm = layers.cfg_choice(model_cfg, "norm", ("post", "pre")) == "pre"
    self.dtype = dtype
    init = layers.kernel_init()
    self.positions = nnx.Embed(
        model_cfg.max_len, d, dtype=dtype,
        embedding_init=layers.param_init(init, ("length", "embed")), rngs=rngs)
    if self.tie_embeddings:
      self.token_embedding = nnx.data(None)
      self.output = nnx.data(None)
    else:
      self.token_embedding = nnx.Embed(
          vocab_size, d, dtype=dtype,
          embedding_init=layers.param_init(init, ("vocab", "embed")), rngs=rngs)
      self.output = layers.Dense(d, vocab_size, ("embed", "vocab"), dtype=dtype, use_bias=False,
                                 rngs=rngs)
    # Post-norm normalises the embedding sum (as BERT); pre-norm normalises the last block.
    self.norm = layers.LayerNorm(d, eps=model_cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(model_cfg.dropout)
    self.blocks = nnx.List([DecoderBlock(model_cfg, rngs=rngs) for _ in range(dec.layers)])
    self.use_copy = bool(dec.get("copy", False))  # configs saved before the key: off
    if self.use_copy:
      # p_gen = sigmoid(sum_{j,d} W[j,d] [h; context; x][j,d] + b): one logit per position.
      self.copy_gate = layers.Dense((3, d), 1, (None, "embed", None), dtype=jnp.float32,
                                    rngs=rngs)
    else:
      self.copy_gate = nnx.data(None)

  # ------------------------------------------------------------------ helpers
  def _check_embedding(self, embedding: nnx.Embed | None) -> nnx.Embed:
    if not self.tie_embeddings:
      return self.token_embedding  # the caller's embedding is not used when untied
    if embedding is None:
      raise ValueError("decoder.tie_embeddings=True needs the trunk's token embedding "
                       "(embedding=None was given)")
    if (embedding.num_embeddings, embedding.features) != (self.vocab_size, self.d_model):
      raise ValueError(
          f"tied embedding has shape ({embedding.num_embeddings}, {embedding.features}); "
          f"the head expects (vocab_size={self.vocab_size}, d_model={self.d_model})")
    return embedding

  def _embed(self, ids: Array, positions: Array, table: nnx.Embed, *, deterministic: bool,
             rngs: nnx.Rngs | None) -> Array:
    x = (layers.embed_lookup(table, ids, jnp.float32)
         + jnp.take(self.positions.embedding[...], positions, axis=0))
    if not self.pre_norm:
      x = self.norm(x)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    return constrain(x.astype(self.dtype), HIDDEN)

  def _logits(self, x: Array, table: nnx.Embed) -> tuple[Array, Array]:
    """(vocabulary logits [B,T,V] float32, the final state h they are computed from)."""
    if self.pre_norm:
      x = self.norm(x)
    logits = table.attend(x) if self.tie_embeddings else self.output(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), x

  def _check_source(self, source_ids: Array | None, encoder_mask: Array) -> None:
    if not self.use_copy:
      return
    if source_ids is None:
      raise ValueError("decoder.copy=True needs the source token ids (source_ids=None was "
                       "given; pass the batch's input_ids)")
    if tuple(source_ids.shape) != tuple(encoder_mask.shape):
      raise ValueError(f"source_ids shape {tuple(source_ids.shape)} does not match "
                       f"encoder_mask [B,L]={tuple(encoder_mask.shape)}")

  def _output(self, x: Array, x0: Array, cross: tuple[Array, Array],
              source_ids: Array | None, table: nnx.Embed) -> Array:
    """The head's "logits" [B,T,V] float32: vocabulary logits, or log p_final when copying.

    x: last block output; x0: decoder input embedding; cross: the last block's cross-attention
    (weights [B,H,T,S], output [B,T,D])."""
    logits, h = self._logits(x, table)
    if not self.use_copy:
      return logits
    weights, context = cross
    attn = jnp.mean(weights, axis=1)  # [B,T,S], zero on padding, rows sum to 1
    feats = jnp.stack([h.astype(jnp.float32), context.astype(jnp.float32),
                       x0.astype(jnp.float32)], axis=-2)  # [B,T,3,D]
    p_gen = jax.nn.sigmoid(self.copy_gate(feats))  # [B,T,1]
    p_copy = copy_distribution(attn * (1.0 - p_gen), source_ids, self.vocab_size)
    p = p_gen * jax.nn.softmax(logits, axis=-1) + p_copy
    return constrain(jnp.log(p + COPY_EPS), ("batch", "length", "vocab"))

  @staticmethod
  def _check_rngs(deterministic: bool, rngs: nnx.Rngs | None) -> None:
    if not deterministic and rngs is None:
      raise ValueError("Seq2SeqHead: deterministic=False needs rngs (a 'dropout' stream)")

  # ------------------------------------------------------------------ teacher forcing
  def __call__(self, encoder_states: Array, encoder_mask: Array, decoder_input_ids: Array, *,
               embedding: nnx.Embed | None = None, source_ids: Array | None = None,
               deterministic: bool, rngs: nnx.Rngs | None = None) -> Array:
    """Teacher-forced logits [B,T,V] float32 for decoder inputs [B,T] (BOS + target[:-1]).

    encoder_states [B,L,D]; encoder_mask [B,L] (1 = real token); source_ids [B,L] the source
    tokens (needed with decoder.copy, else ignored). Position t attends to decoder positions
    <= t and to real encoder positions.
    """
    self._check_rngs(deterministic, rngs)
    table = self._check_embedding(embedding)
    self._check_source(source_ids, encoder_mask)
    b, t = decoder_input_ids.shape
    if t > self.max_len:
      raise ValueError(f"decoder length {t} exceeds model.max_len={self.max_len}")
    x0 = x = self._embed(decoder_input_ids, jnp.arange(t)[None, :], table,
                         deterministic=deterministic, rngs=rngs)
    enc = encoder_states.astype(self.dtype)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
    cross_mask = jnp.broadcast_to(encoder_mask.astype(bool)[:, None, :], (b, t, enc.shape[1]))
    for block in self.blocks:
      cross_kv = block.cross_attn.project_kv(enc)
      x, _, cross = block(x, block.self_attn.project_kv, causal, cross_kv, cross_mask,
                          deterministic=deterministic, rngs=rngs)
    return self._output(x, x0, cross, source_ids, table)

  # ------------------------------------------------------------------ incremental decoding
  def init_cache(self, encoder_states: Array, encoder_mask: Array, max_len: int, *,
                 source_ids: Array | None = None) -> tuple[StaticCache, SelfCache]:
    """Cross-attention K/V of every layer (computed once), the encoder mask and (with
    decoder.copy) the source ids [B,L]; an empty self-attention K/V buffer [B,max_len,H,Dh]
    per layer."""
    if max_len > self.max_len:
      raise ValueError(f"max decode length {max_len} exceeds model.max_len={self.max_len}")
    self._check_source(source_ids, encoder_mask)
    enc = encoder_states.astype(self.dtype)
    b = enc.shape[0]
    static = {"cross_kv": [blk.cross_attn.project_kv(enc) for blk in self.blocks],
              "encoder_mask": encoder_mask.astype(bool)}
    if self.use_copy:
      static["source_ids"] = jnp.asarray(source_ids, jnp.int32)
    dynamic = []
    for blk in self.blocks:
      shape = (b, max_len, blk.self_attn.heads, blk.self_attn.d_head)
      dynamic.append((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)))
    return static, dynamic

  def decode_step(self, static: StaticCache, cache: SelfCache, token_ids: Array,
                  position: Array, *, embedding: nnx.Embed | None = None
                  ) -> tuple[Array, SelfCache]:
    """Logits [B,V] float32 for the next token after `token_ids` [B] at `position` (a scalar,
    same for all rows); writes this position's self-attention K/V into `cache`."""
    table = self._check_embedding(embedding)
    x0 = x = self._embed(token_ids[:, None], jnp.reshape(position, (1, 1)), table,
                         deterministic=True, rngs=None)
    b, max_len = token_ids.shape[0], cache[0][0].shape[1]
    self_mask = jnp.broadcast_to((jnp.arange(max_len) <= position)[None, None, :],
                                 (b, 1, max_len))
    cross_mask = static["encoder_mask"][:, None, :]
    new_cache = []
    for blk, (ck, cv), cross_kv in zip(self.blocks, cache, static["cross_kv"]):

      def append(h, blk=blk, ck=ck, cv=cv):
        k, v = blk.self_attn.project_kv(h)
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), position, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), position, axis=1)
        return k, v

      x, kv, cross = blk(x, append, self_mask, cross_kv, cross_mask, deterministic=True,
                         rngs=None)
      new_cache.append(kv)
    out = self._output(x, x0, cross, static.get("source_ids"), table)
    return out[:, 0], new_cache


def copy_distribution(weights: Array, source_ids: Array, vocab_size: int) -> Array:
  """p[b,t,w] = sum_{s: source_ids[b,s] = w} weights[b,t,s] -> [B,T,V] float32.

  A scatter-add per batch row (vmapped, so the batch axis stays a batching dimension that
  shards like the rest of the batch); no [B,S,V] one-hot is built."""

  def row(w, src):  # w [T,S], src [S]
    return jnp.zeros((w.shape[0], vocab_size), jnp.float32).at[:, src].add(w)

  out = jax.vmap(row)(weights.astype(jnp.float32), source_ids.astype(jnp.int32))
  return constrain(out, ("batch", "length", "vocab"))
