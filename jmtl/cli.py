"""The `jmtl` command line (absl flags; `--config.KEY=VALUE` overrides typed by the defaults).

  jmtl train  --config configs/x.py --workdir DIR [--config.a.b=value ...]
  jmtl eval   --config configs/x.py --workdir DIR
  jmtl data   --config configs/x.py                 (record counts per task and split)
  jmtl bench  step|data|optimizer --config configs/x.py [--json] [--out FILE]
  jmtl sweep  --config configs/optim_study.py --workdir DIR   (optimizer x lr x seed study)
  jmtl report optim --workdir DIR [--out DIR]                 (tables, ablation, loss curves)

A user mistake (bad flag, config key, value, path or data file) prints one line
`jmtl: error: ...` and exits with code 2.
"""

from __future__ import annotations

import ast
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from jmtl.config import ConfigError
from jmtl.train import NonFiniteError

COMMANDS = ("train", "eval", "data", "bench", "sweep", "report")
BENCHES = ("step", "data", "optimizer")
REPORTS = ("optim",)
USAGE = ("usage: jmtl {train,eval,data,sweep} --config FILE [--workdir DIR] "
         "[--config.KEY=VALUE ...]\n       jmtl bench {step,data,optimizer} --config FILE "
         "[--json] [--out FILE]\n       jmtl report optim --workdir DIR [--out DIR]")



def _make_flags() -> flags.FlagValues:
  """A fresh flag set per parse, so `run` can be called more than once in one process."""
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "Config file (defines get_config()).", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, predictions).",
                      flag_values=fv)
  flags.DEFINE_bool("json", False, "bench: print the result as JSON.", flag_values=fv)
  flags.DEFINE_string("out", None, "bench: also write the JSON here; report: output directory.",
                      flag_values=fv)
  return fv


class UsageError(ConfigError):
  pass


def _parse_value(key: str, default: Any, text: str) -> Any:
  """Parses an override by the type of the value it replaces (bool, int, float, str, tuple)."""
  try:
    if isinstance(default, bool):
      low = text.lower()
      if low not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
      return low in ("true", "1")
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
    value = ast.literal_eval(text)
    if isinstance(default, (tuple, list)) and isinstance(value, str):
      value = (value,)
    return value
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as "
                      f"{type(default).__name__} ({e})") from e


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `--config.a.b=value` overrides in order; an unknown key is a ConfigError."""
  for arg in overrides:
    if "=" not in arg:
      raise ConfigError(f"override {arg!r} needs the form --config.KEY=VALUE")
    key, text = arg[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"config key {key!r} is unknown (from {arg})")
    with node.unlocked():
      node[leaf] = _parse_value(key, node[leaf], text)


def parse(argv: Sequence[str]):
  """Parses `jmtl CMD [SUB] flags...`; returns (command, subcommand, config, flag values)."""
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    raise UsageError(USAGE)
  cmd, rest = argv[1], list(argv[2:])
  if cmd not in COMMANDS:
    raise UsageError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
  sub = None
  if cmd in ("bench", "report"):
    choices = BENCHES if cmd == "bench" else REPORTS
    if not rest or rest[0] not in choices:
      raise UsageError(f"jmtl {cmd} needs one of: {', '.join(choices)}")
    sub, rest = rest[0], rest[1:]
  overrides = [a for a in rest if a.startswith("--config.")]
  fv = _make_flags()
  try:
    fv([argv[0]] + [a for a in rest if not a.startswith("--config.")])
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from e
  if cmd in ("train", "eval", "sweep", "report") and not fv.workdir:
    raise UsageError(f"jmtl {cmd} needs --workdir DIR")
  if cmd == "report":
    return cmd, sub, None, fv
  if not fv.config:
    raise UsageError("--config FILE is required")
  from jmtl.config import load_config_file
  config = load_config_file(fv.config)
  apply_overrides(config, overrides)
  return cmd, sub, config, fv


def _bench(sub: str, config) -> dict:
  if sub == "step":
    from jmtl.bench.step import bench_step
    return bench_step(config)
  if sub == "data":
    from jmtl.bench.data import bench_data
    return bench_data(config)
  from jmtl.bench.optimizer import bench_optimizer
  return bench_optimizer(config)


def describe_data(config) -> str:
  """Record counts per task and split, and the first training record of each task."""
  from jmtl import tasks as task_registry
  from jmtl.data import sources
  lines = []
  for name in config.tasks:
    task = task_registry.get_task(name)
    counts = []
    first = None
    for split in ("train", "validation", "test"):
      try:
        records = sources.load_records(task, split, config.data)
      except KeyError:
        continue  # the task has no such split
      counts.append(f"{split} {len(records)}")
      if split == "train" and records:
        first = records[0]
    lines.append(f"{name} ({task.kind}): " + ", ".join(counts))
    if first is not None:
      lines.append("  first train record: " + json.dumps(first, ensure_ascii=False)[:300])
  return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
  cmd, sub, config, fv = parse(argv)
  if cmd == "report":
    from jmtl.study.report import report_optim
    if not pathlib.Path(fv.workdir, "sweep.json").is_file():
      raise ConfigError(f"--workdir {fv.workdir}: no sweep.json (run jmtl sweep first)")
    result = report_optim(fv.workdir, fv.out or fv.workdir)
    print(json.dumps(result, indent=2, sort_keys=True, default=str)[:4000])
    return 0
  import jax
  from jmtl import config as config_lib

  if cmd == "eval" and not (pathlib.Path(fv.workdir) / "checkpoints").is_dir():
    raise ConfigError(f"--workdir {fv.workdir}: no checkpoints/ directory (train first)")
  config = config_lib.validate(config, device_count=jax.device_count(),
                               check_files=cmd != "bench")
  if cmd == "train":
    from jmtl.train.loop import train
    train(config, fv.workdir)
  elif cmd == "eval":
    from jmtl.train.loop import evaluate_checkpoint
    result = evaluate_checkpoint(config, fv.workdir)
    print(json.dumps(result, indent=2, sort_keys=True))
  elif cmd == "data":
    print(describe_data(config))
  elif cmd == "sweep":
    from jmtl.study.sweep import run_sweep
    result = run_sweep(config, fv.workdir)
    print(json.dumps(result, indent=2, sort_keys=True, default=str)[:4000])
  else:
    result = _bench(sub, config)
    text = json.dumps(result, indent=2, sort_keys=True)
    if fv.out:
      pathlib.Path(fv.out).write_text(text + "\n")
    if fv.json:
      print(text)
    else:
      for k, v in result.items():
        print(f"{k:>28}: {v}")
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  logging.set_verbosity(logging.WARNING)
  try:
    code = run(argv)
  except ConfigError as e:
    print(f"jmtl: error: {e}", file=sys.stderr)
    code = 2
  except NonFiniteError as e:
    print(f"jmtl: {e}", file=sys.stderr)
    code = 3
  except KeyboardInterrupt:
    code = 130
  sys.exit(code)


if __name__ == "__main__":
  main()
