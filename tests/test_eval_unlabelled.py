"""evaluate_task reports only honest metrics: unlabelled splits, unanswerable questions, NaNs."""

import json
import math
import types

import numpy as np
import pytest

from jmtl import defaults, tasks
from jmtl.data import sources
from jmtl.eval import metrics as M
from jmtl.eval import predictions as P
from jmtl.train import evaluate as E

CONFIG = types.SimpleNamespace(eval=types.SimpleNamespace(n_best=20, max_answer_len=30))


def _forward(batch):
  """Fake model: returns the outputs stored in the batch by the test."""
  return {k[len("out_"):]: v for k, v in batch.items() if k.startswith("out_")}


def _cls_set(task_name, labels, logits, pad_rows=1):
  """One batch holding every record (plus `pad_rows` padding rows of index -1)."""
  task = tasks.get_task(task_name)
  records = [{"id": str(i), "text_a": f"text {i}", "text_b": None, "label": lab}
             for i, lab in enumerate(labels)]
  logits = np.asarray(logits, np.float32)
  pad = np.full((pad_rows, logits.shape[1]), 7.0, np.float32)
  batch = {"index": np.array(list(range(len(labels))) + [-1] * pad_rows),
           "out_logits": np.concatenate([logits, pad])}
  return E.EvalSet(task, records, [batch], [{"example_id": r["id"]} for r in records])


# ------------------------------------------------------------------ classification / regression


def test_unlabelled_classification_has_no_metrics_and_null_references(tmp_path):
  es = _cls_set("sst2", [-1, -1, -1], [[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {}
  assert result.labelled is False and result.nonfinite == 0
  assert [r["prediction"] for r in result.rows] == ["positive", "negative", "positive"]
  assert all(r["reference"] is None for r in result.rows)
  path = tmp_path / "sst2.jsonl"
  P.write_predictions(path, result.rows)
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert lines[1] == {"id": "1", "prediction": "negative", "reference": None}


@pytest.mark.parametrize("missing", [None, float("nan"), -1.0])
def test_unlabelled_regression_has_no_metrics(missing):
  es = _cls_set("stsb", [missing, missing], [[1.5], [4.0]])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {} and result.labelled is False
  assert [r["prediction"] for r in result.rows] == [1.5, 4.0]
  assert [r["reference"] for r in result.rows] == [None, None]


def test_label_key_absent_is_unlabelled():
  es = _cls_set("sst2", [0, 1], [[1.0, 0.0], [0.0, 1.0]])
  for r in es.records:
    del r["label"]
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {} and result.labelled is False


def test_labelled_classification_still_scored():
  # Predictions 1, 0, 1 (argmax) against labels 1, 1, 1: accuracy 2/3.
  es = _cls_set("sst2", [1, 1, 1], [[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.labelled is True and result.nonfinite == 0
  assert result.metrics == {"accuracy": pytest.approx(200.0 / 3)}
  assert [r["reference"] for r in result.rows] == ["positive"] * 3


@pytest.mark.parametrize("name,labels,logits", [
    ("sst2", [0, -1, 1, -1, -1], [[1.0, 0.0]] * 5),
    ("stsb", [1.0, float("nan"), 2.0, 3.0, 4.0], [[1.0]] * 5)])
def test_mixed_labels_is_an_error_naming_task_and_count(name, labels, logits):
  es = _cls_set(name, labels, logits)
  n_missing = 3 if name == "sst2" else 1
  with pytest.raises(ValueError, match=rf"task '{name}': {n_missing} of 5 eval records"):
    E.evaluate_task(es, _forward, None, None, CONFIG)


def test_nan_logits_make_classification_metrics_nan():
  # Today argmax([nan, nan]) = 0 would score row 0 as a correct "negative".
  labels = [0, 1, 1, 0]
  logits = [[np.nan, np.nan], [0.0, 1.0], [0.0, np.inf], [1.0, 0.0]]
  result = E.evaluate_task(_cls_set("mrpc", labels, logits), _forward, None, None, CONFIG)
  assert set(result.metrics) == {"f1", "accuracy"}
  assert all(math.isnan(v) for v in result.metrics.values())
  assert result.nonfinite == 2 and result.labelled is True
  assert [r["prediction"] for r in result.rows] == [None, "equivalent", None, "not_equivalent"]


def test_nan_regression_prediction_makes_metrics_nan():
  es = _cls_set("stsb", [1.0, 2.0, 3.0], [[np.nan], [1.0], [2.0]])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert set(result.metrics) == {"pearson", "spearman"}
  assert all(math.isnan(v) for v in result.metrics.values())
  assert result.nonfinite == 1
  assert result.rows[0]["prediction"] is None and result.rows[1]["prediction"] == 1.0


def test_padding_rows_nan_is_ignored():
  es = _cls_set("sst2", [1, 0], [[0.0, 1.0], [1.0, 0.0]])
  es.batches[0]["out_logits"][-1] = np.nan  # the padding row (index -1)
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.nonfinite == 0 and result.metrics == {"accuracy": 100.0}


def test_unlabelled_with_nan_logits_still_has_no_metrics():
  es = _cls_set("sst2", [-1, -1], [[np.nan, 0.0], [0.0, 1.0]])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {} and result.labelled is False and result.nonfinite == 1


# ------------------------------------------------------------------ metrics.compute


@pytest.mark.parametrize("metric", ["pearson", "spearman"])
def test_compute_rejects_nonfinite_correlation_inputs(metric):
  with pytest.raises(ValueError, match=metric):
    M.compute([metric], [float("nan"), 1.0], [1.0, 2.0])
  with pytest.raises(ValueError, match=metric):
    M.compute([metric], [1.0, float("inf"), 3.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=rf"{metric}: 1 non-finite reference"):
    M.compute([metric], [1.0, 2.0, 3.0], [1.0, float("nan"), 3.0])


# ------------------------------------------------------------------ SQuAD

from test_eval_squad import CONTEXT, _word_offsets  # noqa: E402  (the same toy passage)


# Position 0 is [CLS] (offset None), positions 1..11 are the 11 context words.
OFFSETS = [None] + _word_offsets(CONTEXT)
L = len(OFFSETS)


def _squad_set(answers, spans, nan_at=None):
  """One window per question; `spans[i]` = (first word, last word) the logits point at."""
  records = [{"id": f"q{i}", "title": "t", "question": "?", "context": CONTEXT,
              "answers": {"text": list(a), "answer_start": [0] * len(a)}}
             for i, a in enumerate(answers)]
  n = len(records)
  start = np.full((n + 1, L), -10.0, np.float32)
  end = np.full((n + 1, L), -10.0, np.float32)
  for i, (s, e) in enumerate(spans):
    start[i, s + 1] = 5.0
    end[i, e + 1] = 5.0
  if nan_at is not None:
    row, pos = nan_at
    start[row, pos] = np.nan
  batch = {"index": np.array(list(range(n)) + [-1]), "input_ids": np.zeros((n + 1, L), np.int32),
           "out_start_logits": start, "out_end_logits": end}
  meta = [{"example_id": r["id"], "offsets": OFFSETS} for r in records]
  return E.EvalSet(tasks.get_task("squad"), records, [batch], meta)


# q0 predicts "Denver Broncos" (gold: EM 1, F1 1); q2 predicts "the Carolina Panthers in"
# against "Carolina Panthers": EM 0; tokens carolina/panthers/in vs carolina/panthers ->
# P = 2/3, R = 1, F1 = 0.8. q1 and q3 have no gold answer (SQuAD 2.0 style).
SQUAD_ANSWERS = [["Denver Broncos"], [], ["Carolina Panthers"], []]
SQUAD_SPANS = [(0, 1), (7, 9), (3, 6), (0, 0)]


def test_squad_unanswerable_questions_are_left_out_of_the_score():
  result = E.evaluate_task(_squad_set(SQUAD_ANSWERS, SQUAD_SPANS), _forward, None, None, CONFIG)
  assert result.labelled is True and result.nonfinite == 0
  assert result.metrics == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0),
                            "unscored": 2}
  assert [r["prediction"] for r in result.rows] == [
      "Denver Broncos", "Super Bowl 50", "the Carolina Panthers in", "Denver"]
  assert [r["reference"] for r in result.rows] == [
      ["Denver Broncos"], None, ["Carolina Panthers"], None]


def test_squad_all_answerable_has_no_unscored_key():
  answers = [["Denver Broncos"], ["Carolina Panthers"]]
  result = E.evaluate_task(_squad_set(answers, [(0, 1), (3, 6)]), _forward, None, None, CONFIG)
  assert result.labelled is True and result.nonfinite == 0
  assert result.metrics == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0)}


def test_squad_all_unanswerable_is_unlabelled():
  es = _squad_set([[], []], [(0, 1), (3, 6)])
  del es.records[1]["answers"]  # a missing field counts as no answer too
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {} and result.labelled is False
  assert [r["reference"] for r in result.rows] == [None, None]
  assert [r["prediction"] for r in result.rows] == ["Denver Broncos", "the Carolina Panthers in"]


def test_squad_nan_logit_at_context_position_makes_metrics_nan():
  # Today NaN scores are skipped by the span search, so q0 would still score its answer.
  es = _squad_set(SQUAD_ANSWERS, SQUAD_SPANS, nan_at=(0, 5))
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert math.isnan(result.metrics["exact_match"]) and math.isnan(result.metrics["f1"])
  assert result.metrics["unscored"] == 2
  assert result.nonfinite == 1 and result.rows[0]["prediction"] is None


def test_squad_nan_outside_context_is_ignored():
  # Position 0 ([CLS], offset None) never yields a span; padding row 4 is not an example.
  es = _squad_set(SQUAD_ANSWERS, SQUAD_SPANS, nan_at=(0, 0))
  es.batches[0]["out_end_logits"][4, 3] = np.nan
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.nonfinite == 0
  assert result.metrics["exact_match"] == pytest.approx(50.0)


# ------------------------------------------------------------------ real GLUE test split


def test_real_sst2_test_split_is_unlabelled(data_dir):
  assert (data_dir / "glue" / "SST-2" / "test.tsv").is_file(), "glue/SST-2/test.tsv is missing"
  cfg = defaults.base_config()
  cfg.data.dir = str(data_dir)
  records = sources.load_records("sst2", "test", cfg.data)
  assert records
  n, rows = len(records), 32
  rng = np.random.default_rng(0)
  batches = []
  for s in range(0, n, rows):
    index = np.arange(s, s + rows)
    index[index >= n] = -1
    batches.append({"index": index, "out_logits": rng.normal(size=(rows, 2)).astype(np.float32)})
  es = E.EvalSet(tasks.get_task("sst2"), records, batches,
                 [{"example_id": r["id"]} for r in records])
  result = E.evaluate_task(es, _forward, None, None, CONFIG)
  assert result.metrics == {} and result.labelled is False and result.nonfinite == 0
  assert len(result.rows) == n
  assert all(r["reference"] is None for r in result.rows)
  assert {r["prediction"] for r in result.rows} == {"negative", "positive"}
