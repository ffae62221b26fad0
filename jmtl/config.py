"""Loading and validating configs.

A config is a Python file defining `get_config()` that returns an `ml_collections.ConfigDict`,
usually `jmtl.defaults.base_config()` with some values changed. `validate` checks every key
against the defaults before any work starts and raises `ConfigError` with one line naming the
bad key (and the allowed values where there is a list).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from jmtl.defaults import base_config


class ConfigError(ValueError):
  """A user mistake in a config, an override, a path or the environment (exit code 2)."""


# Keys whose value must be one of a fixed list.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.tokenizer_kind": ("wordpiece", "bpe"),
    "data.mixture": ("proportional", "temperature", "uniform", "explicit"),
    "data.mixing": ("task_per_batch", "mixed"),
    "data.bad_rows": ("error", "skip"),
    "data.eval_split": ("train", "validation", "test"),
    "model.trunk": ("transformer", "bilstm"),
    "model.norm": ("post", "pre"),
    "model.positions": ("learned", "rope"),
    "model.activation": ("gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.pooling": ("first", "mean"),
    "optim.schedule": ("constant", "linear", "cosine", "exponential"),
    "optim.weight_decay_mask": ("all", "matrices"),
    "train.on_nonfinite": ("halt", "skip"),
    "train.progress": ("auto", "bar", "lines", "none"),
}

# (key, predicate, description) checked on values after the type check.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 0, ">= 0"),
    ("train.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.vocab_size", lambda v: v >= 100, ">= 100"),
    ("data.max_len", lambda v: v >= 8, ">= 8"),
    ("data.max_target_len", lambda v: v >= 2, ">= 2"),
    ("data.doc_stride", lambda v: v >= 1, ">= 1"),
    ("data.max_train_examples", lambda v: v >= 0, ">= 0"),
    ("data.max_eval_examples", lambda v: v >= 0, ">= 0"),
    ("data.temperature", lambda v: v > 0, "> 0"),
    ("model.layers", lambda v: v >= 1, ">= 1"),
    ("model.init_layers", lambda v: v >= 0, ">= 0"),
    ("model.d_model", lambda v: v >= 1, ">= 1"),
    ("model.heads", lambda v: v >= 1, ">= 1"),
    ("model.d_ff", lambda v: v >= 1, ">= 1"),
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("model.attention_dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("model.decoder.layers", lambda v: v >= 1, ">= 1"),
    ("model.decoder.heads", lambda v: v >= 1, ">= 1"),
    ("model.decoder.label_smoothing", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.grad_clip", lambda v: v >= 0, ">= 0"),
    ("optim.belief_eps", lambda v: v >= 0, ">= 0"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.beam_size", lambda v: v >= 1, ">= 1"),
    ("eval.max_decode_len", lambda v: v >= 1, ">= 1"),
)


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


# Dict-valued keys whose own keys are free (task names), checked separately.
_FREE_DICTS = frozenset({"data.rates"})


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(default, (ml_collections.ConfigDict, dict)):
    return isinstance(value, (ml_collections.ConfigDict, dict))
  return True


def _type_name(v: Any) -> str:
  return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


def check_keys_and_types(cfg: ml_collections.ConfigDict) -> None:
  """Every key must exist in the defaults, with a value of the default's type."""
  defaults = _flatten(base_config())
  given = _flatten(cfg)
  for key, value in given.items():
    if key not in defaults:
      parent = key.rsplit(".", 1)[0] if "." in key else ""
      siblings = sorted(k for k in defaults if k.rsplit(".", 1)[0] == parent) if parent else []
      hint = f" (known keys under {parent}: {', '.join(s.rsplit('.', 1)[1] for s in siblings)})" if siblings else ""
      raise ConfigError(f"config key {key!r} is unknown{hint}")
    if not _type_ok(defaults[key], value):
      raise ConfigError(
          f"config key {key!r} must be {_type_name(defaults[key])}, got {value!r} ({_type_name(value)})")


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


def check_values(cfg: ml_collections.ConfigDict) -> None:
  """Choices, ranges and cross-key rules that need no registry, devices or files."""
  for key, allowed in CHOICES.items():
    value = _get(cfg, key)
    if value not in allowed:
      raise ConfigError(f"config key {key!r} = {value!r} is not one of: {', '.join(allowed)}")
  for key, ok, desc in _RANGES:
    value = _get(cfg, key)
    if not ok(value):
      raise ConfigError(f"config key {key!r} = {value!r} must be {desc}")
  if not cfg.tasks:
    raise ConfigError("config key 'tasks' is empty: name at least one task")
  if len(set(cfg.tasks)) != len(cfg.tasks):
    raise ConfigError(f"config key 'tasks' names a task twice: {list(cfg.tasks)}")
  if cfg.model.init_layers and not cfg.model.init_from:
    raise ConfigError("config key 'model.init_layers' is set but model.init_from is empty")
  if cfg.model.init_layers and cfg.model.init_layers != cfg.model.layers:
    raise ConfigError(f"config key 'model.init_layers' = {cfg.model.init_layers} must equal "
                      f"model.layers = {cfg.model.layers} (the trunk gets the checkpoint's "
                      f"first init_layers layers)")
  if cfg.model.d_model % cfg.model.heads:
    raise ConfigError(
        f"config key 'model.heads' = {cfg.model.heads} must divide model.d_model = {cfg.model.d_model}")
  if cfg.model.d_model % cfg.model.decoder.heads:
    raise ConfigError(f"config key 'model.decoder.heads' = {cfg.model.decoder.heads} must divide "
                      f"model.d_model = {cfg.model.d_model}")
  if cfg.model.positions == "learned" and cfg.data.max_len > cfg.model.max_len:
    raise ConfigError(f"config key 'data.max_len' = {cfg.data.max_len} exceeds model.max_len = "
                      f"{cfg.model.max_len} (the learned position table)")
  buckets = tuple(cfg.data.length_buckets)
  if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
    raise ConfigError(f"config key 'data.length_buckets' = {buckets!r} must be positive ints")
  if max(buckets) < cfg.data.max_len:
    raise ConfigError(f"config key 'data.length_buckets' = {buckets!r}: the largest bucket must be "
                      f">= data.max_len = {cfg.data.max_len}")
  if cfg.data.mixture == "explicit":
    missing = [t for t in cfg.tasks if t not in cfg.data.rates]
    extra = [t for t in cfg.data.rates if t not in cfg.tasks]
    if missing or extra:
      raise ConfigError(f"config key 'data.rates' must give a rate for exactly the tasks "
                        f"{list(cfg.tasks)} (missing {missing}, extra {extra})")
    for t, r in cfg.data.rates.items():
      if not isinstance(r, (int, float)) or r <= 0:
        raise ConfigError(f"config key 'data.rates.{t}' = {r!r} must be a number > 0")
  if cfg.data.mixing == "mixed" and cfg.data.batch_size < len(cfg.tasks):
    raise ConfigError(f"config key 'data.batch_size' = {cfg.data.batch_size} must be >= the number "
                      f"of tasks ({len(cfg.tasks)}) with data.mixing = 'mixed'")
  _check_rules(cfg.mesh.rules)


_MESH_AXES = ("data", "fsdp", "tensor")


def _check_rules(rules: Iterable[Any]) -> None:
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config key 'mesh.rules': entry {rule!r} must be (logical_name, mesh_axes)")
    axes = rule[1]
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in names:
      if a not in _MESH_AXES:
        raise ConfigError(f"config key 'mesh.rules': rule {rule!r} names mesh axis {a!r}; "
                          f"known axes: {', '.join(_MESH_AXES)}")


def check_mesh(cfg: ml_collections.ConfigDict, device_count: int) -> None:
  """The mesh (with -1 filled in) must use exactly the available devices."""
  sizes = {a: cfg.mesh[a] for a in _MESH_AXES}
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
             check_registry: bool = True, check_files: bool = True) -> ml_collections.ConfigDict:
  """Checks `cfg` completely and returns it completed with defaults; raises ConfigError."""
  check_keys_and_types(cfg)
  cfg = complete(cfg)
  check_values(cfg)
  if device_count is not None:
    check_mesh(cfg, device_count)
  if check_registry:
    _check_registries(cfg)
  if check_files:
    _check_files(cfg)
  return cfg


def _check_registries(cfg: ml_collections.ConfigDict) -> None:
  from jmtl import tasks as task_registry  # tasks/ is below config's callers; imported lazily
  from jmtl import optim

  for name in cfg.tasks:
    if name not in task_registry.TASKS:
      raise ConfigError(f"config key 'tasks': unknown task {name!r}; known tasks: "
                        f"{', '.join(sorted(task_registry.TASKS))}")
  known = sorted(optim.NAMES)
  if cfg.optim.name not in known:
    raise ConfigError(f"config key 'optim.name' = {cfg.optim.name!r} is not one of: {', '.join(known)}")


def data_root(cfg: ml_collections.ConfigDict) -> str:
  """`data.dir`, else $JMTL_DATA_DIR, else ''."""
  return cfg.data.dir or os.environ.get("JMTL_DATA_DIR", "")


def _check_files(cfg: ml_collections.ConfigDict) -> None:
  from jmtl import tasks as task_registry
  from jmtl.data import sources

  if cfg.data.tokenizer and not pathlib.Path(cfg.data.tokenizer).is_file():
    raise ConfigError(f"config key 'data.tokenizer': file not found: {cfg.data.tokenizer}")
  if cfg.model.init_from and not pathlib.Path(cfg.model.init_from).is_dir():
    raise ConfigError(f"config key 'model.init_from': directory not found: {cfg.model.init_from}")
  for name in cfg.tasks:
    missing = sources.check_task_files(task_registry.get_task(name), cfg.data)
    if missing:
      raise ConfigError(f"task {name!r}: data file not found: {missing[0]}")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
