"""Greedy and beam search against naive re-implementations, exhaustive search and hand cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmtl.defaults import base_config
from jmtl.model import decoding
from jmtl.model.decoder import Seq2SeqHead

V, D, MAXLEN = 7, 32, 16
B, L, T = 4, 7, 8  # one set of shapes, so most tests share compiled programs
PAD, BOS, EOS = 0, 1, 2


def _cfg(**kw):
  c = base_config().model
  c.d_model, c.max_len = D, MAXLEN
  # One decoder layer keeps compiles short; the multi-layer cache is checked step by step in
  # test_decoding_head.py.
  c.decoder.layers, c.decoder.heads, c.decoder.d_ff = 1, 4, 48
  for k, v in kw.items():
    setattr(c.decoder if k in ("tie_embeddings", "copy") else c, k, v)
  return c


def _random_head(seed, cls=Seq2SeqHead, vocab=V, **kw):
  """A head and tied embedding with O(1) random weights (numpy RNG: no per-shape compiles),
  so next-token distributions are far from uniform."""
  cfg = _cfg(**kw)
  gdef, state = nnx.split(nnx.eval_shape(
      lambda: (cls(cfg, vocab, rngs=nnx.Rngs(0)), nnx.Embed(vocab, D, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    noise = 0.3 * rng.normal(size=x.shape)
    scale = "['scale']" in jax.tree_util.keystr(path)  # LayerNorm scales around 1
    return jnp.asarray(noise + (1.0 if scale else 0.0), x.dtype)

  return nnx.merge(gdef, jax.tree.map_with_path(fill, state))


def _encoder(seed, b=B, length=L):
  k1, k2 = jax.random.split(jax.random.key(seed))
  enc = jax.random.normal(k1, (b, length, D))
  lens = jax.random.randint(k2, (b,), 2, length + 1)
  return enc, (jnp.arange(length)[None, :] < lens[:, None]).astype(jnp.int32)


@nnx.jit
def _full_logits(head, enc, mask, ids, emb, src=None):
  return head(enc, mask, ids, embedding=emb, source_ids=src, deterministic=True)


def _source(seed, mask, b=B, length=L):
  """Source token ids [B,L] for copying heads: tokens 3.. at real positions (repeats likely
  with V=7), PAD elsewhere."""
  ids = jax.random.randint(jax.random.key(seed + 100), (b, length), 3, V)
  return jnp.where(mask == 1, ids, PAD).astype(jnp.int32)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _lp(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _trim(seq):
  """Generated tokens up to and including the first EOS."""
  seq = list(map(int, seq))
  return seq[:seq.index(EOS) + 1] if EOS in seq else seq


def _scores(head, emb, enc, mask, seqs, alpha):
  """Length-penalised log P(y | x) of each row's tokens (to EOS), from one teacher-forced call."""
  seqs = np.asarray(seqs)
  ids = np.concatenate([np.full((len(seqs), 1), BOS), seqs[:, :-1]], axis=1)
  logp = _log_softmax(_full_logits(head, enc, mask, jnp.asarray(ids, jnp.int32), emb))
  out = []
  for b, seq in enumerate(seqs):
    y = _trim(seq)
    out.append(sum(logp[b, t, w] for t, w in enumerate(y)) / _lp(len(y), alpha))
  return np.array(out)


def _has_repeat(seq, n):
  grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


def _naive_greedy(head, emb, enc, mask, max_len, src=None):
  """Re-runs the full decoder on the whole prefix at every step (the prefix is right-padded to
  a fixed length, which causal attention cannot see, so there is one compiled program)."""
  b = enc.shape[0]
  ids = np.full((b, max_len), PAD, np.int32)
  ids[:, 0] = BOS
  out = np.full((b, max_len), PAD, np.int32)
  done = np.zeros(b, bool)
  for t in range(max_len):
    logits = np.asarray(_full_logits(head, enc, mask, jnp.asarray(ids), emb, src))[:, t]
    nxt = np.where(done, PAD, logits.argmax(-1))
    out[:, t] = nxt
    done |= nxt == EOS
    if t + 1 < max_len:
      ids[:, t + 1] = nxt
  return out


@pytest.mark.parametrize("seed,copy", [(0, False), (1, False), (2, False), (1, True)])
def test_cached_greedy_equals_naive_greedy(seed, copy):
  head, emb = _random_head(seed, copy=copy)
  enc, mask = _encoder(seed + 10)
  src = _source(seed, mask) if copy else None
  assert (np.asarray(mask) == 0).any()  # some encoder positions are padding
  got = np.asarray(decoding.greedy_decode(head, enc, mask, embedding=emb, bos_id=BOS,
                                          eos_id=EOS, pad_id=PAD, max_len=T, source_ids=src))
  want = _naive_greedy(head, emb, enc, mask, T, src)
  assert got.dtype == np.int32 and got.shape == (B, T)
  np.testing.assert_array_equal(got, want)


def test_outputs_after_eos_are_pad_and_padding_is_ignored():
  seen_eos = 0
  for seed in range(3):
    head, emb = _random_head(seed)
    emb.embedding[...] = emb.embedding[...].at[EOS].multiply(3.0)  # EOS more often
    enc, mask = _encoder(seed)
    args = dict(embedding=emb, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=T)
    for out in (decoding.greedy_decode(head, enc, mask, **args),
                decoding.beam_search(head, enc, mask, beam_size=3, length_penalty=0.6, **args)):
      for row in np.asarray(out):
        if EOS in row:
          seen_eos += 1
          assert (row[list(row).index(EOS) + 1:] == PAD).all()
    # Values at padded encoder positions do not change the output.
    enc_pad = jnp.where(mask[:, :, None] == 1, enc, -50.0)
    np.testing.assert_array_equal(decoding.greedy_decode(head, enc_pad, mask, **args),
                                  decoding.greedy_decode(head, enc, mask, **args))
  assert seen_eos >= 3  # the check above was exercised


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy_and_beam_scores_at_least_greedy(seed):
  head, emb = _random_head(seed)
  enc, mask = _encoder(seed + 20)
  args = dict(embedding=emb, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=T)
  greedy = np.asarray(decoding.greedy_decode(head, enc, mask, **args))
  beam1 = decoding.beam_search(head, enc, mask, beam_size=1, length_penalty=0.0, **args)
  np.testing.assert_array_equal(beam1, greedy)
  for alpha in (0.0, 0.6):
    beam = np.asarray(decoding.beam_search(head, enc, mask, beam_size=3, length_penalty=alpha,
                                           **args))
    s_beam, s_greedy = (_scores(head, emb, enc, mask, x, alpha) for x in (beam, greedy))
    assert (s_beam >= s_greedy - 1e-5).all(), (alpha, s_beam, s_greedy)
  # With beam_size=1 the greedy hypothesis is always a candidate, so under any penalty >= 0
  # the result scores at least as well.
  beam1 = decoding.beam_search(head, enc, mask, beam_size=1, length_penalty=1.0, **args)
  assert (_scores(head, emb, enc, mask, beam1, 1.0)
          >= _scores(head, emb, enc, mask, greedy, 1.0) - 1e-5).all()


def _naive_beam(head, emb, enc, mask, *, k, alpha, max_len, n=0, src=None):
  """Beam search by re-running the full decoder on every hypothesis, one row at a time.

  Same rules as `decoding.beam_search`: keep the best 2k extensions; EOS ones ranked < k (all
  at the last step) finish with score logp / lp(len); the best k others stay alive; stop when
  k are finished and no alive one can beat the worst of them.
  """
  out = []
  for b in range(enc.shape[0]):
    alive, fin = [((), 0.0)], []
    for t in range(max_len):
      if len(fin) >= k:
        bound = max(a[1] for a in alive) / max(_lp(t + 1, alpha), _lp(max_len, alpha))
        if bound <= fin[k - 1][0]:
          break
      ids = np.full((k, max_len), PAD, np.int32)  # fixed shape: one compiled program
      for i, (h, _) in enumerate(alive):
        ids[i, :t + 1] = (BOS,) + h
      logits = _full_logits(head, jnp.repeat(enc[b:b + 1], k, 0),
                            jnp.repeat(mask[b:b + 1], k, 0), jnp.asarray(ids), emb,
                            None if src is None else jnp.repeat(src[b:b + 1], k, 0))
      logp = _log_softmax(logits[:len(alive), t])
      cands = []
      for (h, s), lp_row in zip(alive, logp):
        for w in range(lp_row.shape[0]):
          if n and _has_repeat(list(h) + [w], n):
            continue
          cands.append((s + lp_row[w], h + (w,)))
      cands.sort(key=lambda c: -c[0])
      cands = cands[:2 * k]
      for rank, (s, h) in enumerate(cands):
        if (h[-1] == EOS and rank < k) or t == max_len - 1:
          fin.append((s / _lp(t + 1, alpha), h))
      fin = sorted(fin, key=lambda f: -f[0])[:k]
      alive = [c[::-1] for c in cands if c[1][-1] != EOS][:k]
    best = list(fin[0][1])
    out.append(best + [PAD] * (max_len - len(best)))
  return np.array(out)


@pytest.mark.parametrize("seed,alpha,n,copy", [(3, 0.6, 0, False), (4, 1.0, 2, False),
                                                (5, 0.6, 2, True)])
def test_beam_equals_naive_beam_without_cache(seed, alpha, n, copy):
  head, emb = _random_head(seed, copy=copy)
  enc, mask = _encoder(seed)
  src = _source(seed, mask) if copy else None
  got = decoding.beam_search(head, enc, mask, embedding=emb, bos_id=BOS, eos_id=EOS,
                             pad_id=PAD, max_len=T, beam_size=3, length_penalty=alpha,
                             no_repeat_ngram=n, source_ids=src)
  want = _naive_beam(head, emb, enc, mask, k=3, alpha=alpha, max_len=T, n=n, src=src)
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ table model (hand cases)
class TableHead(nnx.Module):
  """Second-order Markov "decoder": logits = table[previous input token, input token].

  Its cache (the previous input token per row) must be reordered with the beams, so a wrong
  reorder changes the result.
  """

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.tie_embeddings = False

  def init_cache(self, encoder_states, encoder_mask, max_len):
    return {}, jnp.full((encoder_states.shape[0],), BOS, jnp.int32)

  def decode_step(self, static, cache, token_ids, position, *, embedding=None):
    return self.table[...][cache, token_ids], token_ids


def _search_table(table, **kw):
  enc, mask = jnp.zeros((1, 2, 4)), jnp.ones((1, 2), jnp.int32)
  args = dict(embedding=None, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  args.update(kw)
  if "beam_size" in kw:
    return np.asarray(decoding.beam_search(TableHead(table), enc, mask, **args))[0]
  return np.asarray(decoding.greedy_decode(TableHead(table), enc, mask, **args))[0]


def test_hand_built_case_beam_beats_greedy():
  a, b = 3, 4
  table = np.full((5, 5, 5), np.log(1e-6))
  table[BOS, BOS, [a, b]] = np.log([0.6, 0.4])          # first token: a (0.6) or b (0.4)
  table[BOS, a, [EOS, a, b]] = np.log([0.34, 0.33, 0.33])  # after a: nearly uniform
  table[BOS, b, [EOS, a, b]] = np.log([0.9, 0.05, 0.05])   # after b: almost surely EOS
  table[a, :, [EOS, a, b]] = np.log(1 / 3)
  table[b, :, [EOS, a, b]] = np.log(1 / 3)
  table[:, EOS, a] = 0.0  # after EOS the model would go on with a: the output must not
  # greedy: a, EOS (p = 0.6 * 0.34 = 0.204); best: b, EOS (p = 0.4 * 0.9 = 0.36).
  np.testing.assert_array_equal(_search_table(table, max_len=4), [a, EOS, PAD, PAD])
  np.testing.assert_array_equal(
      _search_table(table, max_len=4, beam_size=2, length_penalty=0.0), [b, EOS, PAD, PAD])
  np.testing.assert_array_equal(
      _search_table(table, max_len=4, beam_size=1, length_penalty=0.0), [a, EOS, PAD, PAD])


def test_hand_built_case_length_penalty_prefers_longer():
  a = 3
  table = np.full((5, 5, 5), np.log(1e-6))
  table[BOS, BOS, [EOS, a]] = np.log([0.55, 0.40])  # stop now (0.55) or say a (0.40)
  table[BOS, a, a] = np.log(0.999)                   # then a again
  table[a, a, EOS] = np.log(0.999)                   # then stop
  table[:, EOS, a] = 0.0  # after EOS the model would go on with a: the output must not
  # Scores: [EOS] log(.55)/lp(1) = -0.598; [a, a, EOS] log(.3996)/lp(3) = -0.917/lp(3), which
  # is -0.917 for alpha=0 and -0.516 for alpha=2 ((8/6)^2 = 1.778).
  np.testing.assert_array_equal(
      _search_table(table, max_len=4, beam_size=2, length_penalty=0.0), [EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(
      _search_table(table, max_len=4, beam_size=2, length_penalty=2.0), [a, a, EOS, PAD])
  # beam_size=1: [EOS] finishes at once, but the alive [a] (-0.916) can still reach
  # -0.916 / lp(4) = -0.407 > -0.598, so the search must go on; greedy stops at EOS.
  np.testing.assert_array_equal(
      _search_table(table, max_len=4, beam_size=1, length_penalty=2.0), [a, a, EOS, PAD])
  np.testing.assert_array_equal(_search_table(table, max_len=4), [EOS, PAD, PAD, PAD])


def _brute_force(table, max_len, alpha, n):
  """Best sequence over all of them: ends at its first EOS or at max_len."""
  vocab = table.shape[0]
  logp = _log_softmax(table)
  best, best_score = None, -np.inf
  for length in range(1, max_len + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      if EOS in seq[:-1] or (length < max_len and seq[-1] != EOS):
        continue
      if n and _has_repeat(seq, n):
        continue
      prev = (BOS, BOS) + seq
      s = sum(logp[prev[i], prev[i + 1], w] for i, w in enumerate(seq)) / _lp(length, alpha)
      if s > best_score:
        best, best_score = list(seq), s
  return best + [PAD] * (max_len - len(best))


@pytest.mark.parametrize("seed", range(4))
def test_wide_beam_equals_exhaustive_search(seed):
  # With 4 tokens and 4 steps a beam of 3**3 * 4 = 108 never drops a hypothesis, so beam
  # search must return the exact optimum under the length penalty and the n-gram ban.
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(4, 4, 4)) * 2.0
  table[:, :, EOS] -= 1.0  # make long sequences competitive
  alpha, n = [(0.0, 0), (0.6, 0), (1.5, 2), (0.6, 1)][seed]
  got = _search_table(table, max_len=4, beam_size=108, length_penalty=alpha, no_repeat_ngram=n)
  np.testing.assert_array_equal(got, _brute_force(table, 4, alpha, n))


# ------------------------------------------------------------------ n-gram ban
def test_ngram_ban_matches_brute_force():
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, 3, size=(6, 9)).astype(np.int32)
  ban = jax.jit(decoding.ngram_ban, static_argnums=(2, 3))
  for n in (1, 2, 3):
    for t in range(9):
      got = np.asarray(ban(jnp.asarray(seqs), jnp.int32(t), n, 4))
      for r, seq in enumerate(seqs):
        prefix = [int(x) for x in seq[:t]]  # tokens at t and later must be ignored
        grams = {tuple(prefix[i:i + n]) for i in range(len(prefix) - n + 1)}
        last = tuple(prefix[len(prefix) - n + 1:]) if n > 1 else ()
        want = [len(prefix) >= n - 1 and last + (w,) in grams for w in range(4)]
        np.testing.assert_array_equal(got[r], want, err_msg=f"n={n} t={t} row={r}")


def test_no_repeat_ngram_in_outputs():
  n, repeats = 2, 0
  for seed in (5, 6, 7):
    head, emb = _random_head(seed)
    enc, mask = _encoder(seed)
    args = dict(embedding=emb, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=T)
    plain = np.asarray(decoding.greedy_decode(head, enc, mask, **args))
    repeats += sum(_has_repeat(_trim(r), n) for r in plain)
    for out in (decoding.greedy_decode(head, enc, mask, no_repeat_ngram=n, **args),
                decoding.beam_search(head, enc, mask, beam_size=3, length_penalty=0.6,
                                     no_repeat_ngram=n, **args)):
      for row in np.asarray(out):
        assert not _has_repeat(_trim(row), n), row
  assert repeats > 0  # without the ban, repeats do happen


# ------------------------------------------------------------------ compilation and generate
_TRACES = {"n": 0}


class CountingHead(Seq2SeqHead):
  """Counts how often decode_step is traced (a Python side effect runs only while tracing)."""

  def decode_step(self, *args, **kwargs):
    _TRACES["n"] += 1
    return super().decode_step(*args, **kwargs)


def test_decoding_compiles_once_for_repeated_shapes():
  head, _ = _random_head(0, cls=CountingHead, tie_embeddings=False)
  args = dict(embedding=None, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=T)
  enc, mask = _encoder(0)
  decoding.greedy_decode(head, enc, mask, **args)
  decoding.beam_search(head, enc, mask, beam_size=3, length_penalty=0.6, **args)
  traces = _TRACES["n"]
  assert traces > 0
  for seed in (1, 2):
    other, _ = _random_head(seed, cls=CountingHead, tie_embeddings=False)  # new parameters
    enc, mask = _encoder(seed)
    decoding.greedy_decode(other, enc, mask, **args)
    decoding.beam_search(other, enc, mask, beam_size=3, length_penalty=0.3 * seed, **args)
  assert _TRACES["n"] == traces
  decoding.greedy_decode(other, enc[:2], mask[:2], **args)  # a new batch size traces again
  assert _TRACES["n"] > traces


class _Trunk(nnx.Module):

  def __init__(self, emb):
    self.token_embedding = emb

  def __call__(self, input_ids, segment_ids, attention_mask, *, deterministic):
    return self.token_embedding(input_ids) * (1.0 + segment_ids[..., None])


class _Model(nnx.Module):

  def __init__(self, head, emb):
    self.trunk = _Trunk(emb)
    self.heads = nnx.Dict({"dialogsum": head})


@pytest.mark.parametrize("copy", [False, True])
def test_generate_encodes_and_dispatches(copy):
  head, emb = _random_head(6, copy=copy)
  model = _Model(head, emb)
  ids = np.array([[3, 4, 5, 6, 3, 0, 0], [6, 5, 4, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3],
                  [4, 6, 0, 0, 0, 0, 0]], np.int32)
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids),
           "attention_mask": (ids > 0).astype(np.int32)}
  enc = emb(jnp.asarray(ids))
  mask = jnp.asarray(batch["attention_mask"])
  cfg = base_config().eval
  cfg.max_decode_len, cfg.no_repeat_ngram = T, 0
  args = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
  out = decoding.generate(model, batch, "dialogsum", eval_cfg=cfg, **args)
  assert isinstance(out, np.ndarray) and out.shape == (B, T)
  # A copying head must get the batch's input_ids as its source ids.
  ref = dict(args, source_ids=jnp.asarray(ids) if copy else None)
  np.testing.assert_array_equal(out, decoding.greedy_decode(head, enc, mask, embedding=emb,
                                                            max_len=T, **ref))
  cfg.beam_size, cfg.length_penalty = 3, 0.8
  out = decoding.generate(model, batch, "dialogsum", eval_cfg=cfg, **args)
  np.testing.assert_array_equal(out, decoding.beam_search(
      head, enc, mask, embedding=emb, max_len=T, beam_size=3, length_penalty=0.8, **ref))
  with pytest.raises(KeyError, match="dialogsum"):
    decoding.generate(model, batch, "cnn", eval_cfg=cfg, **args)
  with pytest.raises(ValueError, match="beam_size"):
    cfg.beam_size = 0
    decoding.generate(model, batch, "dialogsum", eval_cfg=cfg, **args)


@pytest.mark.parametrize("copy", [False, True])
def test_greedy_under_a_mesh_with_sharded_parameters(copy):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = base_config().mesh.rules
  table = dict(rules)
  enc, mask = _encoder(3, b=3)  # 3 rows over data x fsdp = 4 devices: uneven on purpose
  args = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=T,
              source_ids=_source(3, mask, b=3) if copy else None)
  head, emb = _random_head(8, copy=copy)
  want = decoding.greedy_decode(head, enc, mask, embedding=emb, **args)

  def place(var):  # logical names -> mesh axes by the rules table; no names: replicated
    names = var.get_metadata().get("out_sharding", ())
    spec = jax.sharding.PartitionSpec(*(table[n] if n else None for n in names))
    return var.replace(jax.device_put(var.get_value(), jax.sharding.NamedSharding(mesh, spec)))

  for module in (head, emb):
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  assert head.blocks[0].ffn.wi.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    got = decoding.greedy_decode(head, enc, mask, embedding=emb, **args)
  np.testing.assert_array_equal(got, want)


def test_bad_arguments_raise_clear_errors():
  head, emb = _random_head(0)
  enc, mask = _encoder(0)
  args = dict(embedding=emb, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="max_len"):
    decoding.greedy_decode(head, enc, mask, max_len=MAXLEN + 1, **args)
  with pytest.raises(ValueError, match="max_len"):
    decoding.greedy_decode(head, enc, mask, max_len=0, **args)
  with pytest.raises(ValueError, match="encoder_mask"):
    decoding.greedy_decode(head, enc, mask[:, :3], max_len=T, **args)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(head, enc, mask, max_len=T, beam_size=0, length_penalty=0.6, **args)
  with pytest.raises(ValueError, match="no_repeat_ngram"):
    decoding.beam_search(head, enc, mask, max_len=T, beam_size=2, length_penalty=0.6,
                         no_repeat_ngram=-1, **args)
