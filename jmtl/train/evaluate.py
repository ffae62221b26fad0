"""Evaluation: model outputs on a task's eval split -> predictions -> metrics.

Per task kind: classification = argmax of logits; regression = logits[:, 0]; span_qa = n-best
span decoding over all windows of a question; seq2seq = greedy or beam decoding, detokenized.
"""

from __future__ import annotations

import dataclasses
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
  metrics: dict[str, float]
  rows: list[dict]  # {"id", "prediction", "reference"} per example


def _references(task, records: Sequence[dict]) -> list:
  if task.kind == "span_qa":
    return [list(r["answers"]["text"]) for r in records]
  if task.kind == "seq2seq":
    return [list(r["references"]) for r in records]
  return [r["label"] for r in records]


def _label_text(task, label):
  names = getattr(task, "label_names", None)
  if task.kind == "classification" and names:
    return names[int(label)]
  return label


def evaluate_task(eval_set: EvalSet, forward: Callable[[dict], Mapping[str, Any]],
                  generate: Callable[[dict], np.ndarray] | None, tokenizer, config) -> TaskResult:
  """Runs one task's eval split. `forward(batch)` gives model outputs; `generate(batch)` token ids."""
  task, records = eval_set.task, eval_set.records
  refs = _references(task, records)
  n = len(eval_set.meta)
  if task.kind in ("classification", "regression"):
    preds = np.zeros((n,), np.float32 if task.kind == "regression" else np.int64)
    for batch in eval_set.batches:
      logits = np.asarray(jax.device_get(forward(batch)["logits"]))
      keep = batch["index"] >= 0
      idx = batch["index"][keep]
      preds[idx] = (logits[:, 0] if task.kind == "regression" else logits.argmax(-1))[keep]
    pred_list = preds.tolist()
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
  metrics = metrics_lib.compute(task.metrics, pred_list, refs)
  if task.kind == "seq2seq":
    lead_n = baselines.lead_n_for_targets([r["target"] for r in records])
    lead = baselines.lead_baseline([r["source"] for r in records], lead_n)
    lead_metrics = metrics_lib.compute(task.metrics, lead, refs)
    metrics.update({f"lead_{k}": v for k, v in lead_metrics.items()})
  rows = [{"id": r["id"], "prediction": _label_text(task, p), "reference": _label_text(task, ref)}
          for r, p, ref in zip(records, pred_list, refs)]
  return TaskResult(metrics=metrics, rows=rows)
