"""Batched, jitted decoding for the seq2seq head: greedy and beam search with a K/V cache.

Both decoders drive the head through its incremental interface (see `Seq2SeqHead`):
`head.init_cache(encoder_states, encoder_mask, max_len[, source_ids=...]) -> (static, cache)`
computes the cross-attention K/V once (`source_ids`, the source tokens [B,L], is passed only
when given: a copying head needs it);
`head.decode_step(static, cache, token_ids, position, embedding=...)
-> (logits [N,V], cache)` appends one position of self-attention K/V. Every leaf of `cache` has
the sequence (or sequence*beam) axis first, so beam search reorders it with one gather.

The whole loop is one `jax.lax.while_loop` inside one `jax.jit`; the head and the embedding
enter as `nnx.split` graph definitions (static, compared by structure) and states (traced), so
repeated calls with the same shapes and settings reuse one compiled program, also after the
parameters change.

Output convention: int32 [B, max_len] of generated tokens (BOS not included). The EOS token is
kept; every position after it is `pad_id`. A sequence without EOS fills all `max_len` positions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmtl.parallel import distributed

Array = jax.Array
NEG_INF = -1.0e9  # log-probability of a banned token / an empty beam slot


def length_penalty_factor(length, alpha):
  """GNMT / T5X length penalty ((5 + length) / 6) ** alpha; scores are log_prob / penalty."""
  return ((5.0 + length) / 6.0) ** alpha


def _check_args(encoder_states, encoder_mask, max_len: int, no_repeat_ngram: int) -> None:
  if encoder_states.ndim != 3:
    raise ValueError(f"encoder_states must be [B,L,D], got shape {encoder_states.shape}")
  if tuple(encoder_mask.shape) != tuple(encoder_states.shape[:2]):
    raise ValueError(f"encoder_mask shape {encoder_mask.shape} does not match encoder_states "
                     f"[B,L]={encoder_states.shape[:2]}")
  if max_len < 1:
    raise ValueError(f"max_len (eval.max_decode_len) must be >= 1, got {max_len}")
  if no_repeat_ngram < 0:
    raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")


def _split(head: nnx.Module, embedding: nnx.Module | None):
  head_def, head_state = nnx.split(head)
  if embedding is None:
    return (head_def, None), (head_state, None)
  emb_def, emb_state = nnx.split(embedding)
  return (head_def, emb_def), (head_state, emb_state)


def _init_cache(head, encoder_states, encoder_mask, max_len, source_ids):
  if source_ids is None:
    return head.init_cache(encoder_states, encoder_mask, max_len)
  return head.init_cache(encoder_states, encoder_mask, max_len, source_ids=source_ids)


def _merge(graphdefs, states):
  head = nnx.merge(graphdefs[0], states[0])
  embedding = None if graphdefs[1] is None else nnx.merge(graphdefs[1], states[1])
  return head, embedding


def ngram_ban(seqs: Array, t: Array, n: int, vocab_size: int) -> Array:
  """Bool [N,V]: token w is banned at step t if seqs[:, t-n+1:t] + (w,) already occurs as an
  n-gram in seqs[:, :t] (the tokens generated so far)."""
  num, max_len = seqs.shape
  windows = max_len - n + 1
  if windows <= 0:
    return jnp.zeros((num, vocab_size), bool)
  idx = jnp.arange(windows)[:, None] + jnp.arange(n)[None, :]
  grams = seqs[:, idx]  # [N, W, n]
  prefix = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(t - n + 1, 0), n - 1, axis=1)
  match = jnp.all(grams[:, :, :n - 1] == prefix[:, None, :], axis=-1)
  match &= jnp.arange(windows)[None, :] <= t - n  # the whole n-gram lies before step t
  ban = jnp.zeros((num, vocab_size), jnp.int32)
  ban = ban.at[jnp.arange(num)[:, None], grams[:, :, n - 1]].max(match.astype(jnp.int32))
  return ban > 0


# ---------------------------------------------------------------------------- greedy
@functools.partial(jax.jit, static_argnames=("graphdefs", "bos_id", "eos_id", "pad_id",
                                             "max_len", "no_repeat_ngram"))
def _greedy(graphdefs, states, encoder_states, encoder_mask, source_ids, *, bos_id: int,
            eos_id: int, pad_id: int, max_len: int, no_repeat_ngram: int) -> Array:
  head, embedding = _merge(graphdefs, states)
  static, cache = _init_cache(head, encoder_states, encoder_mask, max_len, source_ids)
  batch = encoder_states.shape[0]

  def cond(carry):
    t, _, done, _, _ = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, tokens, done, cache, last = carry
    logits, cache = head.decode_step(static, cache, last, t, embedding=embedding)
    if no_repeat_ngram:
      logits = jnp.where(ngram_ban(tokens, t, no_repeat_ngram, logits.shape[-1]), NEG_INF,
                         logits)
    nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], t, axis=1)
    return t + 1, tokens, done | (nxt == eos_id), cache, nxt

  carry = (jnp.int32(0), jnp.full((batch, max_len), pad_id, jnp.int32),
           jnp.zeros((batch,), bool), cache, jnp.full((batch,), bos_id, jnp.int32))
  return jax.lax.while_loop(cond, body, carry)[1]


def greedy_decode(head: nnx.Module, encoder_states: Array, encoder_mask: Array, *,
                  embedding: nnx.Embed | None, bos_id: int, eos_id: int, pad_id: int,
                  max_len: int, no_repeat_ngram: int = 0, source_ids: Array | None = None
                  ) -> Array:
  """Greedy decoding: y_t = argmax_w P(w | y_<t, x). Returns int32 [B, max_len] (EOS kept,
  pad after it). `no_repeat_ngram` > 0 bans tokens that would repeat an n-gram.
  `source_ids` [B,L]: the source tokens, for a copying head."""
  _check_args(encoder_states, encoder_mask, max_len, no_repeat_ngram)
  graphdefs, states = _split(head, embedding)
  return _greedy_synced(graphdefs, states, encoder_states, encoder_mask, source_ids,
                        bos_id=int(bos_id), eos_id=int(eos_id), pad_id=int(pad_id),
                        max_len=int(max_len), no_repeat_ngram=int(no_repeat_ngram))


# ---------------------------------------------------------------------------- beam search
@functools.partial(jax.jit, static_argnames=("graphdefs", "bos_id", "eos_id", "pad_id",
                                             "max_len", "beam_size", "no_repeat_ngram"))
def _beam(graphdefs, states, encoder_states, encoder_mask, source_ids, alpha, *, bos_id: int,
          eos_id: int, pad_id: int, max_len: int, beam_size: int, no_repeat_ngram: int
          ) -> Array:
  head, embedding = _merge(graphdefs, states)
  k, batch = beam_size, encoder_states.shape[0]
  static, cache = _init_cache(head, encoder_states, encoder_mask, max_len, source_ids)
  static, cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), (static, cache))
  max_penalty_len = jnp.float32(max_len)

  def cond(carry):
    t, _, alive_logp, _, fin_scores, _ = carry
    # Best score any alive hypothesis can still reach: its log-prob only falls, and its
    # penalised length lies in [t+1, max_len] (the penalty is monotonic in length).
    best_penalty = jnp.maximum(length_penalty_factor(t + 1.0, alpha),
                               length_penalty_factor(max_penalty_len, alpha))
    can_improve = jnp.max(alive_logp, axis=1) / best_penalty > fin_scores[:, -1]
    return (t < max_len) & jnp.any(can_improve)

  def body(carry):
    t, alive_seqs, alive_logp, fin_seqs, fin_scores, cache = carry
    last = jnp.where(t == 0, bos_id,
                     alive_seqs[:, :, jnp.maximum(t - 1, 0)]).reshape(batch * k)
    logits, cache = head.decode_step(static, cache, last, t, embedding=embedding)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    if no_repeat_ngram:
      ban = ngram_ban(alive_seqs.reshape(batch * k, max_len), t, no_repeat_ngram, vocab)
      logp = jnp.where(ban, NEG_INF, logp)
    cand = (alive_logp[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    # 2k candidates: at most k end in EOS, so k non-EOS ones always remain for the beam.
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)
    src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seqs, src[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[:, :, None], t, axis=2)
    # An EOS hypothesis finishes if it is among the k best extensions (it is in the beam);
    # at the last step every hypothesis finishes with length max_len.
    in_beam = jnp.arange(2 * k)[None, :] < k
    finishing = ((tok == eos_id) & in_beam) | (t == max_len - 1)
    new_scores = jnp.where(finishing, top_logp / length_penalty_factor(t + 1.0, alpha), NEG_INF)
    fin_scores, idx = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1), idx[:, :, None],
                                   axis=1)
    # The beam: the k best extensions that do not end in EOS.
    alive_logp, idx = jax.lax.top_k(jnp.where(tok == eos_id, NEG_INF, top_logp), k)
    alive_seqs = jnp.take_along_axis(seqs, idx[:, :, None], axis=1)
    rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(src, idx, axis=1)).reshape(-1)
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)
    return t + 1, alive_seqs, alive_logp, fin_seqs, fin_scores, cache

  seqs0 = jnp.full((batch, k, max_len), pad_id, jnp.int32)
  alive_logp0 = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  carry = (jnp.int32(0), seqs0, alive_logp0, seqs0, jnp.full((batch, k), NEG_INF, jnp.float32),
           cache)
  _, _, _, fin_seqs, _, _ = jax.lax.while_loop(cond, body, carry)
  return fin_seqs[:, 0]


def beam_search(head: nnx.Module, encoder_states: Array, encoder_mask: Array, *,
                embedding: nnx.Embed | None, bos_id: int, eos_id: int, pad_id: int,
                max_len: int, beam_size: int, length_penalty: float,
                no_repeat_ngram: int = 0, source_ids: Array | None = None) -> Array:
  """Beam search; returns the best finished hypothesis per row, int32 [B, max_len].

  Each step extends the `beam_size` alive hypotheses by every token and keeps the best
  extensions; an extension ending in EOS that ranks within the best `beam_size` moves to the
  finished set (kept, scored log P(y) / ((5+|y|)/6)^length_penalty, |y| counting EOS); at
  `max_len` all alive hypotheses finish. A row stops when no alive hypothesis can still beat
  its worst kept finished one. With beam_size=1 and length_penalty=0 this is greedy decoding.
  `no_repeat_ngram` = n > 0 bans any n-gram already generated in the hypothesis.
  `source_ids` [B,L]: the source tokens, for a copying head.
  """
  _check_args(encoder_states, encoder_mask, max_len, no_repeat_ngram)
  if beam_size < 1:
    raise ValueError(f"beam_size (eval.beam_size) must be >= 1, got {beam_size}")
  graphdefs, states = _split(head, embedding)
  return _beam_synced(graphdefs, states, encoder_states, encoder_mask, source_ids,
                      jnp.float32(length_penalty),
                      bos_id=int(bos_id), eos_id=int(eos_id), pad_id=int(pad_id),
                      max_len=int(max_len), beam_size=int(beam_size),
                      no_repeat_ngram=int(no_repeat_ngram))


# ---------------------------------------------------------------------------- generate
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, input_ids, segment_ids, attention_mask) -> Array:
  trunk = nnx.merge(graphdef, state)
  return trunk(input_ids, segment_ids, attention_mask, deterministic=True)


# With several processes, every process reaches each new executable's first run together
# (a late one would otherwise fail the others' first collective: `distributed.first_run_sync`).
_greedy_synced = distributed.first_run_sync(_greedy, "decode_greedy")
_beam_synced = distributed.first_run_sync(_beam, "decode_beam")
_encode_synced = distributed.first_run_sync(_encode, "decode_encode")


def generate(model: Any, task_batch: dict[str, Any], task: str, *, eval_cfg, bos_id: int,
             eos_id: int, pad_id: int) -> np.ndarray:
  """Encodes a seq2seq batch once with `model.trunk`, then decodes with `model.heads[task]`:
  greedy when eval_cfg.beam_size == 1, else beam search (eval_cfg.length_penalty,
  max_decode_len, no_repeat_ngram). A copying head (`head.use_copy`) gets the batch's
  input_ids as its source ids. Returns int32 [B, eval_cfg.max_decode_len] (see module doc).
  """
  if task not in model.heads:
    raise KeyError(f"model has no head for task {task!r} (heads: {sorted(model.heads)})")
  for key in ("input_ids", "segment_ids", "attention_mask"):
    if key not in task_batch:
      raise KeyError(f"task batch for {task!r} has no {key!r} (keys: {sorted(task_batch)})")
  head = model.heads[task]
  trunk_def, trunk_state = nnx.split(model.trunk)
  mask = jnp.asarray(task_batch["attention_mask"])
  hidden = _encode_synced(trunk_def, trunk_state, jnp.asarray(task_batch["input_ids"]),
                          jnp.asarray(task_batch["segment_ids"]), mask)
  embedding = model.trunk.token_embedding if head.tie_embeddings else None
  source_ids = (jnp.asarray(task_batch["input_ids"], jnp.int32)
                if getattr(head, "use_copy", False) else None)
  common = dict(embedding=embedding, source_ids=source_ids, bos_id=bos_id, eos_id=eos_id,
                pad_id=pad_id, max_len=eval_cfg.max_decode_len,
                no_repeat_ngram=eval_cfg.no_repeat_ngram)
  if eval_cfg.beam_size == 1:
    out = greedy_decode(head, hidden, mask, **common)
  else:
    out = beam_search(head, hidden, mask, beam_size=eval_cfg.beam_size,
                      length_penalty=eval_cfg.length_penalty, **common)
  return distributed.to_host(out)  # gathered when other processes hold rows
