"""The `jmtl` command line (absl flags; `--config.KEY=VALUE` overrides typed by the defaults).

  jmtl train  --config configs/x.py --workdir DIR [--config.a.b=value ...]
  jmtl eval   --config configs/x.py --workdir DIR
  jmtl federated --config configs/federated_x.py --workdir DIR   (sites x rounds over a mesh)
  jmtl data   --config configs/x.py                 (record counts per task and split)
  jmtl data prepare --config configs/x.py           (TFDS download-and-prepare into data.tfds_dir)
  jmtl bench  step|data|loop|optimizer|scaling|federated --config configs/x.py [--json] [--out FILE]
  jmtl compile --config configs/x.py [--topology local|v5e-16|v4-32|...] [--json] [--out FILE]
  jmtl sweep  --config configs/optim_study.py --workdir DIR   (optimizer x lr x seed study)
  jmtl report optim --workdir DIR [--out DIR]                 (tables, ablation, loss curves)
  jmtl study mtl --config configs/mtl_study.py --workdir DIR  (multi-task study: arms x seeds)
  jmtl report mtl --runs DIR [DIR ...] [--out DIR]            (task x arm table, paired CIs, curves)
  jmtl study federated --config configs/fed_study.py --workdir DIR  (federated study: arms x seeds)
  jmtl report federated --runs DIR [DIR ...] [--out DIR]      (parts (a)-(f): tables, plots)
  jmtl --help | jmtl CMD --help | jmtl --version

Every command with a config runs `jmtl.preflight.run` before any work. Never a traceback for a
mistake: a user mistake (bad flag, config key, value, path or data file) prints one line
`jmtl: error: ...` and exits with code 2; an environment failure (disk full, I/O error) prints
one line `jmtl: error: <what> (<path>)` and exits with code 1.
"""

from __future__ import annotations

import ast
import errno
import importlib.metadata
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from jmtl.config import ConfigError
from jmtl.data.prepare import PrepareError
from jmtl.train import EvalError
from jmtl.train import NonFiniteError

COMMANDS = ("train", "eval", "data", "bench", "compile", "sweep", "study", "report", "federated")
BENCHES = ("step", "data", "loop", "optimizer", "scaling", "federated")
REPORTS = ("optim", "mtl", "federated")
STUDIES = ("mtl", "federated")
DATA_SUBCOMMANDS = ("prepare",)
COMMAND_USAGE = {
    "train": "jmtl train --config FILE --workdir DIR [--config.KEY=VALUE ...]",
    "eval": "jmtl eval --config FILE --workdir DIR [--backend NAME] [--config.KEY=VALUE ...]",
    "data": "jmtl data [prepare] --config FILE [--config.KEY=VALUE ...]",
    "bench": "jmtl bench {step,data,loop,optimizer,scaling,federated} --config FILE [--json] [--out FILE] "
             "[--config.KEY=VALUE ...]",
    "compile": "jmtl compile --config FILE [--topology NAME] [--json] [--out FILE] "
               "[--config.KEY=VALUE ...]",
    "sweep": "jmtl sweep --config FILE --workdir DIR [--config.KEY=VALUE ...]",
    "study": "jmtl study {mtl,federated} --config FILE --workdir DIR [--config.KEY=VALUE ...]",
    "report": "jmtl report optim --workdir DIR [--out DIR] | "
              "jmtl report {mtl,federated} --runs DIR [DIR ...] [--out DIR]",
    "federated": "jmtl federated --config FILE --workdir DIR [--backend NAME] [--config.KEY=VALUE ...]",
}
COMMAND_HELP = {
    "train": "Train; resumes from the latest checkpoint in --workdir.",
    "eval": "Evaluate the latest checkpoint in --workdir; writes eval.json and predictions/.",
    "data": "Record counts per task and split, and a first training record (checks your data); "
            "`data prepare`: TFDS download-and-prepare of the tasks' datasets into "
            "data.tfds_dir (data.tfds_manual_dir: manually downloaded files).",
    "bench": "Benchmarks: train-step speed (step), input pipeline (data), the step loop fed "
             "from memory / synchronously / with prefetch (loop), optimizer updates (optimizer), "
             "step speed and per-device bytes across model sizes and mesh layouts (scaling), "
             "a federated round against the same steps centralised (federated; with "
             "bench.federated.mode=bytes_to_target: uplink bytes of DiLoCo arms to reach "
             "synchronous training's dev score).",
    "compile": "Ahead-of-time compile of the train step for a topology (local, or a TPU slice "
               "such as v5e-16): sharding rules that do not divide, per-device memory, fits. "
               "Exit 1 when it does not fit.",
    "sweep": "The optimizer study: optimizers x learning rates x seeds; writes sweep.json.",
    "study": "A study: every arm of study.arms x study.seeds, one run after another; "
             "finished runs are skipped; writes study.json. mtl: the multi-task study "
             "(configs/mtl_*.py); federated: the federated study (configs/fed_study_*.py; "
             "federated runs and a centralized baseline). Overrides of study.arms / "
             "study.seeds / study.target / study.target_metric change the study config, all "
             "others every arm.",
    "report": "optim: tables, ablation and loss curves of a finished sweep. mtl: the task x "
              "arm table (mean ± std over seeds, paired differences against the single-task "
              "arm with 95 % CI; Markdown + CSV) and PNG curves of the runs under --runs. "
              "federated: per part (a)-(f) of the federated study, final dev score, rounds "
              "and simulated seconds to study.target (on study.target_metric), bytes, "
              "epsilon, cost per cloud, paired differences against FedAvg with 95 % CI "
              "(Markdown + CSV) and PNG plots.",
    "federated": "Federated training over the sites of fed.sites (rounds of local steps and "
                 "aggregation); resumes from the latest checkpoint in --workdir.",
}
_COMMAND_FLAGS = {
    "train": ("config", "workdir"), "eval": ("config", "workdir", "backend"), "data": ("config",),
    "bench": ("config", "json", "out"), "compile": ("config", "topology", "json", "out"),
    "sweep": ("config", "workdir"), "study": ("config", "workdir"),
    "report": ("workdir", "runs", "out"), "federated": ("config", "workdir", "backend"),
}
# Subcommands that take fewer flags than their command lists.
_SUB_FLAGS = {("report", "optim"): ("workdir", "out"), ("report", "mtl"): ("runs", "out"),
              ("report", "federated"): ("runs", "out")}
_FLAG_HELP = (
    ("--config FILE", "config file defining get_config() (see configs/, jmtl/defaults.py)"),
    ("--workdir DIR", "run directory (checkpoints, metrics, predictions)"),
    ("--topology NAME", "compile: local (default) or a TPU slice: v4-N, v5e-N (= v5litepod-N), "
                        "v5p-N, v6e-N"),
    ("--json", "bench, compile: print the result as JSON"),
    ("--runs DIR...", "report mtl, federated: run directories, or folders holding them"),
    ("--out FILE|DIR", "bench, compile: also write the JSON here; report: output directory"),
    ("--backend NAME", "federated, eval: shorthand for --config.fed.backend=NAME (shard_map, "
                       "pmap, flower)"),
)
USAGE = "usage: " + "\n       ".join(COMMAND_USAGE[c] for c in COMMANDS)
HELP = "\n".join([
    USAGE, "", "commands:", *(f"  {c:<8} {COMMAND_HELP[c]}" for c in COMMANDS), "",
    "Any config key can be overridden, e.g. --config.train.steps=100 or --config.tasks=sst2,mrpc",
    "(--config.data.length_buckets=64 is the tuple (64,)). jmtl/defaults.py lists every key.",
    "jmtl CMD --help: the flags of CMD. jmtl --version: the installed version.",
    "Exit codes: 0 done, 1 environment failure (compile: the step does not fit), 2 user mistake",
    "(compile: a sharding rule that does not divide, no TPU runtime), 3 non-finite loss."])


def _make_flags() -> flags.FlagValues:
  """A fresh flag set per parse, so `run` can be called more than once in one process."""
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "Config file (defines get_config()).", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, predictions).",
                      flag_values=fv)
  flags.DEFINE_string("topology", "local", "compile: target topology (local, v5e-16, ...).",
                      flag_values=fv)
  flags.DEFINE_bool("json", False, "bench, compile: print the result as JSON.", flag_values=fv)
  flags.DEFINE_string("out", None, "bench: also write the JSON here; report: output directory.",
                      flag_values=fv)
  flags.DEFINE_multi_string("runs", None, "report mtl: run directories or folders of them.",
                            flag_values=fv)
  flags.DEFINE_string("backend", None, "federated, eval: shorthand for --config.fed.backend.",
                      flag_values=fv)
  return fv


def config_overrides(args: Sequence[str], fv: flags.FlagValues) -> list[str]:
  """The `--config.KEY=VALUE` overrides of a command line, in order, with the shorthand
  `--backend NAME` as `--config.fed.backend=NAME` after them (it wins)."""
  overrides = [a for a in args if a.startswith("--config.")]
  if fv["backend"].present:
    overrides.append(f"--config.fed.backend={fv.backend}")
  return overrides


class UsageError(ConfigError):
  pass


def _tuple_items(text: str) -> tuple[str, ...]:
  """A bare word list `a,b` (not a Python literal) as a tuple of strings, every item kept: an
  empty item stays '' (`,int8` is ('', 'int8'), where '' may mean something, e.g. float32 in
  bench.federated.compress), so a stray comma reaches the key's check instead of vanishing."""
  return tuple(part.strip() for part in text.split(","))


def _parse_value(key: str, default: Any, text: str) -> Any:
  """Parses an override by the type of the value it replaces (bool, int, float, str, tuple,
  dict). A tuple key takes a Python tuple literal, one element (`64` or `(32)`, which Python
  reads as an int, both mean a one-element tuple) or bare words `a,b`. Raises ConfigError naming
  the key and the expected type; never leaks a parser object."""
  if isinstance(default, bool):
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0"):
      raise ConfigError(f"config key {key!r}: cannot parse {text!r} as bool (true or false)")
    return low in ("true", "1")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: cannot parse {text!r} as int") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: cannot parse {text!r} as float") from None
  if isinstance(default, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    if isinstance(default, (tuple, list)) and text.strip() and not set(text) & set("()[]{}'\""):
      return _tuple_items(text)  # bare words: sst2 or sst2,mrpc
    kind = "tuple" if isinstance(default, (tuple, list)) else "dict"
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as a {kind} literal") from None
  if isinstance(default, (tuple, list)):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if not isinstance(value, dict):
    raise ConfigError(f"config key {key!r}: {text!r} is not a dict literal ({{name: value}})")
  return value


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
    value = _parse_value(key, node[leaf], text)
    with node.unlocked():
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:  # ConfigDict's own type lock
        raise ConfigError(f"config key {key!r}: cannot set {value!r} ({e})") from None


def _version() -> str:
  """`jmtl <version>` of the installed distribution."""
  try:
    return f"jmtl {importlib.metadata.version('jmtl')}"
  except importlib.metadata.PackageNotFoundError:
    return "jmtl (not installed)"


class _Exit(Exception):
  """Print `text` to stdout and exit 0 (help, version)."""

  def __init__(self, text: str):
    super().__init__(text)
    self.text = text


def _command_help(cmd: str) -> str:
  """Usage of one command and the flags it takes."""
  flags_text = [f"  {name:<18} {text}" for name, text in _FLAG_HELP
                if name.split()[0].lstrip("-") in _COMMAND_FLAGS[cmd]]
  return "\n".join([f"usage: {COMMAND_USAGE[cmd]}", "", COMMAND_HELP[cmd], "", "flags:",
                    *flags_text])


def parse(argv: Sequence[str]):
  """Parses `jmtl CMD [SUB] flags...`; returns (command, subcommand, config, flag values).

  Raises UsageError (exit 2) on a user mistake, and _Exit (exit 0) for --help / --version."""
  if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
    raise _Exit(HELP)
  if len(argv) >= 2 and argv[1] == "--version":
    raise _Exit(_version())
  if len(argv) < 2:
    raise UsageError(f"no command; commands: {', '.join(COMMANDS)} (jmtl --help)")
  cmd, rest = argv[1], list(argv[2:])
  if cmd not in COMMANDS:
    raise UsageError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
    raise _Exit(_command_help(cmd))
  sub = None
  if cmd in ("bench", "report", "study"):
    choices = {"bench": BENCHES, "report": REPORTS, "study": STUDIES}[cmd]
    if not rest or rest[0] not in choices:
      raise UsageError(f"jmtl {cmd} needs one of: {', '.join(choices)}")
    sub, rest = rest[0], rest[1:]
  if cmd == "data" and rest and not rest[0].startswith("-"):
    if rest[0] not in DATA_SUBCOMMANDS:
      raise UsageError(f"jmtl data: unknown subcommand {rest[0]!r}; use jmtl data --config FILE "
                       f"or jmtl data {' | '.join(DATA_SUBCOMMANDS)} --config FILE")
    sub, rest = rest[0], rest[1:]
  fv = _make_flags()
  try:
    fv([argv[0]] + _runs_values([a for a in rest if not a.startswith("--config.")]))
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from e
  overrides = config_overrides(rest, fv)
  _check_flags_apply(cmd, sub, fv, overrides)
  if cmd == "report" and sub in ("mtl", "federated"):
    if not fv.runs:
      raise UsageError(f"jmtl report {sub} needs --runs DIR [DIR ...]")
  elif cmd in ("train", "eval", "sweep", "study", "report", "federated") and not fv.workdir:
    raise UsageError(f"jmtl {cmd} needs --workdir DIR")
  from jmtl.defaults import malformed_uri
  for flag, path in (("--workdir", fv.workdir), ("--out", fv.out), *(("--runs", r) for r in
                                                                    (fv.runs or ()))):
    if path and malformed_uri(path):  # `gs:/b/x` would be a local folder ./gs:/b/x
      raise ConfigError(f"{flag} {path}: looks like a URI missing a slash (did you mean "
                        f"{malformed_uri(path)}{path.split(':/', 1)[1]}?)")
  if cmd == "report":
    return cmd, sub, None, fv
  if not fv.config:
    raise UsageError("--config FILE is required")
  from jmtl.config import load_config_file
  config = load_config_file(fv.config)
  apply_overrides(config, overrides)
  return cmd, sub, config, fv


def _check_flags_apply(cmd: str, sub: str | None, fv: flags.FlagValues,
                       overrides: Sequence[str]) -> None:
  """Refuses a flag that `jmtl CMD` would parse and then ignore (all commands share one flag
  set): UsageError naming the flag and the flags the command takes. The owner of which
  command takes which flag is `_COMMAND_FLAGS` (also what `jmtl CMD --help` lists)."""
  takes = _SUB_FLAGS.get((cmd, sub), _COMMAND_FLAGS[cmd])
  given = [name for name in fv if fv[name].present]
  stray = [name for name in given if name not in takes]
  if cmd == "report" and overrides:  # a report reads run files, not a config
    stray.append(overrides[0].split("=", 1)[0])
  if stray:
    name = stray[0] if stray[0].startswith("--") else f"--{stray[0]}"
    command = f"jmtl {cmd}{' ' + sub if sub else ''}"
    flags_text = ", ".join(f"--{t}" for t in takes)
    raise UsageError(f"flag {name} does not apply to {command} (its flags: {flags_text}"
                     f"{', --config.KEY=VALUE' if 'config' in takes else ''})")


def _runs_values(args: Sequence[str]) -> list[str]:
  """`--runs A B C` (the values up to the next flag) as `--runs=A --runs=B --runs=C`, the form
  absl's multi-string flag reads; `--runs=A` and `--runs A` pass as they are."""
  out, i = [], 0
  while i < len(args):
    if args[i] == "--runs":
      j = i + 1
      while j < len(args) and not args[j].startswith("-"):
        out.append(f"--runs={args[j]}")
        j += 1
      if j == i + 1:
        out.append(args[i])  # no value: absl names the flag
      i = j
    else:
      out.append(args[i])
      i += 1
  return out


def _report_runs(sub: str, fv) -> dict:
  """`jmtl report mtl` / `jmtl report federated`: a missing folder, no run of an arm or an
  unreadable run file is a ConfigError naming it."""
  if sub == "federated":
    from jmtl.study.fed_report import report_federated as report
  else:
    from jmtl.study.mtl_report import report_mtl as report
  out = fv.out or str(pathlib.Path(fv.runs[0], "report"))
  try:
    return report(fv.runs, out)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e


def _study(sub: str, config, fv, argv: Sequence[str]) -> dict:
  """`jmtl study mtl` / `jmtl study federated`: loads the arms (the overrides other than the
  study config's keys apply to each), checks every run's config with the preflight of the
  command that trains it (`jmtl federated` for a federated run, else `jmtl train`) before the
  first run, then runs the study."""
  from jmtl import config as config_lib
  from jmtl import preflight
  from jmtl.study import mtl as mtl_study
  if pathlib.Path(fv.workdir).is_file():
    raise ConfigError(f"--workdir {fv.workdir} is a file")
  _, arm_overrides = mtl_study.split_overrides([a for a in argv if a.startswith("--config.")])
  config = config_lib.validate(config, check_files=False)
  arms = mtl_study.load_arms(config, fv.config, arm_overrides, apply_overrides, kind=sub)
  checked = set()
  for run, cfg in mtl_study.plan(config, arms):
    if (run.arm, run.task) not in checked:  # seeds do not change what preflight checks
      checked.add((run.arm, run.task))
      try:
        preflight.run(cfg, "federated" if cfg.fed.sites else "train", None)
      except ConfigError as e:
        raise ConfigError(f"arm {run.arm!r}{' task ' + repr(run.task) if run.task else ''}: "
                          f"{e}") from e
  try:
    return mtl_study.run_study(config, arms, fv.workdir)
  except ValueError as e:  # a run directory of another config
    raise ConfigError(str(e)) from e


def _bench(sub: str, config, out: str | None = None) -> dict:
  if sub == "step":
    from jmtl.bench.step import bench_step
    return bench_step(config)
  if sub == "data":
    from jmtl.bench.data import bench_data
    return bench_data(config)
  if sub == "loop":
    from jmtl.bench.loop import bench_loop
    return bench_loop(config)
  if sub == "scaling":
    from jmtl.bench.scaling import bench_scaling
    # Rows go to --out as each finishes (a killed bench keeps them); one line per row here.
    return bench_scaling(config, out=out, echo=lambda s: print(s, file=sys.stderr, flush=True))
  if sub == "federated" and config.bench.federated.mode == "bytes_to_target":
    from jmtl.bench.federated import bytes_to_target
    # One line per arm here as each run finishes; --out is rewritten after each.
    return bytes_to_target(config, out=out, echo=lambda s: print(s, file=sys.stderr, flush=True))
  if sub == "federated":
    from jmtl.bench.federated import bench_federated
    return bench_federated(config)
  from jmtl.bench.optimizer import bench_optimizer
  return bench_optimizer(config)


def scaling_table(result: dict) -> str:
  """The rows of `jmtl bench scaling` as an aligned text table."""
  head = (f"{'size':<6} {'layout':<7} {'params':>11} {'tokens/s':>9} {'MFU %':>6} "
          f"{'param MiB/dev':>13} {'opt MiB/dev':>11} {'param ratio':>11}")
  lines = [head]
  for r in result["rows"]:
    if "skipped" in r:
      lines.append(f"{r['size']:<6} {r['layout']:<7} skipped: {r['skipped']}")
      continue
    lines.append(f"{r['size']:<6} {r['layout']:<7} {r['params']:>11,} {r['tokens_per_s']:>9.0f} "
                 f"{r['mfu_percent']:>6.1f} {r['params_bytes_per_device'] / 2**20:>13.1f} "
                 f"{r['opt_state_bytes_per_device'] / 2**20:>11.1f} "
                 f"{r['fsdp_param_ratio']:>11.4f}")
  return "\n".join(lines)


def _compile(compile_lib, config, target, fv) -> int:
  """`jmtl compile`: prints the report; exit 0 compiled and fits; 1 does not fit (the compiled
  total, the compiler's out-of-memory error, or parameters and optimizer state alone exceed the
  device memory); 2 (ConfigError, after the report) a sharding rule that does not divide, or
  no compiler for the target."""
  report = compile_lib.compile_check(config, target)
  text = json.dumps(report, indent=2, sort_keys=True)
  if fv.out:
    pathlib.Path(fv.out).write_text(text + "\n")
  print(text if fv.json else compile_lib.format_report(report), flush=True)
  problems = report["sharding_problems"]
  if problems:
    raise ConfigError(f"--topology {target.name} (mesh data x fsdp x tensor = {report['mesh']}): "
                      f"{len(problems)} sharding rule(s) do not divide (each listed above), "
                      f"nothing compiled; the first: {problems[0]}")
  if report["fits"] is False:
    if report["total_bytes"] is not None:
      why = f"the train step needs {report['total_bytes']:,} bytes per device"
    elif report["out_of_memory"]:
      why = f"the compiler says {report['out_of_memory']}"
    else:
      why = (f"parameters and optimizer state alone need "
             f"{report['params_bytes_per_device'] + report['opt_state_bytes_per_device']:,} "
             "bytes per device")
    print(f"jmtl: error: does not fit: {why}; a {target.name} device has "
          f"{report['device_memory_bytes']:,} ({report['device_memory_source']})",
          file=sys.stderr)
    return 1
  if not report["compiled"]:
    raise ConfigError(f"{report['not_compiled']}; the sharding check and the parameter and "
                      "optimizer-state bytes above need none")
  return 0


def describe_data(config) -> str:
  """Record counts per task and split, and the first training record of each task.

  A split the task declares whose file is absent shows as "<split>: not present" (e.g. GLUE
  test files, which are optional). A malformed row raises ConfigError naming file:line."""
  from jmtl import tasks as task_registry
  from jmtl.data import sources
  lines = []
  for name in config.tasks:
    task = task_registry.get_task(name)
    counts = []
    first = None
    for split in ("train", "validation", "test"):
      if split not in task.splits and not (task.tfds and split in task.tfds):
        continue  # the task has no such split
      if sources.check_task_files(task, config.data, [split]):
        counts.append(f"{split}: not present")
        continue
      try:
        records = sources.load_records(task, split, config.data)
      except KeyError:
        continue
      except ValueError as e:  # a malformed row or file: "<file>:<line>: <reason>"
        raise ConfigError(f"task {name!r} split {split!r}: {e}") from e
      counts.append(f"{split} {len(records)}")
      if split == "train" and records:
        first = records[0]
    lines.append(f"{name} ({task.kind}): " + ", ".join(counts))
    if first is not None:
      lines.append("  first train record: " + json.dumps(first, ensure_ascii=False)[:300])
  return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
  """Runs one command line; returns the exit code. User mistakes raise ConfigError, checked by
  `jmtl.preflight.run` before any work."""
  cmd, sub, config, fv = parse(argv)
  if cmd == "report" and sub in ("mtl", "federated"):
    result = _report_runs(sub, fv)
    print(f"report of {sum(a['finished'] for a in result['arms'].values())} finished run(s) "
          f"({len(result['arms'])} arms) written to {fv.out or pathlib.Path(fv.runs[0], 'report')}: "
          f"{', '.join(result['files'])}", flush=True)
    return 0
  if cmd == "study":
    from jmtl.train.loop import StopRequest
    # Held over the whole study: a signal during a run is answered by the trainer (checkpoint,
    # line, 128 + N); one between runs or after the last is recorded here and answered before
    # the next run (`jmtl.study.runs.stop_if_signalled`) or below.
    with StopRequest() as stop:
      result = _study(sub, config, fv, argv)
      done = sum(1 for r in result["runs"] if r["status"] == "ok")
      print(f"study done: {done} of {len(result['runs'])} run(s) finished "
            f"({len(result['runs']) - done} diverged); {pathlib.Path(fv.workdir, 'study.json')}; "
            f"report: jmtl report {sub} --runs {fv.workdir} --out DIR", flush=True)
      return _finished_anyway(stop, "study")
  if cmd == "report":
    from jmtl.study.report import report_optim
    if not pathlib.Path(fv.workdir, "sweep.json").is_file():
      raise ConfigError(f"--workdir {fv.workdir}: no sweep.json (run jmtl sweep first)")
    result = report_optim(fv.workdir, fv.out or fv.workdir)
    print(json.dumps(result, indent=2, sort_keys=True, default=str)[:4000])
    return 0
  from jmtl import preflight

  if cmd == "data" and sub == "prepare":
    from jmtl.data import prepare
    prepare.prepare(preflight.run(config, "prepare", None), echo=lambda s: print(s, flush=True))
    return 0
  if cmd == "compile" and config.fed.sites:
    raise ConfigError(f"jmtl compile compiles the centralised train step; {fv.config} is a "
                      f"federated config (fed.sites), whose round it cannot compile ahead of "
                      f"time yet (run jmtl bench federated on the devices instead)")
  if cmd == "compile":
    from jmtl.bench import compile as compile_lib
    target = compile_lib.get_target(fv.topology)
    config = preflight.run(config, cmd, None, device_count=target.num_devices)
    return _compile(compile_lib, config, target, fv)
  if cmd == "bench" and sub == "federated" and not config.fed.sites:
    raise ConfigError(f"jmtl bench federated needs a federated config (config key 'fed.sites' "
                      f"is empty in {fv.config})")
  flower = cmd == "federated" and config.get("fed", {}).get("backend") == "flower"
  config = preflight.run(config, cmd, fv.workdir if cmd in ("train", "eval", "sweep", "federated")
                         and not flower else None)  # flower: the SuperLink's machine writes it
  if flower:
    from jmtl.federated import flower as flower_lib
    try:
      flower_lib.submit(config, fv.config, config_overrides(argv[2:], fv),
                        fv.workdir, echo=lambda s: print(s, flush=True))
    except flower_lib.RunError as e:  # the run failed, or wait_s ran out: one line, exit 1
      print(f"jmtl: error: {_one_line(str(e))}", file=sys.stderr)
      return 1
    return 0
  if cmd in ("federated", "train"):
    from jmtl.train.loop import StopRequest
    # The run's own handlers end with it; these hold on until its final line is out, so a
    # signal while it closes (the last checkpoint committing) or right after is answered as
    # the run answers one: a line naming the saved checkpoint, exit 128 + N.
    with StopRequest() as stop:
      _run_job(cmd, config, fv)
      if stop.signal is None:
        return 0
      if _primary():
        where = (f"round {config.fed.rounds}" if cmd == "federated"
                 else f"step {config.train.steps}")
        print(f"received signal {stop.signal}: saved checkpoint at {where}, exiting "
              f"(the run had finished)", flush=True)
      return 128 + stop.signal
  if cmd == "eval":
    from jmtl.train.loop import StopRequest
    # A signal during the evaluation stops it between tasks with one line (nothing to save);
    # one after it wrote its outputs is answered once they are printed.
    with StopRequest() as stop:
      if config.fed.sites and pathlib.Path(fv.workdir, "rounds.jsonl").exists():
        from jmtl.federated.loop import evaluate_workdir
        result = evaluate_workdir(config, fv.workdir)
      else:
        from jmtl.train.loop import evaluate_checkpoint
        result = evaluate_checkpoint(config, fv.workdir)
      if _primary():
        print(json.dumps(result, indent=2, sort_keys=True), flush=True)
      return _finished_anyway(stop, "evaluation")
  if cmd == "data":
    print(describe_data(config))
    if config.fed.sites:
      from jmtl.federated.loop import partition_table
      print(partition_table(config))
  elif cmd == "sweep":
    from jmtl.study.sweep import run_sweep
    from jmtl.train.loop import StopRequest
    with StopRequest() as stop:  # as for `jmtl study` above
      result = run_sweep(config, fv.workdir)
      print(json.dumps(result, indent=2, sort_keys=True, default=str)[:4000], flush=True)
      return _finished_anyway(stop, "sweep")
  else:
    result = _bench(sub, config, fv.out)
    text = json.dumps(result, indent=2, sort_keys=True)
    if fv.out:
      pathlib.Path(fv.out).write_text(text + "\n")
    if fv.json:
      print(text)
    elif sub == "scaling":
      print(scaling_table(result))
    elif sub == "federated" and result.get("mode") == "bytes_to_target":
      print(f"reference (sync, {result['reference']} dev score): {result['reference_score']:.2f}; "
            f"target {result['target_score']:.2f}; >= {result['target_factor']:g}x fewer bytes "
            f"at <= {result['target_points']:g} point lower: "
            + ("met by " + ", ".join(result["meeting_arms"]) if result["meets_target"]
               else "not met"))
    else:
      for k, v in result.items():
        print(f"{k:>28}: {v}")
  return 0


def _finished_anyway(stop, what: str) -> int:
  """Exit code of a study / sweep / evaluation that finished (its results written and printed)
  although signal N arrived near its end: 128 + N after one line saying so; else 0."""
  if stop.signal is None:
    return 0
  if _primary():
    print(f"received signal {stop.signal}: the {what} had finished (results written), exiting",
          flush=True)
  return 128 + stop.signal


def _run_job(cmd: str, config, fv) -> None:
  """`jmtl train` / `jmtl federated`: runs the job, then process 0 prints the final line."""
  if cmd == "federated":
    from jmtl.federated.loop import federated
    metrics = federated(config, fv.workdir)
    if not _primary():  # process 0 of a multi-host run wrote the outputs and says so
      return
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                      if isinstance(v, float) and not k.startswith("site/"))
    print(f"final evaluation ({config.data.eval_split}, round {config.fed.rounds}): "
          f"{shown or 'no metrics'}; rounds in {pathlib.Path(fv.workdir, 'rounds.jsonl')}, "
          f"per-site held-out metrics in {pathlib.Path(fv.workdir, 'eval.json')}", flush=True)
    return
  from jmtl.train.loop import outputs_names, train
  metrics = train(config, fv.workdir)
  if not _primary():
    return
  results, folder = outputs_names(config.data.eval_split)
  shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
  print(f"final evaluation ({config.data.eval_split}, step {config.train.steps}): "
        f"{shown or 'no metrics (unlabelled split)'}; written to "
        f"{pathlib.Path(fv.workdir, results)} and {pathlib.Path(fv.workdir, folder)}/",
        flush=True)


def _primary() -> bool:
  from jmtl.parallel import distributed  # noqa: PLC0415 (imports jax)
  return distributed.is_primary()


# errno values that mean the machine, not the command line, is at fault (exit 1).
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EIO", "ENOMEM", "EROFS", "EMFILE", "ENFILE",
                                "ETIMEDOUT", "ECONNRESET", "EAGAIN") if hasattr(errno, n))


def os_error_line(e: OSError) -> tuple[str, int]:
  """(`<what> (<path>)`, exit code) for an OSError: 1 for environment failures (disk full, I/O
  error, read-only file system, ...), 2 for what the user named (missing file, permission,
  a file where a directory belongs, ...)."""
  what = e.strerror or str(e) or type(e).__name__
  paths = [p for p in (e.filename, e.filename2) if p]
  line = f"{what} ({' -> '.join(map(str, paths))})" if paths else what
  return line, 1 if e.errno in _ENVIRONMENT_ERRNOS or e.errno is None else 2


def main(argv: Sequence[str] | None = None) -> None:
  """The `jmtl` entry point: never a traceback for a user or environment error.

  Exit codes: 0 done (also --help, --version); 1 environment failure (disk full, I/O error);
  2 user mistake (flag, config key, value, path, data file); 3 non-finite loss; 1 a failed
  evaluation (its checkpoint kept); 128 + N after saving on signal N."""
  argv = list(sys.argv if argv is None else argv)
  logging.set_verbosity(logging.WARNING)
  try:
    code = run(argv)
  except _Exit as e:
    print(e.text)
    code = 0
  except ConfigError as e:
    print(f"jmtl: error: {_one_line(str(e))}", file=sys.stderr)
    code = 2
  except NonFiniteError as e:
    print(f"jmtl: {_one_line(str(e))}", file=sys.stderr)
    code = 3
  except (EvalError, PrepareError) as e:
    print(f"jmtl: error: {_one_line(str(e))}", file=sys.stderr)
    code = 1
  except OSError as e:  # PermissionError, IsADirectoryError, NotADirectoryError, ENOSPC, ...
    line, code = os_error_line(e)
    print(f"jmtl: error: {_one_line(line)}", file=sys.stderr)
    _leave_if_alone(code)
  except KeyboardInterrupt:
    code = 130
  except Exception as e:  # noqa: BLE001 - only a lost peer of a multi-host run gets here
    if not _lost_peer(e):
      raise
    print(f"jmtl: error: a process of this multi-host run failed or was lost "
          f"({type(e).__name__}: {_one_line(str(e))[:300]}); restart all processes to resume "
          f"from the last checkpoint", file=sys.stderr)
    _leave_if_alone(1)
    code = 1
  sys.exit(code)


def _lost_peer(e: BaseException) -> bool:
  """A collective of a multi-host run failed: a peer process died or is unreachable."""
  if "jax" not in sys.modules:
    return False
  import jax  # noqa: PLC0415
  return jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError)


def _leave_if_alone(code: int) -> None:
  """In a multi-host run, an error that this process may have met alone (a write of process
  0, a lost peer) ends it without the distributed runtime's shutdown barrier, which would wait
  for peers blocked in a collective; they then stop when the runtime sees this one gone."""
  if "jax" in sys.modules:
    import jax  # noqa: PLC0415
    if jax.process_count() > 1:
      from jmtl.parallel import distributed  # noqa: PLC0415
      distributed.abandon(code)


def _one_line(text: str) -> str:
  return " ".join(text.split("\n")).strip()


if __name__ == "__main__":
  main()
