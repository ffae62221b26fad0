"""Evaluation metrics: GLUE (accuracy, F1, MCC, Pearson, Spearman), ROUGE and SQuAD.

Every score is in percent (0-100); correlations (-1..1) are scaled by 100, as GLUE reports them.

Degenerate inputs never crash:
- an empty list of examples gives 0.0 for every metric;
- F1 with no true positives gives 0.0 (as scikit-learn with `zero_division=0`);
- MCC with a constant prediction or a constant label gives 0.0 (as scikit-learn);
- Pearson/Spearman with a constant prediction or reference (zero variance) or fewer than two
  examples give 0.0.
Inputs that cannot be scored honestly raise ValueError naming the metric, never a number:
- mismatched lengths of predictions and references;
- a non-finite (NaN/inf) prediction or reference for Pearson/Spearman (e.g. from a diverged
  model, or an unlabelled STS-B test row): a NaN must never turn into a score that a
  metric-driven optimizer reads as `val_metric` (`jmtl.train.evaluate` reports such a task's
  metrics as NaN before they reach here);
- non-integer (including NaN) class labels for accuracy/F1/MCC;
- an empty gold-answer list for SQuAD EM/F1 (`jmtl.train.evaluate` leaves unanswerable
  questions out of the score).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

from jmtl import tasks as task_registry

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_CLASS_METRICS = ("accuracy", "f1", "mcc")
_CORR_METRICS = ("pearson", "spearman")
_SQUAD_METRICS = ("exact_match", "squad_f1")
METRIC_NAMES = _CLASS_METRICS + _CORR_METRICS + ROUGE_TYPES + _SQUAD_METRICS
# Output key of each metric: its name, except SQuAD's F1, reported as "f1" (`squad/f1`).
OUTPUT_KEYS = {name: name for name in METRIC_NAMES} | {"squad_f1": "f1"}


def primary_metric_keys(task_names: Sequence[str]) -> list[str]:
  """`<task>/<first metric>` for each task (output names, e.g. squad_f1 -> f1)."""
  keys = []
  for name in task_names:
    first = task_registry.get_task(name).metrics[0]
    keys.append(f"{name}/{OUTPUT_KEYS.get(first, first)}")
  return keys


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
  if len(predictions) != len(references):
    raise ValueError(
        f"predictions and references differ in length: {len(predictions)} != {len(references)}")


def _int_labels(values: Any, what: str) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f"{what} must be a 1-D sequence of labels, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
      raise ValueError(f"{what} must be integer class labels, got dtype {arr.dtype}")
  return arr.astype(np.int64)


def _float_values(values: Any, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"{what} must be a 1-D sequence of numbers, got shape {arr.shape}")
  return arr


# ------------------------------------------------------------------ classification


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
  """100 * mean(prediction == reference)."""
  _check_lengths(predictions, references)
  p, r = _int_labels(predictions, "predictions"), _int_labels(references, "references")
  return 100.0 * float(np.mean(p == r)) if p.size else 0.0


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
  """Binary F1 of the positive class 1: 100 * 2 TP / (2 TP + FP + FN) (0 when TP = 0)."""
  _check_lengths(predictions, references)
  p, r = _int_labels(predictions, "predictions"), _int_labels(references, "references")
  tp = int(np.sum((p == 1) & (r == 1)))
  fp = int(np.sum((p == 1) & (r != 1)))
  fn = int(np.sum((p != 1) & (r == 1)))
  return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(predictions: Sequence[int], references: Sequence[int]) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004) x 100.

  With confusion matrix C (rows = reference, columns = prediction), s = sum(C), c = trace(C),
  t_k = row sums, p_k = column sums:
  MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)); 0 if the
  denominator is 0. For two classes this is (TP TN - FP FN) / sqrt(...).
  """
  _check_lengths(predictions, references)
  p, r = _int_labels(predictions, "predictions"), _int_labels(references, "references")
  if not p.size:
    return 0.0
  _, inverse = np.unique(np.concatenate([p, r]), return_inverse=True)
  pi, ri = inverse[:p.size], inverse[p.size:]
  k = int(inverse.max()) + 1
  conf = np.zeros((k, k), dtype=np.float64)
  np.add.at(conf, (ri, pi), 1.0)
  s, c = conf.sum(), np.trace(conf)
  t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)
  cov_pt = c * s - p_k @ t_k
  cov_pp = s * s - p_k @ p_k
  cov_tt = s * s - t_k @ t_k
  denom = np.sqrt(cov_pp * cov_tt)
  return 100.0 * float(cov_pt / denom) if denom > 0 else 0.0


# ------------------------------------------------------------------ regression


def _check_finite(metric: str, x: np.ndarray, y: np.ndarray) -> None:
  """Raises ValueError naming `metric` if a prediction or reference is NaN/inf."""
  for what, arr in (("prediction", x), ("reference", y)):
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
      raise ValueError(f"{metric}: {bad.size} non-finite {what}(s) (NaN/inf), first at index "
                       f"{int(bad[0])}; a non-finite value has no {metric} score")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  if x.size < 2:
    return 0.0
  xc, yc = x - x.mean(), y - y.mean()
  denom = np.sqrt((xc @ xc) * (yc @ yc))
  if not denom > 0:
    return 0.0
  return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of their ranks (as scipy.stats.rankdata)."""
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Start index of each run of equal values in sorted order.
  starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
  ends = np.concatenate([starts[1:], [x.size]])
  run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(x.size, dtype=np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
  """Pearson's r x 100: cov(x, y) / (std(x) std(y)); 0 when either has zero variance.

  Raises ValueError on a non-finite prediction or reference.
  """
  _check_lengths(predictions, references)
  x, y = _float_values(predictions, "predictions"), _float_values(references, "references")
  _check_finite("pearson", x, y)
  return 100.0 * _pearson(x, y)


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
  """Spearman's rho x 100: Pearson's r of the average ranks; 0 when either is constant.

  Raises ValueError on a non-finite prediction or reference.
  """
  _check_lengths(predictions, references)
  x, y = _float_values(predictions, "predictions"), _float_values(references, "references")
  _check_finite("spearman", x, y)
  return 100.0 * _pearson(_average_ranks(x), _average_ranks(y))


# ------------------------------------------------------------------ ROUGE

# A sentence ends after '.', '!' or '?' (optionally followed by closing quotes/brackets) when
# whitespace follows; newlines always end a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
  """Splits text into sentences after '.', '!' or '?' followed by whitespace, and at newlines."""
  return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _as_reference_list(ref: Any, index: int) -> list[str]:
  if isinstance(ref, str):
    refs = [ref]
  else:
    refs = list(ref) if isinstance(ref, (Sequence, np.ndarray)) else None
  if not refs or not all(isinstance(r, str) for r in refs):
    raise ValueError(
        f"references[{index}] must be a string or a non-empty list of strings, got {ref!r:.80}")
  return refs


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
  """Mean ROUGE F-measure x 100 (`rouge_score`, Porter stemmer), max over references per example.

  rougeLsum is the summary-level LCS over sentences; sentences come from `split_sentences`.
  """
  _check_lengths(predictions, references)
  for t in rouge_types:
    if t not in ROUGE_TYPES:
      raise KeyError(f"unknown ROUGE type {t!r}; known: {', '.join(ROUGE_TYPES)}")
  if len(predictions) == 0:
    return {t: 0.0 for t in rouge_types}
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
  totals = dict.fromkeys(rouge_types, 0.0)
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    if not isinstance(pred, str):
      raise ValueError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
    # One sentence per line: rougeLsum reads lines; the other types ignore newlines.
    pred_lines = "\n".join(split_sentences(pred))
    best = dict.fromkeys(rouge_types, 0.0)
    for r in _as_reference_list(ref, i):
      scores = scorer.score("\n".join(split_sentences(r)), pred_lines)
      for t in rouge_types:
        best[t] = max(best[t], scores[t].fmeasure)
    for t in rouge_types:
      totals[t] += best[t]
  return {t: 100.0 * totals[t] / len(predictions) for t in rouge_types}


# ------------------------------------------------------------------ SQuAD v1.1

_SQUAD_PUNCT = frozenset(string.punctuation)  # ASCII only, as the official script
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """SQuAD v1.1: lower case, drop ASCII punctuation, drop articles a/an/the, collapse spaces."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _SQUAD_PUNCT)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> float:
  """1.0 if the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_token_f1(prediction: str, gold: str) -> float:
  """Token F1 of the normalised answers (bag-of-tokens overlap); 0 when nothing overlaps."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def _gold_answers(ref: Any, index: int) -> list[str]:
  if isinstance(ref, Mapping):  # a record's `answers` field
    if "text" not in ref:
      raise ValueError(f"references[{index}] is a mapping without a 'text' key")
    ref = ref["text"]
  answers = [ref] if isinstance(ref, str) else list(ref)
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"references[{index}] must be a non-empty list of answer strings, "
                     f"got {ref!r:.80}")
  return answers


def _squad(score: Callable[[str, str], float], predictions: Sequence[str],
           references: Sequence[Any]) -> float:
  _check_lengths(predictions, references)
  if len(predictions) == 0:
    return 0.0
  total = 0.0
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    if not isinstance(pred, str):
      raise ValueError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
    total += max(score(pred, g) for g in _gold_answers(ref, i))
  return 100.0 * total / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
  """SQuAD EM x 100: max over gold answers of normalised string equality, averaged."""
  return _squad(squad_exact, predictions, references)


def squad_f1(predictions: Sequence[str], references: Sequence[Any]) -> float:
  """SQuAD F1 x 100: max over gold answers of token F1, averaged."""
  return _squad(squad_token_f1, predictions, references)


# ------------------------------------------------------------------ dispatch

_SIMPLE = {
    "accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
    "exact_match": exact_match, "squad_f1": squad_f1,
}


def compute(metric_names: Sequence[str], predictions: Sequence[Any],
            references: Sequence[Any]) -> dict[str, float]:
  """Computes each named metric; keys are the names, except "squad_f1" -> "f1".

  accuracy/f1/mcc take int labels, pearson/spearman floats, rouge* strings against a string or
  a list of strings per example, exact_match/squad_f1 strings against a list of gold answers.
  Raises ValueError (naming the metric) on inputs with no honest score, e.g. a NaN
  prediction for pearson/spearman (see the module docstring).
  """
  if isinstance(metric_names, str):
    metric_names = [metric_names]
  unknown = [m for m in metric_names if m not in METRIC_NAMES]
  if unknown:
    raise KeyError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
  keys = [OUTPUT_KEYS[m] for m in metric_names]
  clash = sorted({k for k in keys if keys.count(k) > 1})
  if clash:
    raise ValueError(f"metrics {list(metric_names)} map to the same output key(s) {clash}")
  _check_lengths(predictions, references)
  out: dict[str, float] = {}
  rouge_types = [m for m in metric_names if m in ROUGE_TYPES]
  if rouge_types:
    out.update(rouge(predictions, references, rouge_types))
  for m in metric_names:
    if m not in ROUGE_TYPES:
      out[OUTPUT_KEYS[m]] = float(_SIMPLE[m](predictions, references))
  return {OUTPUT_KEYS[m]: out[OUTPUT_KEYS[m]] for m in metric_names}
