"""GLUE, ROUGE and SQuAD metrics against scikit-learn, scipy, hand counts and the official rules."""

import collections
import itertools

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jmtl.eval import metrics as M

# ------------------------------------------------------------------ classification


def test_classification_hand_example():
  # TP=2 (idx 0, 4), FP=1 (idx 1), FN=1 (idx 3), TN=1 (idx 2).
  preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
  out = M.compute(["accuracy", "f1", "mcc"], preds, refs)
  assert out["accuracy"] == pytest.approx(60.0)
  assert out["f1"] == pytest.approx(100 * 4 / 6)  # 2TP / (2TP + FP + FN)
  # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2)
  assert out["mcc"] == pytest.approx(100 / 6)
  assert list(out) == ["accuracy", "f1", "mcc"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  refs = rng.integers(0, 2, size=200)
  preds = np.where(rng.random(200) < 0.7, refs, 1 - refs)
  out = M.compute(["accuracy", "f1", "mcc"], preds, refs)
  assert out["accuracy"] == pytest.approx(100 * skm.accuracy_score(refs, preds))
  assert out["f1"] == pytest.approx(100 * skm.f1_score(refs, preds))
  assert out["mcc"] == pytest.approx(100 * skm.matthews_corrcoef(refs, preds))


def test_multiclass_mcc_and_accuracy_against_sklearn():
  rng = np.random.default_rng(7)
  refs = rng.integers(0, 3, size=300)
  preds = np.where(rng.random(300) < 0.5, refs, rng.integers(0, 3, size=300))
  assert M.mcc(preds, refs) == pytest.approx(100 * skm.matthews_corrcoef(refs, preds))
  assert M.accuracy(preds, refs) == pytest.approx(100 * skm.accuracy_score(refs, preds))
  # Class labels need not be contiguous.
  assert M.mcc(preds * 5 + 2, refs * 5 + 2) == pytest.approx(M.mcc(preds, refs))


def test_classification_degenerate_cases():
  # Constant prediction: MCC defined as 0 (as sklearn); F1 = 0 without true positives.
  assert M.mcc([0, 0, 0, 0], [0, 1, 0, 1]) == 0.0
  assert skm.matthews_corrcoef([0, 1, 0, 1], [0, 0, 0, 0]) == 0.0
  assert M.f1([0, 0, 0], [0, 0, 0]) == 0.0
  assert M.f1([1, 1], [0, 0]) == 0.0
  assert M.compute(["accuracy", "f1", "mcc"], [], []) == {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0}
  assert M.mcc([1, 0, 1], [1, 0, 1]) == pytest.approx(100.0)
  assert M.mcc([0, 1, 0], [1, 0, 1]) == pytest.approx(-100.0)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="differ in length"):
    M.compute(["accuracy"], [1, 0], [1])
  with pytest.raises(ValueError, match="differ in length"):
    M.compute(["rouge1"], ["a"], [])
  with pytest.raises(KeyError, match="bleu"):
    M.compute(["bleu"], [1], [1])
  with pytest.raises(ValueError, match="same output key"):
    M.compute(["f1", "squad_f1"], ["a"], [["a"]])
  with pytest.raises(ValueError, match="integer class labels"):
    M.accuracy([0.5, 1.0], [0, 1])
  with pytest.raises(ValueError, match=r"references\[1\]"):
    M.exact_match(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match=r"references\[0\]"):
    M.rouge(["a"], [[]])


# ------------------------------------------------------------------ correlations


def test_correlations_against_scipy():
  rng = np.random.default_rng(3)
  refs = rng.uniform(0, 5, size=150)
  preds = refs + rng.normal(0, 1.0, size=150)
  # Ties (STS-B gold scores are on a 0.2 grid) exercise average ranks.
  refs_t, preds_t = np.round(refs), np.round(preds * 2) / 2
  for p, r in [(preds, refs), (preds_t, refs_t)]:
    out = M.compute(["pearson", "spearman"], p.tolist(), r.tolist())
    assert out["pearson"] == pytest.approx(100 * stats.pearsonr(p, r)[0], abs=1e-9)
    assert out["spearman"] == pytest.approx(100 * stats.spearmanr(p, r)[0], abs=1e-9)


def test_correlations_hand_and_degenerate():
  assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(100.0)
  assert M.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(100.0)
  assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)
  # Constant predictions: zero variance -> 0 (documented), not NaN.
  assert M.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
  assert M.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
  assert M.pearson([1.0], [1.0]) == 0.0
  # A non-finite value has no score: an error naming the metric, never 0.0 or NaN.
  with pytest.raises(ValueError, match="pearson: 1 non-finite prediction"):
    M.pearson([float("nan"), 1.0, 2.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="spearman: 1 non-finite prediction"):
    M.spearman([float("nan"), 1.0, 2.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="pearson: 1 non-finite reference"):
    M.pearson([1.0, 2.0, 3.0], [1.0, float("-inf"), 3.0])
  assert M.compute(["pearson", "spearman"], [], []) == {"pearson": 0.0, "spearman": 0.0}


# ------------------------------------------------------------------ ROUGE
# Words of <= 3 letters are never stemmed by rouge_score, so counts below are plain word counts.


def test_rouge_hand_counts():
  pred = "the cat sat on the mat"
  ref = "the cat was on the mat"
  # unigrams: the x2, cat, on, mat overlap -> 5 of 6 on both sides.
  # bigrams: the-cat, on-the, the-mat overlap -> 3 of 5.
  # LCS: the cat on the mat -> 5.
  out = M.compute(["rouge1", "rouge2", "rougeL", "rougeLsum"], [pred], [ref])
  assert out["rouge1"] == pytest.approx(100 * 5 / 6)
  assert out["rouge2"] == pytest.approx(100 * 3 / 5)
  assert out["rougeL"] == pytest.approx(100 * 5 / 6)
  assert out["rougeLsum"] == pytest.approx(100 * 5 / 6)  # one sentence: Lsum == L


def test_rouge_uses_stemmer():
  # Porter stems "running" and "runs" to "run"; without the stemmer nothing would match.
  assert M.rouge(["running"], ["runs"], ["rouge1"])["rouge1"] == pytest.approx(100.0)


def test_rouge_lsum_splits_sentences():
  ref = "the cat sat. the dog ran."
  pred = "the dog ran! the cat sat."
  # rougeL over whole token lists: LCS = 3 of 6 tokens -> F = 0.5.
  # rougeLsum: each reference sentence has a union-LCS of 3 with the prediction's sentences,
  # 6 hits of 6 tokens -> F = 1.
  out = M.compute(["rougeL", "rougeLsum"], [pred], [ref])
  assert out["rougeL"] == pytest.approx(50.0)
  assert out["rougeLsum"] == pytest.approx(100.0)
  # Without a sentence boundary (no whitespace after '.') each text is one sentence: Lsum == L.
  out = M.compute(["rougeL", "rougeLsum"], ["the dog ran.the cat sat."],
                  ["the cat sat.the dog ran."])
  assert out["rougeL"] == pytest.approx(50.0)
  assert out["rougeLsum"] == pytest.approx(50.0)


def test_split_sentences_rule():
  assert M.split_sentences('He said "hi." Then he left! Why? ok') == [
      'He said "hi."', "Then he left!", "Why?", "ok"]
  assert M.split_sentences("3.5 is a number.\nNext line") == ["3.5 is a number.", "Next line"]
  assert M.split_sentences("  ") == []


def test_rouge_multi_reference_max_and_mean():
  preds = ["the cat sat on the mat", "a big red dog"]
  refs = [["a dog ran", "the cat was on the mat"], "a big red dog"]
  out = M.compute(["rouge1", "rouge2"], preds, refs)
  # Example 1 takes its best reference (5/6, 3/5); example 2 is exact (1, 1).
  assert out["rouge1"] == pytest.approx(100 * (5 / 6 + 1) / 2)
  assert out["rouge2"] == pytest.approx(100 * (3 / 5 + 1) / 2)


def _ngram_f(pred, ref, n):
  p = collections.Counter(zip(*[pred[i:] for i in range(n)]))
  r = collections.Counter(zip(*[ref[i:] for i in range(n)]))
  hits = sum((p & r).values())
  if not hits:
    return 0.0
  prec, rec = hits / sum(p.values()), hits / sum(r.values())
  return 2 * prec * rec / (prec + rec)


def _lcs_f(pred, ref):
  table = np.zeros((len(ref) + 1, len(pred) + 1), dtype=int)
  for i, j in itertools.product(range(len(ref)), range(len(pred))):
    table[i + 1, j + 1] = (table[i, j] + 1 if ref[i] == pred[j]
                           else max(table[i, j + 1], table[i + 1, j]))
  lcs = table[-1, -1]
  if not lcs:
    return 0.0
  prec, rec = lcs / len(pred), lcs / len(ref)
  return 2 * prec * rec / (prec + rec)


def test_rouge_against_reimplementation_on_random_texts():
  vocab = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "red", "big"]
  rng = np.random.default_rng(11)
  preds, refs = [], []
  for _ in range(30):
    preds.append([vocab[i] for i in rng.integers(0, len(vocab), size=rng.integers(1, 12))])
    refs.append([vocab[i] for i in rng.integers(0, len(vocab), size=rng.integers(1, 12))])
  out = M.compute(["rouge1", "rouge2", "rougeL"], [" ".join(p) for p in preds],
                  [" ".join(r) for r in refs])
  assert out["rouge1"] == pytest.approx(100 * np.mean([_ngram_f(p, r, 1) for p, r in
                                                       zip(preds, refs)]))
  assert out["rouge2"] == pytest.approx(100 * np.mean([_ngram_f(p, r, 2) for p, r in
                                                       zip(preds, refs)]))
  assert out["rougeL"] == pytest.approx(100 * np.mean([_lcs_f(p, r) for p, r in
                                                       zip(preds, refs)]))


def test_rouge_empty_prediction_and_empty_list():
  assert M.rouge([""], ["the cat"])["rouge1"] == 0.0
  assert M.compute(["rouge1", "rougeLsum"], [], []) == {"rouge1": 0.0, "rougeLsum": 0.0}


# ------------------------------------------------------------------ SQuAD


@pytest.mark.parametrize("text, expected", [
    ("The the", ""),
    ("  Denver   Broncos. ", "denver broncos"),
    ("An apple a day", "apple day"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("the-cat", "thecat"),  # punctuation goes before articles are matched
    ("A.B.C.", "abc"),
    ("Denver's", "denvers"),
    ("Denver\u2019s", "denver\u2019s"),  # U+2019 is not in string.punctuation: kept
    ("\u00abParis\u00bb \u2014 France", "\u00abparis\u00bb \u2014 france"),
    ("\tTHE\nEnd\u00a0", "end"),  # any whitespace (incl. NBSP) collapses
])
def test_normalize_answer(text, expected):
  assert M.normalize_answer(text) == expected


def test_squad_em_f1_hand_examples():
  # pred, gold answers, EM, F1 (official v1.1 definitions)
  cases = [
      ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
      ("Denver Broncos won", ["Denver Broncos"], 0.0, 0.8),  # P=2/3, R=1
      ("Denver Broncos", ["Carolina Panthers", "Broncos"], 0.0, 2 / 3),  # max over golds
      ("Denver\u2019s", ["Denver's"], 0.0, 0.0),
      ("", ["Broncos"], 0.0, 0.0),
      ("the", ["a"], 1.0, 0.0),  # both normalise to "": equal strings, no tokens to overlap
      ("broncos broncos", ["broncos"], 0.0, 2 / 3),  # counts clip: P=1/2, R=1
  ]
  preds = [c[0] for c in cases]
  refs = [c[1] for c in cases]
  for pred, golds, em, f in cases:
    assert M.exact_match([pred], [golds]) == pytest.approx(100 * em)
    assert M.squad_f1([pred], [golds]) == pytest.approx(100 * f)
  out = M.compute(["exact_match", "squad_f1"], preds, refs)
  assert list(out) == ["exact_match", "f1"]
  assert out["exact_match"] == pytest.approx(100 * np.mean([c[2] for c in cases]))
  assert out["f1"] == pytest.approx(100 * np.mean([c[3] for c in cases]))


def test_squad_accepts_answers_dict_and_single_string():
  answers = {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}
  assert M.exact_match(["Broncos"], [answers]) == 100.0
  assert M.squad_f1(["Broncos"], ["Denver Broncos"]) == pytest.approx(100 * 2 / 3)
