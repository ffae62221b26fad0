"""Prepared TFDS datasets read with `tfds.data_source` (array_record; no TensorFlow needed).

Never downloads: a dataset missing under `data.tfds_dir` is a FileNotFoundError (`jmtl data
prepare` makes it, `jmtl.data.prepare`). `data.tfds_dir` may be a bucket URI (`etils.epath`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from jmtl import config as config_lib

from jmtl.tasks.base import Task, TfdsSource


def _py(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_py(v) for v in value.tolist()] if value.ndim else _py(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _py(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_py(v) for v in value]
  return value


def load(spec: TfdsSource, task: Task, tfds_dir: str) -> list[dict]:
  """Rows of `spec` as records: each record field from its TFDS feature (bytes decoded)."""
  path = epath.Path(tfds_dir) / spec.name
  if not config_lib.path_exists(path, "config key 'data.tfds_dir' ="):
    raise FileNotFoundError(f"task {task.name!r}: TFDS dataset {spec.name!r} not found under "
                            f"data.tfds_dir={tfds_dir!r} (expected {path}); prepare it with "
                            f"jmtl data prepare first; downloads are never attempted here")
  import tensorflow_datasets as tfds  # optional dependency (jmtl[tfds])

  source = tfds.data_source(spec.name, split=spec.split, data_dir=tfds_dir, download=False,
                            try_gcs=False)
  records = []
  for i in range(len(source)):
    row = source[i]
    try:
      rec = {field: _py(row[feature]) for field, feature in spec.fields.items()}
      rid = str(_py(row[spec.id])) if spec.id else str(i)
    except KeyError as e:
      raise KeyError(f"TFDS {spec.name}/{spec.split} row {i}: no feature {e.args[0]!r}; "
                     f"features: {sorted(row)}") from None
    rec["id"] = rid
    if task.kind in ("classification", "regression"):
      rec.setdefault("text_b", None)
      rec["label"] = int(rec["label"]) if task.kind == "classification" else float(rec["label"])
    elif task.kind == "seq2seq":
      target = rec["target"]
      refs = rec.get("references", target)
      rec["references"] = list(refs) if isinstance(refs, list) else [refs]
      rec["target"] = target[0] if isinstance(target, list) else target
    records.append(rec)
  return records
