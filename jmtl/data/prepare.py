"""`jmtl data prepare`: TFDS download-and-prepare for the tasks of a config.

Each task that declares TFDS names (`Task.tfds`, e.g. every GLUE task: `glue/sst2`) is built
into `data.tfds_dir` with

    builder = tfds.builder(name, data_dir=data.tfds_dir, file_format="array_record")
    builder.download_and_prepare(
        download_dir=data.tfds_download_dir or None,   # None: <data.tfds_dir>/downloads
        download_config=tfds.download.DownloadConfig(manual_dir=data.tfds_manual_dir or None))

(array_record is what `tfds.data_source` reads, `jmtl.data.tfds_source`). A dataset prepared
before is reused, not rebuilt. Tasks without TFDS names read their files from `data.dir` and
need no preparation. Paths may be bucket URIs (`gs://...`, `etils.epath`).

How TFDS (tensorflow-datasets 4.9) finds each file of a dataset, in order: a file in the manual
dir named as TFDS's registered checksum file names it (e.g. `SST-2.zip`), whose size and sha256
must then match the registered ones; the download cache (`<download dir>/<dataset>/<url name>
<checksum>` with its `.INFO` file, as an earlier download left it); else the URL is downloaded
and checked. Archives (.zip, .tar) are extracted by TFDS through `tf.io.gfile`, so datasets
shipped as archives (all GLUE configs but `glue/mrpc`) need TensorFlow installed; datasets of
plain files (`glue/mrpc`, `squad`) prepare without it.

Failures are one line naming the task: `ConfigError` (exit 2) for what the user can fix (a file
in the manual dir that is not the original, a dataset that needs manual files, an unreachable
bucket), `PrepareError` (exit 1) for the environment (no network, TensorFlow or
tensorflow-datasets missing, a dataset name the installed TFDS does not know).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import io
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging
from etils import epath

from jmtl import config as config_lib
from jmtl.config import ConfigError
from jmtl.data import sources
from jmtl.tasks import base as tasks_base

# TFDS packages whose builders register only when imported (they are imported lazily and
# `tfds.builder` does not trigger that without TensorFlow): GLUE, SQuAD, CNN/DailyMail, ...
_TFDS_PACKAGES = ("text", "question_answering", "summarization")


class PrepareError(RuntimeError):
  """The environment stopped a preparation (no network, a package missing): exit code 1."""


def tfds_names(task: tasks_base.Task) -> list[str]:
  """The distinct TFDS dataset names of `task`'s splits, in split order ([] when none)."""
  return list(dict.fromkeys(spec.name for spec in (task.tfds or {}).values()))


def _tfds() -> Any:
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency (jmtl[tfds])
  except ImportError as e:
    raise PrepareError(f"tensorflow-datasets is not installed ({e}); pip install "
                       f"'jmtl[tfds]'") from e
  return tfds


def builder_of(name: str, data_dir: str) -> Any:
  """`tfds.builder(name)` (a `tfds.core.DatasetBuilder`) writing array_record into `data_dir`,
  importing TFDS's dataset packages when the name is not registered yet. Raises PrepareError
  when tensorflow-datasets is missing or has no dataset `name`."""
  tfds = _tfds()
  kwargs = {"data_dir": data_dir, "file_format": "array_record"}
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    pass
  for package in _TFDS_PACKAGES:
    try:
      importlib.import_module(f"tensorflow_datasets.{package}")
    except ImportError:
      continue
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise PrepareError(f"the installed tensorflow-datasets {tfds.__version__} has no dataset "
                       f"{name!r}") from e


def _chain(e: BaseException) -> Iterator[BaseException]:
  """`e` and the exceptions it was raised from or during, each once."""
  seen: set[int] = set()
  todo = [e]
  while todo:
    x = todo.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    todo += [x.__cause__, x.__context__]


def _network_error(e: BaseException) -> BaseException | None:
  """The exception in `e`'s chain that says a download could not reach its server, if any."""
  try:
    import requests  # noqa: PLC0415 - a tensorflow-datasets dependency
    net: tuple[type, ...] = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
  except ImportError:
    net = ()
  net += (ConnectionError, socket.gaierror, TimeoutError)
  for x in _chain(e):
    if isinstance(x, net) or type(x).__name__ in ("DownloadError", "MaxRetryError"):
      return x
  return None


def _lines(text: str) -> str:
  """TFDS's message in one line, without its links to web help."""
  keep = [ln.strip() for ln in str(text).splitlines()
          if ln.strip() and not ln.strip().startswith("To debug")]
  return " ".join(keep)


def _shorten(text: str, limit: int) -> str:
  """`text` cut in the middle (" ... ") to at most `limit` characters: both ends stay, so a
  message keeps its start and its cause at the end (a host, an errno)."""
  if len(text) <= limit:
    return text
  head = (limit - 5) * 2 // 3
  return f"{text[:head]} ... {text[len(text) - (limit - 5 - head):]}"


def failure(task: str, name: str, e: BaseException) -> Exception:
  """The one-line error (ConfigError: exit 2, PrepareError: exit 1) for `e`, raised while
  preparing TFDS dataset `name` of `task`. An OSError that is none of these is returned as it
  is (the CLI names its path, exit 1 or 2 by errno)."""
  what = f"task {task!r}: TFDS {name}"
  kind = type(e).__name__
  if kind == "NonMatchingChecksumError":
    return ConfigError(f"{what}: {_lines(e)} - a file in data.tfds_manual_dir (or the download "
                       f"cache) is not the original; remove it or put the original there")
  if isinstance(e, AssertionError) and "Manual directory" in str(e):
    return ConfigError(f"{what} needs manually downloaded files in data.tfds_manual_dir: "
                       f"{_lines(e)}")
  for x in _chain(e):
    if isinstance(x, ModuleNotFoundError) and (x.name or "").split(".")[0] == "tensorflow":
      return PrepareError(f"{what}: TFDS extracts the downloaded archives with TensorFlow, "
                          f"which is not installed (pip install tensorflow-cpu)")
  net = _network_error(e)
  if net is not None:
    text = _lines(net)
    host = re.search(r"host='([^']+)'|[Rr]esolve '([^']+)'|https?://([^/\s:'\"]+)", text)
    where = f" from {next(g for g in host.groups() if g)}" if host else ""
    return PrepareError(f"{what}: a download{where} failed, no network? ({type(net).__name__}: "
                        f"{_shorten(text, 240)}); offline, put the dataset's original files "
                        f"(named as in TFDS's checksums file, e.g. SST-2.zip) into "
                        f"data.tfds_manual_dir")
  if isinstance(e, OSError):
    return e
  return PrepareError(f"{what}: {kind}: {_shorten(_lines(e), 500)}")


def prepare(config: Any, echo: Callable[[str], None] = print) -> list[dict]:
  """Prepares every TFDS dataset of `config.tasks` into `config.data.tfds_dir`; `echo`s one line
  per dataset (task, name, version, splits with example counts, where) and one per task without
  TFDS names. Returns [{"task", "name", "version", "dir", "splits": {split: count},
  "prepared": bool (False: found ready)}].

  Raises ConfigError (`data.tfds_dir` empty or unreachable, a user-fixable TFDS failure) or
  PrepareError (environment), each one line naming the task; see `failure`."""
  data = config.data
  tasks = [tasks_base.get_task(name) for name in config.tasks]
  needed = [t for t in tasks if tfds_names(t)]
  tfds_dir = data.tfds_dir
  if needed:
    if not tfds_dir:
      raise ConfigError(f"config key 'data.tfds_dir' is empty: jmtl data prepare writes the "
                        f"TFDS datasets of {', '.join(t.name for t in needed)} there (e.g. "
                        f"--config.data.tfds_dir=gs://BUCKET/tfds)")
    _writable_dir(tfds_dir, "data.tfds_dir")
    if data.tfds_download_dir:
      _writable_dir(data.tfds_download_dir, "data.tfds_download_dir")
    if data.tfds_manual_dir:  # may be missing: TFDS asks for it only when it needs a file
      config_lib.path_exists(data.tfds_manual_dir, "config key 'data.tfds_manual_dir' =")
  done: dict[str, dict] = {}
  out = []
  for task in tasks:
    names = tfds_names(task)
    if not names:
      try:
        root = str(sources.data_root(data))
        root = root if "://" in root else os.path.realpath(root)  # as given may be relative
      except FileNotFoundError:
        root = "data.dir / $JMTL_DATA_DIR, not set"
      echo(f"{task.name}: no TFDS name; reads its files from data.dir ({root}), nothing to "
           f"prepare")
      continue
    for name in names:
      if name not in done:
        done[name] = _prepare_one(task.name, name, data, tfds_dir)
      row = {"task": task.name, **done[name]}
      out.append(row)
      state = "prepared" if row["prepared"] else "already prepared"
      splits = ", ".join(f"{s} {n}" for s, n in row["splits"].items())
      echo(f"{task.name}: {name} {row['version']} {state} in {row['dir']}: {splits}")
  return out


def _writable_dir(path: str, key: str) -> None:
  """Makes folder `path` (config key `key`) if it is missing; ConfigError naming the key when
  it cannot be reached, made or (local) written."""
  what = f"config key '{key}' = {path!r}"
  if not config_lib.path_exists(path, f"config key '{key}' ="):
    try:
      epath.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"{what}: cannot create it ({e.strerror or e})") from e
  elif not epath.Path(path).is_dir():
    raise ConfigError(f"{what} is not a folder")
  if not config_lib.is_bucket(path) and not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"{what}: not writable")


_PARTIAL = ("*.tmp.*", "*incomplete*")  # TFDS's unfinished downloads and dataset folders


def _local_tree(roots: list[str]) -> set[str]:
  """Every path under the local folders `roots` (buckets are left out)."""
  found = set()
  for root in roots:
    if config_lib.is_bucket(root) or not os.path.isdir(root):
      continue
    for folder, dirs, files in os.walk(root):
      found.update(os.path.join(folder, n) for n in dirs + files)
  return found


def _remove_leftovers(roots: list[str], before: set[str]) -> list[str]:
  """After a failed preparation: removes what it left under the local `roots` that was not
  there `before`: partial downloads and dataset folders (`_PARTIAL` names), then the folders
  left empty, deepest first. Returns the removed paths. Bucket paths are not cleaned."""
  removed = []
  new = sorted(_local_tree(roots) - before, key=lambda p: -p.count(os.sep))
  for path in new:
    if not os.path.lexists(path):
      continue
    if any(fnmatch.fnmatch(os.path.basename(path), pat) for pat in _PARTIAL):
      shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
      removed.append(path)
  for path in new:
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
      os.rmdir(path)
      removed.append(path)
  return removed


def _prepare_one(task: str, name: str, data: Any, tfds_dir: str) -> dict:
  """Builds one dataset. TFDS's own console output (progress bars, banners) goes to the absl
  log at INFO, so the command prints only its own lines. After a failure, what the attempt
  left in the local data.tfds_dir and download dir is removed (`_remove_leftovers`)."""
  text = io.StringIO()
  roots = [tfds_dir] + ([data.tfds_download_dir] if data.tfds_download_dir else [])
  before = _local_tree(roots)
  try:
    try:
      with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        tfds = _tfds()
        builder = builder_of(name, tfds_dir)
        ready = builder.is_prepared()
        if not ready:
          builder.download_and_prepare(
              download_dir=data.tfds_download_dir or None,
              download_config=tfds.download.DownloadConfig(
                  manual_dir=data.tfds_manual_dir or None))
    except BaseException:
      removed = _remove_leftovers(roots, before)
      if removed:
        logging.info("removed what the failed preparation of %s left: %s", name, removed)
      raise
  except ConfigError:
    raise
  except PrepareError as e:
    raise PrepareError(f"task {task!r}: TFDS {name}: {e}") from e
  except Exception as e:  # noqa: BLE001 - TFDS raises many types; each becomes one line
    err = failure(task, name, e)
    if err is e:
      raise
    raise err from e
  finally:
    if text.getvalue().strip():
      logging.info("TFDS output while preparing %s:\n%s", name, text.getvalue())
  info = builder.info
  return {"name": name, "version": str(builder.version), "dir": str(epath.Path(builder.data_dir)),
          "splits": {str(s): int(info.splits[s].num_examples) for s in info.splits},
          "prepared": not ready}
