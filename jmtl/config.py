"""Loading and validating configs against the key declarations of `jmtl.defaults.KEYS`.

A config is a Python file defining `get_config()` that returns an `ml_collections.ConfigDict`,
usually `jmtl.defaults.base_config()` with some values changed. Every key is declared once in
`jmtl/defaults.py` (type, default, choices or range, meaning); `validate` checks a config against
those declarations (plus, when asked, the device count, the registries and the data files) and
raises `ConfigError` with one line naming the bad key and what it allows. `jmtl.preflight` runs
this and the checks that need more than the config before any command does work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from jmtl.defaults import KEYS
from jmtl.defaults import MESH_AXES
from jmtl.defaults import base_config


class ConfigError(ValueError):
  """A user mistake in a config, an override, a path or the environment (exit code 2)."""


def is_bucket(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a URI with a scheme (`gs://bucket/x`, `s3://...`), not a local path."""
  return "://" in os.fspath(path)


def path_exists(path: str | os.PathLike[str], what: str) -> bool:
  """Whether `path` (local, or a bucket URI read through `etils.epath`) exists.

  `what` names the path for the user (`"--workdir"`, `"config key 'data.dir' ="`). A path whose
  filesystem cannot be reached here (a `gs://` URI without `gcsfs` or TensorFlow installed,
  a bucket we may not read) raises ConfigError "<what> <path>: cannot access it (<cause>)";
  for a missing backend the cause says what to install (e.g. "Please install gcsfs ...").
  """
  try:
    return epath.Path(path).exists()
  except Exception as e:  # noqa: BLE001 - ImportError (no backend), permission, auth, ...
    raise ConfigError(f"{what} {os.fspath(path)}: cannot access it "
                      f"({type(e).__name__}: {e})") from e


def load_config_file(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config()`; any failure is a ConfigError."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise ConfigError(f"--config: file not found: {p}")
  spec = importlib.util.spec_from_file_location(f"jmtl_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a user file: report it in one line
    raise ConfigError(f"--config {p}: failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {p}: defines no get_config()")
  try:
    cfg = module.get_config()
  except Exception as e:
    raise ConfigError(f"--config {p}: get_config() failed: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"--config {p}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)) and key not in _FREE_DICTS:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


# Dict-valued keys whose own keys are free (task names: data.rates, mtl.weights), checked
# by their declarations.
_FREE_DICTS = frozenset(name for name, key in KEYS.items() if key.type is dict)


def _type_ok(key_type: type, value: Any) -> bool:
  """Whether `value` fits a key of `key_type` (a float key takes an int; a tuple key a list)."""
  if key_type is bool:
    return isinstance(value, bool)
  if key_type is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if key_type is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if key_type is str:
    return isinstance(value, str)
  if key_type is tuple:
    return isinstance(value, (tuple, list))
  if key_type is dict:
    return isinstance(value, (ml_collections.ConfigDict, dict))
  return True


def _type_name(v: Any) -> str:
  return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


def show(value: Any) -> str:
  """A config value on one line (a ConfigDict as a plain dict, not YAML)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def check_keys_and_types(cfg: ml_collections.ConfigDict) -> None:
  """Every key must be declared in `jmtl.defaults.KEYS`, with a value of its type."""
  for key, value in _flatten(cfg).items():
    if key not in KEYS:
      parent = key.rsplit(".", 1)[0] if "." in key else ""
      siblings = [k.rsplit(".", 1)[1] for k in KEYS if parent and k.rsplit(".", 1)[0] == parent]
      hint = f" (known keys under {parent}: {', '.join(siblings)})" if siblings else ""
      raise ConfigError(f"config key {key!r} is unknown{hint}")
    key_type = KEYS[key].type
    if not _type_ok(key_type, value):
      raise ConfigError(f"config key {key!r} must be {key_type.__name__}, got {show(value)} "
                        f"({_type_name(value)})")


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def complete(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns the defaults updated with `cfg` (so partial configs get every key), unlocked."""
  out = base_config()
  out.update(cfg)
  return out


def _holds(predicate: Any, *args: Any) -> bool:
  """A declared predicate's verdict; one that raises (e.g. max() of ()) counts as broken."""
  try:
    return bool(predicate(*args))
  except (TypeError, ValueError, KeyError, AttributeError):
    return False


def check_values(cfg: ml_collections.ConfigDict, keys: Sequence[str] | None = None) -> None:
  """Choices, ranges and cross-key rules of `jmtl.defaults.KEYS` (no registry, devices, files);
  `keys`: only these keys' declarations (default: all).

  Every key's own choices and range are checked before any cross-key rule, so a rule only
  ever sees values that are individually valid. Raises ConfigError naming the first bad key.
  """
  decls = KEYS if keys is None else {k: KEYS[k] for k in keys}
  for key, decl in decls.items():
    value = _get(cfg, key)
    if decl.choices is not None and value not in decl.choices:
      raise ConfigError(f"config key {key!r} = {show(value)} is not one of: "
                        f"{', '.join(map(str, decl.choices))}")
    if decl.check is not None and not _holds(decl.check[0], value):
      raise ConfigError(f"config key {key!r} = {show(value)} must be {decl.check[1]}")
  for key, decl in decls.items():
    value = _get(cfg, key)
    for predicate, text in decl.rules:
      if not _holds(predicate, value, cfg):
        text = text(cfg) if callable(text) else text.format(c=cfg)
        raise ConfigError(f"config key {key!r} = {show(value)} {text}")


def check_mesh(cfg: ml_collections.ConfigDict, device_count: int) -> None:
  """The mesh (with -1 filled in) must use exactly the available devices."""
  sizes = {a: cfg.mesh[a] for a in MESH_AXES}
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"config keys 'mesh.*': at most one axis may be -1, got {sizes}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config key 'mesh.{a}' = {s} must be a positive int or -1")
  fixed = 1
  for s in sizes.values():
    fixed *= s if s != -1 else 1
  if -1 in sizes.values():
    if device_count % fixed:
      raise ConfigError(f"config keys 'mesh.*' = {sizes}: {device_count} devices are not divisible "
                        f"by the fixed axes' product {fixed}")
  elif fixed != device_count:
    raise ConfigError(f"config keys 'mesh.*' = {sizes}: mesh size {fixed} does not match the "
                      f"{device_count} available devices")
  data_shards = (device_count // fixed if sizes["data"] == -1 else sizes["data"]) * (
      device_count // fixed if sizes["fsdp"] == -1 else sizes["fsdp"])
  for key in ("data.batch_size", "eval.batch_size"):
    if _get(cfg, key) % data_shards:
      raise ConfigError(f"config key {key!r} = {_get(cfg, key)} must be divisible by "
                        f"mesh data x fsdp = {data_shards}")


def validate(cfg: ml_collections.ConfigDict, *, device_count: int | None = None,
             check_registry: bool = True, check_files: bool = True,
             keys: Sequence[str] | None = None) -> ml_collections.ConfigDict:
  """Checks `cfg` completely and returns it completed with defaults; raises ConfigError.

  `keys`: check the values (and registries) of these keys only, for a command that reads no
  others (`jmtl data prepare`); every key's type is still checked."""
  check_keys_and_types(cfg)
  cfg = complete(cfg)
  check_values(cfg, keys)
  if device_count is not None:
    check_mesh(cfg, device_count)
  if check_registry:
    _check_registries(cfg, optimizer=keys is None or "optim.name" in keys)
  if check_files:
    _check_files(cfg)
  return cfg


def _check_registries(cfg: ml_collections.ConfigDict, optimizer: bool = True) -> None:
  from jmtl import tasks as task_registry  # tasks/ is below config's callers; imported lazily
  from jmtl import optim

  for name in cfg.tasks:
    if name not in task_registry.TASKS:
      raise ConfigError(f"config key 'tasks': unknown task {name!r}; known tasks: "
                        f"{', '.join(sorted(task_registry.TASKS))}")
  known = sorted(optim.NAMES)
  if optimizer and cfg.optim.name not in known:
    raise ConfigError(f"config key 'optim.name' = {cfg.optim.name!r} is not one of: {', '.join(known)}")


def data_root(cfg: ml_collections.ConfigDict) -> str:
  """`data.dir`, else $JMTL_DATA_DIR, else ''."""
  return cfg.data.dir or os.environ.get("JMTL_DATA_DIR", "")


def _check_files(cfg: ml_collections.ConfigDict) -> None:
  from jmtl import tasks as task_registry
  from jmtl.data import sources

  if cfg.data.tokenizer and not (
      path_exists(cfg.data.tokenizer, "config key 'data.tokenizer' =")
      and epath.Path(cfg.data.tokenizer).is_file()):
    raise ConfigError(f"config key 'data.tokenizer': file not found: {cfg.data.tokenizer}")
  if cfg.model.init_from and not pathlib.Path(cfg.model.init_from).is_dir():
    raise ConfigError(f"config key 'model.init_from': directory not found: {cfg.model.init_from}")
  # fed.partition = "own": the training files are each site's own (checked per site by
  # `jmtl.federated.loop.check_own_files`); this process's data root needs the eval split only.
  own = cfg.fed.partition == "own"
  for name in cfg.tasks:
    task = task_registry.get_task(name)
    splits = [s for s in (cfg.data.eval_split,) if s in task.splits] if own else None
    missing = sources.check_task_files(task, cfg.data, splits)
    if missing:
      raise ConfigError(f"task {name!r}: data file not found: {missing[0]}")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
