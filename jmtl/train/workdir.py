"""The run directory: one `etils.epath` path, an exclusive lock, atomic small files, and the
check that a checkpoint in it belongs to the run being started.

Paths: every workdir file goes through `etils.epath` (Orbax's own path type), so
`--workdir gs://bucket/run` writes to the bucket (with `gcsfs` installed) instead of a local
`./gs:` directory.

Lock: a training or evaluation run holds an exclusive `fcntl` lock on `W/.jmtl.lock` for its
whole life; a second one in the same workdir stops with one line naming the holder. The
kernel drops the lock when the process dies (even by SIGKILL), so it never goes stale. Buckets
have no such lock: there a warning says that the user must keep runs apart.

Fingerprint: each checkpoint's meta item stores what the checkpoint depends on: the resolved
config (less `RESUMABLE`, the keys a resumed run may change), a SHA-256 of each task's training
records and of the vocabulary. A run that finds a checkpoint refuses to resume from it unless
all of these match, naming the differing keys (`check_config`, before any work) or the task
whose data or the vocabulary changed (`check_fingerprint`, once the data is read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from absl import logging as absl_logging
from etils import epath

from jmtl import config as config_lib
from jmtl.eval import predictions as predictions_lib

# Keys a resumed run may change: cadence, evaluation and decoding, where the data lives (its
# content is fingerprinted), how the devices are arranged (a restore reshards), and the length
# of training (the schedule is recomputed for the new total, with a warning).
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.on_nonfinite", "train.progress", "eval.",
             "data.dir", "data.tfds_dir", "data.tfds_download_dir", "data.tfds_manual_dir",
             "data.tokenizer", "data.max_eval_examples",
             "data.eval_split", "model.init_from", "mesh.", "dist.", "sweep.", "fed.rounds",
             "fed.eval_every", "fed.checkpoint_every", "fed.log_every", "fed.flower.")

LOCK_NAME = ".jmtl.lock"


def path(workdir: str | os.PathLike[str]) -> epath.Path:
  """The workdir as an absolute epath (a bucket URI stays one)."""
  text = os.fspath(workdir)
  p = epath.Path(text)
  if "://" in text:
    return p
  return epath.Path(os.path.abspath(text))


def is_local(p: epath.Path) -> bool:
  return not config_lib.is_bucket(p)


def flat_config(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """`{dotted key: value}` of a config, values as stored in JSON (tuples as lists)."""
  d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  out: dict[str, Any] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, Mapping) and key != "data.rates":
        walk(v, key + ".")
      else:
        out[key] = json.loads(json.dumps(v, default=str))  # tuples -> lists, as stored
  walk(d, "")
  return out


def _resumable(key: str) -> bool:
  return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def config_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config keys a checkpoint depends on (all but `RESUMABLE`), flat, JSON values."""
  return {k: v for k, v in flat_config(config).items() if not _resumable(k)}


def digest_records(records: list[dict]) -> str:
  """SHA-256 of a task's training records (their JSON, keys sorted)."""
  h = hashlib.sha256()
  for r in records:
    h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
    h.update(b"\n")
  return h.hexdigest()


def digest_text(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(config: ml_collections.ConfigDict, *, data: Mapping[str, str],
                tokenizer: str) -> dict[str, Any]:
  """What a checkpoint depends on: `{"config": ..., "data": {task: sha256}, "tokenizer": sha256}`."""
  return {"config": config_fingerprint(config), "data": dict(data), "tokenizer": tokenizer,
          "steps": _total(config)[1]}


def _total(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """The key that sets the length of training and its value: `fed.rounds` for a federated
  config (`fed.sites`; a checkpoint's step is then a round), else `train.steps`."""
  if config.get("fed", {}).get("sites"):
    return "fed.rounds", int(config.fed.rounds)
  return "train.steps", int(config.train.steps)


def _show(v: Any) -> str:
  return json.dumps(v) if not isinstance(v, str) else repr(v)


def config_differences(stored: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """`key old -> new` for each fingerprinted key whose value differs; a key the stored config
  lacks (added to jmtl since) is compared with its default."""
  now = config_fingerprint(config)
  defaults = config_fingerprint(config_lib.complete(ml_collections.ConfigDict()))
  out = []
  for key in sorted(set(now) | set(stored)):
    old = stored.get(key, defaults.get(key))
    new = now.get(key, defaults.get(key))
    if old != new:
      out.append(f"{key} {_show(old)} -> {_show(new)}")
  return out


def _refuse(workdir: epath.Path, step: int, what: str, unit: str = "step"
            ) -> config_lib.ConfigError:
  return config_lib.ConfigError(
      f"--workdir {workdir} holds a checkpoint ({unit} {step}) of a different run: {what}; "
      f"use the settings it was trained with, or a new workdir")


def check_config(meta: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                 workdir: epath.Path, step: int) -> None:
  """Raises ConfigError naming every fingerprinted key that differs from the checkpoint's, or
  when the checkpoint's step is past `train.steps` (a federated config: its round past
  `fed.rounds`; a run cannot be shortened below it).

  Checkpoints written before fingerprints existed carry none and are not checked
  (`resume_warnings` says so).
  """
  key, total = _total(config)
  fp = meta.get("fingerprint")
  if fp is not None:  # another run's checkpoint first: its keys say more than its length
    diffs = config_differences(fp["config"], config)
    if diffs:
      raise _refuse(workdir, step, "; ".join(diffs), "round" if key == "fed.rounds" else "step")
  if step > total:
    what = "round" if key == "fed.rounds" else "step"
    raise config_lib.ConfigError(
        f"--workdir {workdir} holds a checkpoint at {what} {step}, past {key} = "
        f"{total}; set {key} >= {step} or use a new workdir")


def resume_warnings(meta: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                    workdir: epath.Path, step: int) -> None:
  """Once a checkpoint is accepted: warns (stderr) when it records no fingerprint or when
  `train.steps` (federated: `fed.rounds`) changed (the learning-rate schedule is then
  recomputed for the new total)."""
  fp = meta.get("fingerprint")
  if fp is None:
    print(f"jmtl: warning: the checkpoint at step {step} in {workdir} records no config "
          f"fingerprint (an older jmtl wrote it); resuming without checking the config",
          file=sys.stderr, flush=True)
    return
  old_steps = fp.get("steps")
  key, total = _total(config)
  if old_steps is not None and old_steps != total:
    unit = "rounds (the client learning-rate schedule spans rounds x local steps)" if (
        key == "fed.rounds") else "steps"
    print(f"jmtl: warning: {key} changed {old_steps} -> {total}: the "
          f"learning-rate schedule (and annealed_temperature / unimax task rates) is "
          f"recomputed for {total} {unit}",
          file=sys.stderr, flush=True)


def check_fingerprint(meta: Mapping[str, Any], current: Mapping[str, Any], *,
                      workdir: epath.Path, step: int) -> None:
  """Raises ConfigError when the training data of a task or the vocabulary differ."""
  fp = meta.get("fingerprint")
  if fp is None:
    return
  changed = [t for t in sorted(set(fp.get("data", {})) | set(current["data"]))
             if fp.get("data", {}).get(t) != current["data"].get(t)]
  if changed:
    raise _refuse(workdir, step, "the training data of task "
                  + ", ".join(repr(t) for t in changed)
                  + " differ from what the checkpoint was trained on (data files changed)")
  check_vocabulary(meta, current["tokenizer"], workdir=workdir, step=step)


def check_vocabulary(meta: Mapping[str, Any], tokenizer_digest: str, *, workdir: epath.Path,
                     step: int) -> None:
  """Raises ConfigError when the vocabulary differs from the checkpoint's (train and eval)."""
  fp = meta.get("fingerprint")
  if fp is not None and fp.get("tokenizer") != tokenizer_digest:
    raise _refuse(workdir, step, "the vocabulary differs from the checkpoint's "
                  "(data.tokenizer or W/tokenizer.json changed)")


def write_text_atomic(p: epath.Path, text: str) -> None:
  """Writes `text` so a reader sees the old file or the whole new one: locally through
  `jmtl.eval.predictions.atomic_open` (temp file in the folder, fsync, rename); on a bucket as
  one object write (atomic per object)."""
  if not is_local(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return
  with predictions_lib.atomic_open(os.fspath(p)) as f:
    f.write(text)


class _ToErrorsLog(logging.Filter):
  """Diverts ERROR records of Orbax, TensorStore and asyncio (logged from background threads or
  at garbage collection, with tracebacks) to W/errors.log: the run reports the failure itself,
  in one line."""

  def __init__(self, log: epath.Path):
    super().__init__()
    self._log = log

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    # asyncio reports a failed save's tasks and futures ("... exception was never retrieved")
    # when they are garbage-collected; jmtl itself runs no event loop, so they are Orbax's.
    ours = "/orbax/" in path or "/tensorstore/" in path or record.name == "asyncio"
    if record.levelno >= logging.ERROR and ours:
      try:
        with self._log.open("a") as f:
          f.write(logging.Formatter().format(record) + "\n")
      except Exception:  # noqa: BLE001 - no log file (disk full): the run's own line reports it
        pass
      return False
    return True


@contextlib.contextmanager
def background_errors_to_log(workdir: epath.Path) -> Iterator[None]:
  """While a run lasts: Orbax/TensorStore errors logged from background threads, and exceptions
  Python cannot raise anywhere (`sys.unraisablehook`, e.g. TensorStore callbacks into a closed
  event loop after a failed save), go to `W/errors.log` instead of the console (and are
  dropped when even that file cannot be written, e.g. on a full disk: the run names the
  failure itself, in one line)."""
  log = workdir / "errors.log"
  filt = _ToErrorsLog(log)
  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for h in handlers:
    h.addFilter(filt)
  previous = sys.unraisablehook

  def unraisable(u):
    try:
      with log.open("a") as f:
        f.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
    except Exception:  # noqa: BLE001 - as above: never a second failure from the hook itself
      pass

  sys.unraisablehook = unraisable
  failed = True
  try:
    yield
    failed = False
  finally:
    # After a failure the diversion stays: a failed save's leftovers are reported late (when
    # garbage-collected, at exit), after the run's own one-line error.
    if not failed:
      sys.unraisablehook = previous
      for h in handlers:
        h.removeFilter(filt)


def _holder(lock_path: epath.Path) -> str:
  try:
    info = json.loads(lock_path.read_text())
    return f"pid {info['pid']} on {info['host']}"
  except Exception:  # noqa: BLE001 - the holder may be writing it right now
    return "another process"


@contextlib.contextmanager
def lock(workdir: epath.Path, command: str) -> Iterator[None]:
  """Holds the workdir's exclusive lock; ConfigError naming the holder when it is taken."""
  if not is_local(workdir):
    print(f"jmtl: warning: {workdir} is a bucket path, which has no lock: make sure no other "
          f"run uses it", file=sys.stderr, flush=True)
    yield
    return
  import fcntl  # pylint: disable=import-outside-toplevel
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror or e})"
                                 ) from e
  lock_path = workdir / LOCK_NAME
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise config_lib.ConfigError(
          f"--workdir {workdir} is in use by a running jmtl ({_holder(lock_path)}); wait for it "
          f"to finish or use another workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": command}).encode())
    yield
  finally:
    os.close(fd)  # releases the lock


def _is_locked(workdir: epath.Path) -> bool:
  if not is_local(workdir) or not (workdir / LOCK_NAME).exists():
    return False
  import fcntl  # pylint: disable=import-outside-toplevel
  fd = os.open(workdir / LOCK_NAME, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def check_unlocked(workdir: epath.Path) -> None:
  """ConfigError (one line naming `workdir` and the lock's holder, "pid P on HOST") when a
  running jmtl holds the workdir's lock (`lock`); a bucket path has none and passes."""
  if _is_locked(workdir):
    raise config_lib.ConfigError(f"--workdir {workdir} is in use by a running jmtl "
                                 f"({_holder(workdir / LOCK_NAME)}); wait for it to finish or "
                                 f"use another workdir")


def _writable(p: epath.Path) -> bool:
  """Local: the nearest existing ancestor is a writable directory."""
  q = epath.Path(p)
  while not q.exists():
    if q.parent == q:
      return False
    q = q.parent
  return q.is_dir() and os.access(q, os.W_OK | os.X_OK)


def preflight(config: Any, workdir: str, command: str) -> None:
  """Everything about `workdir` the config alone can tell, before any work (raises ConfigError).

  command "train": the workdir is a directory (or can be made one) we may write, not a file;
  `checkpoints` is not a file; nobody else runs in it; a checkpoint already in it was trained
  with the same fingerprinted config keys. command "eval": it holds a checkpoint of the same
  config, and nobody else runs in it.
  """
  p = path(workdir)
  exists = config_lib.path_exists(p, "--workdir")
  if exists and not p.is_dir():
    raise config_lib.ConfigError(f"--workdir {p} is not a directory")
  if is_local(p):
    for q in p.parents:  # a file above it: "not a directory", not "not writable"
      if q.exists():
        if not q.is_dir():
          raise config_lib.ConfigError(f"--workdir {p} is not a directory (under {q}, a file)")
        break
  ckpt_dir = p / "checkpoints"
  if ckpt_dir.exists() and not ckpt_dir.is_dir():
    raise config_lib.ConfigError(f"--workdir {p}: {ckpt_dir} exists and is not a directory")
  if is_local(p) and not _writable(p):
    raise config_lib.ConfigError(f"--workdir {p} is not writable")
  if command == "eval" and not ckpt_dir.is_dir():
    raise config_lib.ConfigError(f"--workdir {p}: no checkpoints/ directory (train first)")
  check_unlocked(p)
  if ckpt_dir.is_dir():
    from jmtl.train import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
    found = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True).read_latest_meta()
    if found is None:
      if command == "eval":
        raise config_lib.ConfigError(f"--workdir {p}: no complete checkpoint in {ckpt_dir}")
      return
    step, meta = found
    check_config(meta, config, workdir=p, step=step)
