"""SQuAD n-best span decoding on hand-built windows and against a loop-based reference."""

import json

import numpy as np
import pytest

from jmtl.eval import metrics as M
from jmtl.eval.squad import postprocess_squad

NEG = -1e4
CONTEXT = "Denver Broncos beat the Carolina Panthers in Super Bowl 50 ."


def _word_offsets(text):
  out, pos = [], 0
  for w in text.split(" "):
    out.append((pos, pos + len(w)))
    pos += len(w) + 1
  return out


WORDS = _word_offsets(CONTEXT)  # 11 words


def _window(first_word, n_words, length=10):
  """[CLS] q q <context words first_word..> [SEP] <pad...>: offsets None except context."""
  offs = [None, None, None] + WORDS[first_word:first_word + n_words] + [None]
  return offs + [None] * (length - len(offs))


def _logits(length, peaks):
  x = np.full(length, NEG)
  for pos, val in peaks.items():
    x[pos] = val
  return x


EXAMPLE = {"id": "q1", "question": "Who won?", "context": CONTEXT,
           "answers": {"text": ["Denver Broncos"], "answer_start": [0]}}
# Window A holds words 0..5 at positions 3..8, window B words 4..9 at positions 3..8.
META = [{"example_id": "q1", "offsets": _window(0, 6)},
        {"example_id": "q1", "offsets": _window(4, 6)}]


def test_best_span_in_second_window():
  start = np.stack([_logits(10, {3: 2.0}), _logits(10, {6: 6.0})])   # A: Denver; B: Super
  end = np.stack([_logits(10, {4: 2.0}), _logits(10, {8: 5.0})])     # A: Broncos; B: 50
  out = postprocess_squad([EXAMPLE], META, start, end)
  assert out == {"q1": "Super Bowl 50"}


def test_overlap_region_answer_depends_on_winning_window():
  # Both windows see "Carolina Panthers" (words 4, 5). Window A's best ends at Panthers,
  # window B's best runs on to "in"; the higher sum decides which text comes back.
  start_a, end_a = _logits(10, {7: 3.0}), _logits(10, {8: 3.0})  # A: Carolina..Panthers = 6
  start_b, end_b = _logits(10, {3: 2.0}), _logits(10, {5: 2.5})  # B: Carolina..in = 4.5
  out = postprocess_squad([EXAMPLE], META, np.stack([start_a, start_b]),
                          np.stack([end_a, end_b]))
  assert out["q1"] == "Carolina Panthers"
  end_b = _logits(10, {5: 4.5})  # B: 6.5 now wins
  out = postprocess_squad([EXAMPLE], META, np.stack([start_a, start_b]),
                          np.stack([end_a, end_b]))
  assert out["q1"] == "Carolina Panthers in"


def test_max_answer_len_and_none_offsets_and_order():
  meta = [META[0]]
  # Highest start is [CLS]/question (None offsets) -> ignored; best valid start Denver (pos 3).
  start = _logits(10, {0: 50.0, 1: 40.0, 3: 5.0, 6: 4.0})[None]
  # Highest end at 8 (Panthers, span of 6 tokens from Denver); next at 4 (Broncos); [SEP] None.
  end = _logits(10, {9: 60.0, 8: 5.0, 4: 3.0})[None]
  assert postprocess_squad([EXAMPLE], meta, start, end)["q1"] == CONTEXT[:41]  # Denver..Panthers
  # With max_answer_len=5 the 6-token span is out: "the Carolina Panthers" (pos 6..8,
  # 4 + 5 = 9.0) beats "Denver Broncos" (pos 3..4, 5 + 3 = 8.0); with 2 only the latter fits.
  assert postprocess_squad([EXAMPLE], meta, start, end,
                           max_answer_len=5)["q1"] == "the Carolina Panthers"
  assert postprocess_squad([EXAMPLE], meta, start, end,
                           max_answer_len=2)["q1"] == "Denver Broncos"
  # end < start is never taken: start only at Panthers (8), ends only before it.
  start = _logits(10, {8: 5.0})[None]
  end = _logits(10, {3: 5.0, 4: 4.0})[None]
  assert postprocess_squad([EXAMPLE], meta, start, end, n_best=2)["q1"] == ""


def test_n_best_limits_candidates():
  meta = [META[0]]
  start = _logits(10, {5: 9.0, 3: 1.0})[None]  # best start "beat" (pos 5), then Denver (3)
  end = _logits(10, {4: 9.0, 6: 0.5})[None]    # best end Broncos (pos 4) < 5, then "the"
  # n_best=1: only (5, 4) is considered and it is invalid -> "".
  assert postprocess_squad([EXAMPLE], meta, start, end, n_best=1)["q1"] == ""
  # n_best=2 admits (5, 6) "beat the" = 9.5 and (3, 4) "Denver Broncos" = 10.
  assert postprocess_squad([EXAMPLE], meta, start, end, n_best=2)["q1"] == "Denver Broncos"


def test_examples_without_features_or_valid_pairs_get_empty_string():
  other = {"id": "q2", "question": "?", "context": "x", "answers": {"text": ["x"]}}
  start = np.stack([_logits(10, {3: 1.0}), _logits(10, {3: 1.0})])
  end = np.stack([_logits(10, {4: 1.0}), _logits(10, {4: 1.0})])
  out = postprocess_squad([EXAMPLE, other], META, start, end)
  assert out == {"q1": "Denver Broncos", "q2": ""}
  assert postprocess_squad([other], [], np.zeros((0, 10)), np.zeros((0, 10))) == {"q2": ""}


def test_bad_inputs():
  start = np.zeros((2, 10))
  with pytest.raises(ValueError, match="2 rows of logits but 1"):
    postprocess_squad([EXAMPLE], META[:1], start, start)
  with pytest.raises(ValueError, match="offsets"):
    postprocess_squad([EXAMPLE], META, np.zeros((2, 9)), np.zeros((2, 9)))
  with pytest.raises(KeyError, match="zz"):
    postprocess_squad([EXAMPLE], [{"example_id": "zz", "offsets": META[0]["offsets"]}],
                      start[:1], start[:1])
  with pytest.raises(ValueError, match="n_best"):
    postprocess_squad([EXAMPLE], META, start, start, n_best=0)


def _reference_decode(examples, metas, start, end, n_best, max_len):
  """Straight loops over every feature and top-n pair, as the published reference code."""
  best = {}
  for i, meta in enumerate(metas):
    offs = meta["offsets"]
    s_top = sorted(range(len(offs)), key=lambda j: -start[i][j])[:n_best]
    e_top = sorted(range(len(offs)), key=lambda j: -end[i][j])[:n_best]
    for s in s_top:
      for e in e_top:
        if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_len:
          continue
        score = start[i][s] + end[i][e]
        if meta["example_id"] not in best or score > best[meta["example_id"]][0]:
          ctx = examples[meta["example_id"]]["context"]
          best[meta["example_id"]] = (score, ctx[offs[s][0]:offs[e][1]])
  return {k: best.get(k, (0, ""))[1] for k in examples}


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference_on_random_logits(seed):
  rng = np.random.default_rng(seed)
  examples, metas = {}, []
  for q in range(6):
    words = [f"w{q}_{j}" for j in range(int(rng.integers(5, 25)))]
    ctx = " ".join(words)
    examples[f"q{q}"] = {"id": f"q{q}", "question": "?", "context": ctx,
                         "answers": {"text": [words[0]]}}
    offs = _word_offsets(ctx)
    for first in range(0, len(words), 6):  # windows of 8 context words, stride 6
      window = [None, None] + offs[first:first + 8] + [None]
      metas.append({"example_id": f"q{q}", "offsets": window + [None] * (12 - len(window))})
  start = rng.normal(size=(len(metas), 12))
  end = rng.normal(size=(len(metas), 12))
  for n_best, max_len in [(20, 30), (3, 4), (5, 1)]:
    got = postprocess_squad(list(examples.values()), metas, start, end, n_best=n_best,
                            max_answer_len=max_len)
    assert got == _reference_decode(examples, metas, start, end, n_best, max_len)


def test_real_squad_contexts_with_peaked_logits(data_dir):
  """On real SQuAD dev paragraphs, logits peaked at the gold tokens decode to the gold answer."""
  with open(data_dir / "squad" / "dev-v1.1.json", encoding="utf-8") as f:
    articles = json.load(f)["data"]
  examples, metas, starts, ends, length, expected = [], [], [], [], 64, {}
  for para in articles[0]["paragraphs"][:8]:
    ctx = para["context"]
    offs, pos = [], 0
    for w in ctx.split():  # whitespace tokens with character offsets
      pos = ctx.index(w, pos)
      offs.append((pos, pos + len(w)))
      pos += len(w)
    for qa in para["qas"]:
      gold = qa["answers"][0]
      a0, a1 = gold["answer_start"], gold["answer_start"] + len(gold["text"])
      s_tok = next(j for j, (b, e) in enumerate(offs) if e > a0)
      e_tok = next(j for j, (b, e) in enumerate(offs) if e >= a1)
      expected[qa["id"]] = ctx[offs[s_tok][0]:offs[e_tok][1]]  # the gold tokens' text
      examples.append({"id": qa["id"], "question": qa["question"], "context": ctx,
                       "answers": {"text": [a["text"] for a in qa["answers"]]}})
      for first in range(0, len(offs), 40):  # windows of 60 context tokens, stride 40
        window = [None] + offs[first:first + 60] + [None]
        window += [None] * (length - len(window))
        st, en = np.full(length, -5.0), np.full(length, -5.0)
        if first <= s_tok and e_tok < first + 60:
          st[1 + s_tok - first] = 10.0
          en[1 + e_tok - first] = 10.0
        metas.append({"example_id": qa["id"], "offsets": window})
        starts.append(st)
        ends.append(en)
  answers = postprocess_squad(examples, metas, np.stack(starts), np.stack(ends))
  preds = [answers[e["id"]] for e in examples]
  refs = [e["answers"]["text"] for e in examples]
  scores = M.compute(["exact_match", "squad_f1"], preds, refs)
  assert len(examples) > 30
  assert answers == expected
  # Whitespace tokens can be longer than the gold span ("2\u00bd" for "2", "third-most" for
  # "third"), so a few answers differ from the gold text; nearly all match.
  assert scores["exact_match"] > 85.0
  assert scores["f1"] > 90.0
