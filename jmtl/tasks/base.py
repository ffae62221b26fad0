"""Task registry (SeqIO style): a `Task` names its kind, head size, metrics and data sources.

Source specs are plain frozen dataclasses; `jmtl.data.sources` reads them into records
(docs/architecture.md). Paths in specs are relative to the data root (`data.dir` or
$JMTL_DATA_DIR).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

KINDS = ("classification", "regression", "span_qa", "seq2seq")
SPLITS = ("train", "validation", "test")
# Metric names understood by `jmtl.eval.metrics.compute`.
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman", "rouge1", "rouge2", "rougeL",
           "rougeLsum", "exact_match", "squad_f1")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclasses.dataclass(frozen=True)
class TsvSource:
  """A GLUE-style TSV file (`csv.QUOTE_NONE`, tab separated).

  Columns are header names when `header` is True, else 0-based indices and `columns` gives the
  expected column count. `label_values` are the raw label strings in class order
  (classification); None reads the label as a float (regression). `label=None`: unlabelled.
  """
  path: str
  text_a: str | int
  text_b: str | int | None = None
  label: str | int | None = None
  header: bool = True
  columns: int | None = None
  label_values: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SquadSource:
  """A SQuAD v1.1 JSON file; `portion` (train/validation/test) takes an article-level split
  with `fractions` seeded by `data.split_seed` (None = every question)."""
  path: str
  portion: str | None = None
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS


@dataclasses.dataclass(frozen=True)
class JsonlSource:
  """JSON Lines for seq2seq: `source` field (a string or a list of strings, joined by a space),
  `targets` fields (each a string or a list; all non-empty strings in order are the references,
  the first is the training target). `id` field, else the 0-based line index. `portion` splits
  rows by id with `fractions` seeded by `data.split_seed`."""
  path: str
  source: str
  targets: tuple[str, ...]
  id: str | None = None
  portion: str | None = None
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS


@dataclasses.dataclass(frozen=True)
class TextFolderSource:
  """One sub-folder per label holding one text file per document (label names sorted).

  `package` set: `root` is relative to that installed package's folder, else to the data root.
  `mode`: "classification" (text_a = whole file, label = folder) or "headline" (seq2seq:
  source = body, target = first line). `portion` splits documents with `fractions`.
  """
  root: str
  mode: str = "classification"
  package: str | None = None
  portion: str | None = None
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared TFDS dataset read with `tfds.data_source(name, data_dir=data.tfds_dir)`.

  `fields` maps record field -> TFDS feature (e.g. {"text_a": "sentence", "label": "label"});
  `id` names the feature used as record id (None = the row index).
  """
  name: str
  split: str
  fields: Mapping[str, str]
  id: str | None = None


Source = TsvSource | SquadSource | JsonlSource | TextFolderSource | TfdsSource


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: `kind` in KINDS, `num_labels` (1 regression, 0 span_qa/seq2seq), `metrics` names,
  `splits` (split name -> source spec), `max_len`/`max_target_len` (0 = the config's limit),
  `label_names`, and optional `tfds` specs used when `data.tfds_dir` is set."""
  name: str
  kind: str
  num_labels: int
  metrics: tuple[str, ...]
  splits: Mapping[str, Source]
  max_len: int = 0
  max_target_len: int = 0
  label_names: tuple[str, ...] = ()
  tfds: Mapping[str, TfdsSource] | None = None
  description: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
    bad = [m for m in self.metrics if m not in METRICS]
    if bad:
      raise ValueError(f"task {self.name!r}: unknown metrics {bad}; known: {METRICS}")
    want = {"classification": None, "regression": 1, "span_qa": 0, "seq2seq": 0}[self.kind]
    if want is not None and self.num_labels != want:
      raise ValueError(f"task {self.name!r}: kind {self.kind} needs num_labels={want}")
    if self.kind == "classification":
      if self.num_labels < 2:
        raise ValueError(f"task {self.name!r}: classification needs num_labels >= 2")
      if self.label_names and len(self.label_names) != self.num_labels:
        raise ValueError(f"task {self.name!r}: {len(self.label_names)} label_names for "
                         f"{self.num_labels} labels")


TASKS: dict[str, Task] = {}


def register(task: Task, *, overwrite: bool = False) -> Task:
  """Adds `task` to TASKS; a second task with the same name is an error unless `overwrite`."""
  if task.name in TASKS and not overwrite:
    raise ValueError(f"task {task.name!r} is already registered")
  TASKS[task.name] = task
  return task


def get_task(name: str | Task) -> Task:
  """The registered task called `name` (a Task passes through); KeyError lists known names."""
  if isinstance(name, Task):
    return name
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
