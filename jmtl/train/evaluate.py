"""Evaluation: model outputs on a task's eval split -> predictions -> metrics.

Per task kind: classification = argmax of logits; regression = logits[:, 0]; span_qa = n-best
span decoding over all windows of a question; seq2seq = greedy or beam decoding, detokenized.

Only honest scores are reported (`evaluate_task`):
- Unlabelled rows: a classification/regression record whose `label` is missing, None, -1 or
  NaN; a span_qa record whose `answers` (text list) is missing or empty (a SQuAD-2.0-style
  unanswerable question); a seq2seq record with no non-empty `references`. A task whose rows
  are all unlabelled (e.g. GLUE `test.tsv`) gets no metrics (`labelled=False`, `metrics={}`)
  and prediction rows with `reference: None`. A classification/regression/seq2seq task that
  mixes labelled and unlabelled rows is an error (ValueError naming the task and the count).
  span_qa scores only the answerable questions and adds `unscored` (the number left out) to
  its metrics when there are any.
- Non-finite outputs: if a model output used for a prediction is NaN/inf (the logits of a
  classification row, logits[:, 0] of a regression row, start/end logits at the context
  positions of any window of a span_qa question), every metric of the task is NaN, the
  result's `nonfinite` counts those rows and their prediction is None. A NaN metric means
  "no valid score": callers must not feed it to a metric-driven optimizer as a validation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jmtl.eval import baselines
from jmtl.eval import metrics as metrics_lib
from jmtl.eval import squad as squad_lib


@dataclasses.dataclass
class EvalSet:
  """A task's eval records and their batches, prepared once per run."""
  task: Any
  records: list[dict]
  batches: list[dict]
  meta: list[dict]


@dataclasses.dataclass
class TaskResult:
  """One task's evaluation (rules in the module docstring).

  metrics: `{metric: value}` (output keys of `metrics.compute`, percent); `{}` when the task is
    unlabelled; every value NaN when `nonfinite > 0`; span_qa adds `unscored` (a count) when
    some questions have no gold answer.
  rows: `{"id", "prediction", "reference"}` per example; `reference` None for an unlabelled
    row, `prediction` None for a row with non-finite model outputs.
  labelled: False when no eval record carries a label (no metrics computed).
  nonfinite: number of examples whose model outputs (used for the prediction) were NaN/inf.
  """
  metrics: dict[str, float]
  rows: list[dict]
  labelled: bool = True
  nonfinite: int = 0


def _is_missing_number(value: Any) -> bool:
  """True for a classification/regression label that marks an unlabelled row."""
  if value is None:
    return True
  try:
    x = float(value)
  except (TypeError, ValueError):
    return False
  return math.isnan(x) or x == -1.0


def _answer_texts(record: Mapping[str, Any]) -> list[str]:
  """A span_qa record's gold answer texts ([] when `answers` is missing or empty)."""
  answers = record.get("answers")
  texts = answers.get("text") if isinstance(answers, Mapping) else answers
  return list(texts) if texts is not None else []


def _has_label(task: Any, record: Mapping[str, Any]) -> bool:
  """Whether `record` carries a reference for `task`'s metrics (module docstring)."""
  if task.kind == "span_qa":
    return bool(_answer_texts(record))
  if task.kind == "seq2seq":
    refs = record.get("references")
    return bool(refs) and any(isinstance(r, str) and r.strip() for r in refs)
  return not _is_missing_number(record.get("label"))


def _references(task: Any, records: Sequence[dict], labelled: Sequence[bool]) -> list:
  """Each record's reference for the metrics; None for an unlabelled record."""
  if task.kind == "span_qa":
    return [_answer_texts(r) if ok else None for r, ok in zip(records, labelled)]
  if task.kind == "seq2seq":
    return [list(r["references"]) if ok else None for r, ok in zip(records, labelled)]
  return [r["label"] if ok else None for r, ok in zip(records, labelled)]


def _label_text(task, label):
  names = getattr(task, "label_names", None)
  if label is not None and task.kind == "classification" and names:
    return names[int(label)]
  return label


def _span_nonfinite(meta: Sequence[Mapping[str, Any]], starts: np.ndarray,
                    ends: np.ndarray) -> set[str]:
  """Ids of questions with a NaN/inf start or end logit at a context position of any window."""
  bad: set[str] = set()
  for i, m in enumerate(meta):
    context = np.array([o is not None for o in m["offsets"]], dtype=bool)
    if not (np.all(np.isfinite(starts[i][context])) and np.all(np.isfinite(ends[i][context]))):
      bad.add(str(m["example_id"]))
  return bad


def evaluate_task(eval_set: EvalSet, forward: Callable[[dict], Mapping[str, Any]],
                  generate: Callable[[dict], np.ndarray] | None, tokenizer, config) -> TaskResult:
  """Runs one task's eval split. `forward(batch)` gives model outputs; `generate(batch)` token ids.

  Unlabelled tasks get no metrics, unanswerable span_qa questions are left out of the score
  (`unscored`), and non-finite model outputs make every metric NaN (module docstring).
  Raises ValueError when a non-span_qa task mixes labelled and unlabelled records.
  """
  task, records = eval_set.task, eval_set.records
  labelled = [_has_label(task, r) for r in records]
  n_unlabelled = labelled.count(False)
  if n_unlabelled and n_unlabelled < len(records) and task.kind != "span_qa":
    raise ValueError(
        f"task {task.name!r}: {n_unlabelled} of {len(records)} eval records have no label; "
        f"a split must be all labelled or all unlabelled")
  has_labels = n_unlabelled < len(records) or not records
  refs = _references(task, records, labelled)
  n = len(eval_set.meta)
  bad_rows = np.zeros((len(records),), bool)  # non-finite model outputs, per record
  if task.kind in ("classification", "regression"):
    preds = np.zeros((n,), np.float32 if task.kind == "regression" else np.int64)
    bad = np.zeros((n,), bool)
    for batch in eval_set.batches:
      logits = np.asarray(jax.device_get(forward(batch)["logits"]))
      keep = batch["index"] >= 0
      idx = batch["index"][keep]
      used = logits[:, :1] if task.kind == "regression" else logits
      bad[idx] = ~np.all(np.isfinite(used), axis=-1)[keep]
      preds[idx] = (logits[:, 0] if task.kind == "regression" else logits.argmax(-1))[keep]
    pred_list = preds.tolist()
    bad_rows = bad
  elif task.kind == "span_qa":
    seq_len = eval_set.batches[0]["input_ids"].shape[1] if eval_set.batches else 0
    starts = np.zeros((n, seq_len), np.float32)
    ends = np.zeros((n, seq_len), np.float32)
    for batch in eval_set.batches:
      out = jax.device_get(forward(batch))
      keep = batch["index"] >= 0
      starts[batch["index"][keep]] = np.asarray(out["start_logits"])[keep]
      ends[batch["index"][keep]] = np.asarray(out["end_logits"])[keep]
    answers = squad_lib.postprocess_squad(records, eval_set.meta, starts, ends,
                                          n_best=config.eval.n_best,
                                          max_answer_len=config.eval.max_answer_len)
    pred_list = [answers.get(r["id"], "") for r in records]
    bad_ids = _span_nonfinite(eval_set.meta, starts, ends)
    bad_rows = np.array([str(r["id"]) in bad_ids for r in records], bool)
  elif task.kind == "seq2seq":
    texts = [""] * n
    for batch in eval_set.batches:
      ids = np.asarray(generate(batch))
      for row, i in enumerate(batch["index"]):
        if i >= 0:
          texts[i] = tokenizer.decode([int(t) for t in ids[row]])
    pred_list = texts
  else:
    raise ValueError(f"task {task.name!r}: unknown kind {task.kind!r}")
  if task.kind != "span_qa" and len(pred_list) != len(records):
    raise ValueError(f"task {task.name!r}: {len(pred_list)} predictions for {len(records)} records")
  nonfinite = int(bad_rows.sum())

  metrics: dict[str, float] = {}
  if has_labels:
    scored = [i for i, ok in enumerate(labelled) if ok]
    if nonfinite:
      metrics = {metrics_lib.OUTPUT_KEYS[m]: float("nan") for m in task.metrics}
    else:
      metrics = metrics_lib.compute(task.metrics, [pred_list[i] for i in scored],
                                    [refs[i] for i in scored])
      if task.kind == "seq2seq":
        lead_n = baselines.lead_n_for_targets([r["target"] for r in records])
        lead = baselines.lead_baseline([r["source"] for r in records], lead_n)
        lead_metrics = metrics_lib.compute(task.metrics, lead, refs)
        metrics.update({f"lead_{k}": v for k, v in lead_metrics.items()})
    if n_unlabelled:
      metrics["unscored"] = n_unlabelled
  rows = [{"id": r["id"], "prediction": None if b else _label_text(task, p),
           "reference": _label_text(task, ref)}
          for r, p, ref, b in zip(records, pred_list, refs, bad_rows)]
  return TaskResult(metrics=metrics, rows=rows, labelled=has_labels, nonfinite=nonfinite)
