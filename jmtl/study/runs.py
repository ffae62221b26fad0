"""The run executor shared by the studies (`jmtl sweep`, `jmtl study mtl` / `federated`).

A study is a list of training runs, each in its own directory under the study's workdir, run
one after another. `execute` trains a run unless its results exist: a run whose `eval.json`
(or divergence record in `run_info.json`) exists is skipped, so an interrupted study resumes
where it stopped, and a finished run is reused only if its `config.json` matches the config the
study would train now (`check_same_config`). `run_info.json` records the status, the seconds
and `code`, a digest of the jmtl sources that trained the run (`code_digest`); a run trained by
other code is still reused, but flagged, since a config match cannot show that the code behaves
alike.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from jmtl import config as config_lib
from jmtl import optim
from jmtl import tasks as task_registry
from jmtl.eval import predictions as predictions_lib
from jmtl.train import NonFiniteError

TrainFn = Callable[[ml_collections.ConfigDict, pathlib.Path], Mapping[str, float]]

RUN_INFO = "run_info.json"  # written by the study next to the trainer's files


def read_json(path: pathlib.Path) -> dict:
  """The JSON object in `path`; ValueError naming the file when it cannot be read."""
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e


def code_digest() -> str:
  """First 12 hex digits of sha256 over every `*.py` file of the jmtl package (relative path
  and bytes, in path order)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()[:12]


def execute(label: str, cfg: ml_collections.ConfigDict, run_dir: pathlib.Path,
            train_fn: TrainFn, code: str = "", *, tag: str = "sweep") -> dict:
  """Trains `cfg` in `run_dir` unless its results exist; console lines start with `[tag]
  label`.

  Returns `{"status": "ok" | "diverged", "seconds", "metrics" (eval.json; {} when diverged),
  "other_code" (a reused run trained by code other than `code`), "assumed_defaults" (the
  compared keys its config.json lacks)}`. Raises ValueError when a finished run belongs to
  another config, or when training returned without writing eval.json; SystemExit(128 + N)
  when signal N arrived before this run (`stop_if_signalled`).
  """
  stop_if_signalled(label, tag)
  eval_path, info_path = run_dir / "eval.json", run_dir / RUN_INFO
  info = read_json(info_path) if info_path.exists() else {}
  if not eval_path.exists() and info.get("status") != "diverged":
    print(f"[{tag}] {label}: training", flush=True)
    drop_stale_metrics(run_dir)
    start = time.time()
    try:
      train_fn(cfg, run_dir)
      info = {"status": "ok", "seconds": time.time() - start}
    except NonFiniteError as e:
      info = {"status": "diverged", "seconds": time.time() - start, "error": str(e)}
    info["code"] = code
    predictions_lib.write_json_atomic(info_path, info)
    clear_compile_caches()
    other_code, assumed = False, []
  else:
    assumed = check_same_config(cfg, run_dir)
    other_code = bool(code and info.get("code") and info["code"] != code)
    note = (f" (trained by other jmtl code: {info['code']}, now {code}; delete the directory "
            "to redo it)") if other_code else ""
    if assumed:
      note += (f" (its config.json lacks {', '.join(assumed)}: taken at the default; delete the "
               "directory to redo it if that default changes the run)")
    print(f"[{tag}] {label}: done before, skipped{note}", flush=True)
  metrics = {}
  if info.get("status") != "diverged":
    if not eval_path.exists():
      raise ValueError(f"{run_dir}: training returned but wrote no eval.json")
    metrics = read_json(eval_path)
  return {"status": info.get("status", "ok"), "seconds": info.get("seconds"),
          "metrics": metrics, "other_code": other_code, "assumed_defaults": assumed}


def stop_if_signalled(label: str, tag: str) -> None:
  """Between runs: after SIGTERM/SIGINT (recorded by the caller's `StopRequest`, the CLI's),
  one line and SystemExit(128 + signal) before the next run `label` starts. A signal during a
  run is answered by the trainer (it saves a checkpoint and exits); either way every finished
  run and checkpoint is on disk, and the same command resumes the study."""
  from jmtl.train.loop import StopRequest  # noqa: PLC0415 (imports jax)
  signum = StopRequest.pending()
  if signum is None:
    return
  print(f"[{tag}] received signal {signum}: stopped before {label} (finished runs and their "
        f"checkpoints are saved; run the same command again to resume), exiting", flush=True)
  raise SystemExit(128 + signum)


def drop_stale_metrics(run_dir: pathlib.Path) -> None:
  """A run killed before its first checkpoint restarts from step 0, and the trainer appends to
  `metrics.jsonl`: drop the stale lines first (with a checkpoint the trainer truncates them)."""
  ckpt = run_dir / "checkpoints"
  if not (ckpt.is_dir() and any(ckpt.iterdir())):
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def check_same_config(cfg: ml_collections.ConfigDict, run_dir: pathlib.Path) -> list[str]:
  """A finished run is reused only if its `config.json` (written by the trainer) matches, apart
  from the `sweep` section, `study.target` and `study.target_metric` (read by `jmtl report
  federated` only) and the keys
  that only other optimizers read (`optim.OWN_KEYS`), none of which changes the run. A key
  missing from `config.json` (one added to jmtl after the run) counts at its default, as it does when a run resumes. Returns
  those missing keys (of the ones compared)."""
  path = run_dir / "config.json"
  if not path.exists():
    return []
  from jmtl import defaults
  with_defaults = flat(json.loads(config_lib.to_json(defaults.base_config())))
  saved_keys = flat(read_json(path))
  missing = sorted(set(with_defaults) - set(saved_keys))
  with_defaults.update(saved_keys)
  ignored = ({k for keys in optim.OWN_KEYS.values() for k in keys}
             - set(optim.OWN_KEYS.get(cfg.optim.name, ())))
  keep = lambda k: (not k.startswith("sweep.") and k not in ("study.target", "study.target_metric")
                    and k not in ignored)
  saved = {k: v for k, v in with_defaults.items() if keep(k)}
  expected = {k: v for k, v in flat(json.loads(config_lib.to_json(cfg))).items() if keep(k)}
  diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
  if diff:
    raise ValueError(f"{run_dir} holds a run of a different config (first differing key "
                     f"{diff[0]!r}); use a fresh --workdir or delete that run directory")
  return [k for k in missing if keep(k)]


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def use_compilation_cache(path: pathlib.Path) -> None:
  """Runs of one study compile to the same programs (seeds): keep them on disk and reuse them
  (unless the user already chose a cache directory)."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def clear_compile_caches() -> None:
  """Each run jits new functions; dropping old executables keeps a long study's memory flat."""
  import jax
  jax.clear_caches()


def shared_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  """Trains (or reuses) one tokenizer in `<W>/tokenizer.json` over `config.tasks`, so every run
  sees the same ids; returns its path."""
  from jmtl.data import tokenizer as tokenizer_lib
  tasks = [task_registry.get_task(name) for name in config.tasks]
  tokenizer_lib.build_tokenizer(config, tasks, str(workdir))
  path = workdir / "tokenizer.json"
  if not path.is_file():
    raise ValueError(f"building the shared tokenizer wrote no {path}")
  return str(path)
