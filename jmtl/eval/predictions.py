"""Prediction files and JSON results, written atomically (a temp file in the folder, renamed).

A reader never sees a half-written file: the target is either absent, the previous version, or
the complete new one. Values are made strict JSON first: numpy scalars/arrays become Python
numbers/lists, tuples become lists and non-finite floats (NaN, +-inf) become null.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

import numpy as np

PREDICTION_KEYS = ("id", "prediction", "reference")


def to_json_value(obj: Any) -> Any:
  """Converts `obj` to plain JSON types (see the module docstring); raises TypeError otherwise."""
  if isinstance(obj, np.ndarray):
    obj = obj.tolist()
  elif isinstance(obj, np.generic):
    obj = obj.item()
  if obj is None or isinstance(obj, (bool, int, str)):
    return obj
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"JSON object keys must be strings, got {k!r}")
      out[k] = to_json_value(v)
    return out
  if isinstance(obj, (list, tuple)):
    return [to_json_value(v) for v in obj]
  raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r:.80}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[TextIO]:
  """Opens a temp file next to `path` for writing; renames it onto `path` only on success."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes `obj` as one indented JSON document (keys in insertion order)."""
  value = to_json_value(obj)
  with atomic_open(path) as f:
    json.dump(value, f, indent=2, ensure_ascii=False, allow_nan=False)
    f.write("\n")


def write_predictions(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
  """Writes JSON Lines `{"id", "prediction", "reference"}` (one per row); returns the row count.

  `reference` is a list where a task has several references. Extra keys in a row are kept.
  """
  n = 0
  with atomic_open(path) as f:
    for n, row in enumerate(rows, start=1):
      missing = [k for k in PREDICTION_KEYS if k not in row]
      if missing:
        raise KeyError(f"prediction row {n - 1} lacks key(s) {missing}; needs {PREDICTION_KEYS}")
      ordered = {k: row[k] for k in PREDICTION_KEYS} | dict(row)
      f.write(json.dumps(to_json_value(ordered), ensure_ascii=False, allow_nan=False) + "\n")
  return n


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a file written by `write_predictions`; a bad line raises ValueError naming it."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or any(k not in row for k in PREDICTION_KEYS):
        raise ValueError(f"{os.fspath(path)}:{lineno}: expected an object with keys "
                         f"{PREDICTION_KEYS}")
      rows.append(row)
  return rows
