"""SQuAD v1.1 extractive QA.

Only dev-v1.1.json is available here, so train/validation/test are a deterministic ARTICLE-level
80/10/10 split of it seeded by `data.split_seed` (no article in two splits). Scores from this
split are not comparable with published SQuAD dev numbers.
"""

from __future__ import annotations

from jmtl.tasks.base import SquadSource, Task, register

_DEV = "squad/dev-v1.1.json"

register(Task(
    name="squad", kind="span_qa", num_labels=0, metrics=("exact_match", "squad_f1"),
    splits={s: SquadSource(_DEV, portion=s) for s in ("train", "validation", "test")},
    description="SQuAD v1.1, article-level split of dev-v1.1.json."))

register(Task(
    name="squad_dev", kind="span_qa", num_labels=0, metrics=("exact_match", "squad_f1"),
    splits={"validation": SquadSource(_DEV)},
    description="The full official SQuAD v1.1 dev set (evaluation only)."))
