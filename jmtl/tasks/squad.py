"""SQuAD v1.1 extractive QA.

Only dev-v1.1.json is available here, so train/validation/test are a deterministic ARTICLE-level
80/10/10 split of it seeded by `data.split_seed` (no article in two splits). Scores from this
split are not comparable with published SQuAD dev numbers.

`squad_v11` is the official split: train-v1.1.json (87,599 questions) read from the prepared TFDS
dataset `squad/v1.1` (`jmtl data prepare`, `data.tfds_dir` set), validation = dev-v1.1.json
(10,570 questions: TFDS's validation split when `data.tfds_dir` is set, else the local file).
"""

from __future__ import annotations

from jmtl.tasks.base import SquadSource, Task, TfdsSource, register

_DEV = "squad/dev-v1.1.json"
_FIELDS = {"title": "title", "question": "question", "context": "context", "answers": "answers"}


def _tfds(split: str) -> TfdsSource:
  """TFDS `squad/v1.1` (features id, title, question, context, answers{text, answer_start})."""
  return TfdsSource("squad/v1.1", split, _FIELDS, id="id")


register(Task(
    name="squad", kind="span_qa", num_labels=0, metrics=("exact_match", "squad_f1"),
    splits={s: SquadSource(_DEV, portion=s) for s in ("train", "validation", "test")},
    description="SQuAD v1.1, article-level split of dev-v1.1.json."))

register(Task(
    name="squad_dev", kind="span_qa", num_labels=0, metrics=("exact_match", "squad_f1"),
    splits={"validation": SquadSource(_DEV)},
    tfds={"validation": _tfds("validation")},
    description="The full official SQuAD v1.1 dev set (evaluation only)."))

register(Task(
    name="squad_v11", kind="span_qa", num_labels=0, metrics=("exact_match", "squad_f1"),
    splits={"train": _tfds("train"), "validation": SquadSource(_DEV)},
    tfds={"train": _tfds("train"), "validation": _tfds("validation")},
    description="SQuAD v1.1 official train (TFDS squad/v1.1) and dev (validation)."))
