"""`jmtl sweep`: a fair optimizer study (same model, tasks, data and budget for every optimizer).

For each optimizer in `sweep.optimizers`, every learning rate of its own log-spaced grid

  lr_k = centre * lr_ratio ** (k - (lr_points - 1) // 2),   k = 0 .. lr_points - 1

(`centre` from `sweep.lr_centres`, rounded to 3 significant digits) is trained with every seed
of `sweep.seeds`, each run in `<W>/<optimizer>/lr<lr>/seed<seed>/`. An optimizer's best learning
rate maximises the mean over seeds of the selection score on the dev split (`data.eval_split`);
a learning rate where any seed diverged is not eligible. Then each `sweep.ablation` switch of
`jmtl_adaptive` is toggled alone at its best learning rate: a switch that is on in the full
configuration is turned off (`<W>/ablation/no_<switch>/lr<lr>/seed<seed>/`), one that is off is
turned on (`<W>/ablation/with_<switch>/...`). With `sweep.confirm_seeds`, each optimizer is
then trained again at its best learning rate with those fresh seeds
(`<W>/confirm/<optimizer>/lr<lr>/seed<seed>/`): scores that did not take part in choosing the
learning rate, free of the selection's optimism. Runs are sequential; a run whose `eval.json`
(or divergence record) exists is skipped, so an interrupted sweep resumes where it stopped.
`<W>/sweep.json` holds every run's final metrics and the selection.

Each run's `run_info.json` records `code`, a digest of the jmtl sources that trained it
(`code_digest`). A finished run is reused only if its config matches (`_check_same_config`);
one trained by other code is still reused, but named on the console and listed in
sweep.json's `reused_other_code`, since a config match cannot show that the code behaves alike.
Keys missing from a reused run's `config.json` (added to jmtl after it ran) are taken at their
defaults; they are named on the console and in sweep.json's `assumed_defaults`, since a new
key's default may change what the code does (delete the directory to redo the run).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from jmtl import config as config_lib
from jmtl import optim
from jmtl.eval import metrics as metrics_lib
from jmtl.eval import predictions as predictions_lib
from jmtl.study import runs as runs_lib

TrainFn = runs_lib.TrainFn

ABLATION_OPTIMIZER = "jmtl_adaptive"
SWITCHES = ("belief", "cautious", "block_nu", "trust_ratio", "update_clip", "metric_schedule")
RUN_INFO = runs_lib.RUN_INFO  # written by the sweep next to the trainer's files
MIN_LR_POINTS = 4
MIN_SEEDS = 3
CONFIRM = "confirm"  # the variant of the fresh-seed confirmation runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep; `variant` is "" for the grid, "no_<switch>" or
  "with_<switch>" for ablations, "confirm" for the fresh-seed confirmation."""

  optimizer: str
  lr: float
  seed: int
  variant: str = ""

  @property
  def relpath(self) -> str:
    if self.variant == CONFIRM:
      group = f"confirm/{self.optimizer}"
    else:
      group = f"ablation/{self.variant}" if self.variant else self.optimizer
    return f"{group}/lr{format_lr(self.lr)}/seed{self.seed}"


def format_lr(lr: float) -> str:
  """The learning rate as written in directory names and tables: 3 significant digits."""
  return f"{lr:.3g}"


def lr_grid(centre: float, points: int, ratio: float) -> list[float]:
  """`centre * ratio ** (k - (points - 1) // 2)` for k < points, rounded to 3 significant digits."""
  if not centre > 0:
    raise ValueError(f"learning-rate centre must be > 0, got {centre!r}")
  if points < 1 or not ratio > 1:
    raise ValueError(f"need points >= 1 and ratio > 1, got points={points}, ratio={ratio}")
  offset = (points - 1) // 2
  return [float(format_lr(centre * ratio ** (k - offset))) for k in range(points)]


def selection_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Metric keys averaged into the selection score (`sweep.select_metric`, or every task's first)."""
  if config.sweep.select_metric:
    return [config.sweep.select_metric]
  return metrics_lib.primary_metric_keys(config.tasks)


def score(metrics: Mapping[str, Any], keys: Sequence[str]) -> float:
  """Mean of `metrics[k]` over `keys`; NaN when one is missing, null or non-finite."""
  values = []
  for k in keys:
    v = metrics.get(k)
    if v is None or not math.isfinite(float(v)):
      return math.nan
    values.append(float(v))
  return float(np.mean(values))


def _centres(config: ml_collections.ConfigDict) -> dict[str, float]:
  out = {}
  for i, pair in enumerate(config.sweep.lr_centres):
    if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], (int, float)):
      raise config_lib.ConfigError(
          f"config key 'sweep.lr_centres': entry {i} = {pair!r} must be (optimizer, lr)")
    out[pair[0]] = float(pair[1])
  return out


def check_sweep_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the bad `sweep.*` key."""
  s = config.sweep
  if not s.optimizers:
    raise config_lib.ConfigError("config key 'sweep.optimizers' is empty")
  for name in s.optimizers:
    if name not in optim.NAMES:
      raise config_lib.ConfigError(f"config key 'sweep.optimizers': unknown optimizer {name!r}; "
                                   f"known: {', '.join(optim.NAMES)}")
  if len(set(s.optimizers)) != len(s.optimizers):
    raise config_lib.ConfigError(f"config key 'sweep.optimizers' names one twice: {list(s.optimizers)}")
  centres = _centres(config)
  for name in s.optimizers:
    if name not in centres:
      raise config_lib.ConfigError(f"config key 'sweep.lr_centres' has no centre for {name!r}")
    if not centres[name] > 0:
      raise config_lib.ConfigError(f"config key 'sweep.lr_centres': {name!r} = {centres[name]} must be > 0")
  if s.lr_points < MIN_LR_POINTS:
    raise config_lib.ConfigError(f"config key 'sweep.lr_points' = {s.lr_points} must be >= {MIN_LR_POINTS}")
  if not s.lr_ratio > 1:
    raise config_lib.ConfigError(f"config key 'sweep.lr_ratio' = {s.lr_ratio} must be > 1")
  seeds = list(s.seeds)
  if len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds) or not all(
      isinstance(x, int) and not isinstance(x, bool) for x in seeds):
    raise config_lib.ConfigError(
        f"config key 'sweep.seeds' = {seeds!r} must be >= {MIN_SEEDS} distinct ints")
  confirm = list(s.confirm_seeds)
  if confirm and (len(confirm) < 2 or len(set(confirm)) != len(confirm) or not all(
      isinstance(x, int) and not isinstance(x, bool) for x in confirm)):
    raise config_lib.ConfigError(
        f"config key 'sweep.confirm_seeds' = {confirm!r} must be () or >= 2 distinct ints")
  if set(confirm) & set(seeds):
    raise config_lib.ConfigError(
        f"config key 'sweep.confirm_seeds' = {confirm!r} shares seeds with sweep.seeds "
        f"{seeds!r}: confirmation seeds must be fresh")
  if not 0 < s.target_fraction <= 1:
    raise config_lib.ConfigError(
        f"config key 'sweep.target_fraction' = {s.target_fraction} must be in (0, 1]")
  if s.reference not in s.optimizers:
    raise config_lib.ConfigError(f"config key 'sweep.reference' = {s.reference!r} is not in "
                                 f"sweep.optimizers {list(s.optimizers)}")
  if s.select_metric and "/" not in s.select_metric:
    raise config_lib.ConfigError(
        f"config key 'sweep.select_metric' = {s.select_metric!r} must be '<task>/<metric>'")
  if s.select_metric and s.select_metric.split("/")[0] not in config.tasks:
    raise config_lib.ConfigError(f"config key 'sweep.select_metric' = {s.select_metric!r} names a "
                                 f"task not in tasks {list(config.tasks)}")
  for i, item in enumerate(s.overrides):
    # An entry may name an optimizer that is not in this sweep (e.g. a sweep over a subset of
    # the study's optimizers): it then applies to no run.
    if len(item) != 3 or item[0] not in optim.NAMES or not isinstance(item[1], str):
      raise config_lib.ConfigError(
          f"config key 'sweep.overrides': entry {i} = {item!r} must be (known optimizer, "
          f"'section.key', value)")
  if s.ablation:
    if ABLATION_OPTIMIZER not in s.optimizers:
      raise config_lib.ConfigError(f"config key 'sweep.ablation' needs {ABLATION_OPTIMIZER!r} in "
                                   f"sweep.optimizers")
    full = run_config(config, Run(ABLATION_OPTIMIZER, 1.0, seeds[0]))
    for sw in s.ablation:
      if sw not in SWITCHES:
        raise config_lib.ConfigError(f"config key 'sweep.ablation': unknown switch {sw!r}; "
                                     f"known: {', '.join(SWITCHES)}")
      if sw == "update_clip" and not full.optim[sw]:
        raise config_lib.ConfigError(
            "config key 'sweep.ablation': switch 'update_clip' is off in the full "
            f"{ABLATION_OPTIMIZER} configuration (optim.update_clip = 0) and has no value to "
            "turn on; set optim.update_clip > 0 to ablate it")


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  node = cfg
  parts = dotted.split(".")
  for part in parts[:-1]:
    if part not in node:
      raise config_lib.ConfigError(f"config key 'sweep.overrides': unknown key {dotted!r}")
    node = node[part]
  if parts[-1] not in node:
    raise config_lib.ConfigError(f"config key 'sweep.overrides': unknown key {dotted!r}")
  try:
    node[parts[-1]] = value
  except TypeError as e:
    raise config_lib.ConfigError(f"config key 'sweep.overrides': {dotted} = {value!r}: {e}") from None


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """`config` with the run's optimizer, lr, seed, per-optimizer overrides and ablated switch."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.optim.name = run.optimizer
    cfg.seed = int(run.seed)
    for name, key, value in config.sweep.overrides:
      if name == run.optimizer:
        _set(cfg, key, value)
    cfg.optim.lr = float(run.lr)  # after overrides: the grid owns the learning rate
    if run.variant and run.variant != CONFIRM:
      on = run.variant.startswith("with_")
      switch = run.variant.removeprefix("with_" if on else "no_")
      cfg.optim[switch] = on if switch != "update_clip" else 0.0
  return cfg


def grid_runs(config: ml_collections.ConfigDict) -> list[Run]:
  """Every (optimizer, lr, seed) of the grid, optimizer by optimizer."""
  centres = _centres(config)
  return [Run(name, lr, seed)
          for name in config.sweep.optimizers
          for lr in lr_grid(centres[name], config.sweep.lr_points, config.sweep.lr_ratio)
          for seed in config.sweep.seeds]


def ablation_variant(config: ml_collections.ConfigDict, switch: str) -> str:
  """The ablation variant of `switch`: `no_<switch>` if it is on in the full jmtl_adaptive
  configuration, else `with_<switch>`."""
  full = run_config(config, Run(ABLATION_OPTIMIZER, 1.0, config.sweep.seeds[0]))
  return f"no_{switch}" if full.optim[switch] else f"with_{switch}"


def ablation_runs(config: ml_collections.ConfigDict, best_lr: float) -> list[Run]:
  """Each `sweep.ablation` switch toggled alone, at jmtl_adaptive's best lr, every seed."""
  return [Run(ABLATION_OPTIMIZER, best_lr, seed, ablation_variant(config, sw))
          for sw in config.sweep.ablation for seed in config.sweep.seeds]


def confirm_runs(config: ml_collections.ConfigDict,
                 best: Mapping[str, Mapping[str, Any]]) -> list[Run]:
  """Each optimizer with an eligible best lr, at that lr, with every `sweep.confirm_seeds`."""
  return [Run(name, best[name]["lr"], seed, CONFIRM) for name in config.sweep.optimizers
          if best[name]["lr"] is not None for seed in config.sweep.confirm_seeds]


def select_best(records: Sequence[Mapping[str, Any]], optimizer: str) -> dict[str, Any]:
  """Best lr of `optimizer` among grid records: highest mean score over seeds.

  Only learning rates whose runs all finished with a finite score are eligible (a divergence
  disqualifies the lr); ties go to the smaller lr. Returns `{"lr", "score_mean", "score_std",
  "by_lr": {lr: {"mean", "std", "n", "diverged"}}}` with `lr` None when nothing is eligible.
  Std is the sample standard deviation (ddof=1; None for a single seed).
  """
  by_lr: dict[float, list[float]] = {}
  for r in records:
    if r["optimizer"] == optimizer and not r["variant"]:
      by_lr.setdefault(r["lr"], []).append(r["score"] if r["score"] is not None else math.nan)
  table, best = {}, None
  for lr in sorted(by_lr):
    scores = by_lr[lr]
    finite = [s for s in scores if math.isfinite(s)]
    mean, std = mean_std(finite)
    table[format_lr(lr)] = {"mean": mean, "std": std, "n": len(scores),
                            "diverged": len(scores) - len(finite)}
    if len(finite) == len(scores) and (best is None or mean > best[1]):
      best = (lr, mean, std)
  return {"lr": best[0] if best else None, "score_mean": best[1] if best else None,
          "score_std": best[2] if best else None, "by_lr": table}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """(mean, sample std with ddof=1) of `values`; std None for one value (a sample std needs two:
  a single seed has no spread to report), (None, None) for none."""
  if not values:
    return None, None
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


# The run executor and its helpers live in `jmtl.study.runs` (shared with `jmtl study mtl`).
_read_json = runs_lib.read_json
code_digest = runs_lib.code_digest
_drop_stale_metrics = runs_lib.drop_stale_metrics
_check_same_config = runs_lib.check_same_config
_flat = runs_lib.flat
_use_compilation_cache = runs_lib.use_compilation_cache
_clear_compile_caches = runs_lib.clear_compile_caches
_shared_tokenizer = runs_lib.shared_tokenizer


def _execute(run: Run, cfg: ml_collections.ConfigDict, run_dir: pathlib.Path,
             train_fn: TrainFn, code: str = "") -> dict:
  """Trains `run` unless its results exist (`jmtl.study.runs.execute`); returns its record for
  sweep.json (with `other_code` True when a reused run was trained by code other than `code`,
  and `assumed_defaults` the compared keys its config.json lacks)."""
  result = runs_lib.execute(run.relpath, cfg, run_dir, train_fn, code, tag="sweep")
  return {"optimizer": run.optimizer, "variant": run.variant, "lr": run.lr, "seed": run.seed,
          "dir": run.relpath, **result}


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
              train_fn: TrainFn | None = None, share_tokenizer: bool = True,
              check_files: bool = True) -> dict:
  """Runs the grid, selects each optimizer's best lr, runs the ablation and the fresh-seed
  confirmation; writes `<W>/sweep.json`.

  `train_fn(config, run_dir)` defaults to `jmtl.train.loop.train`. With `share_tokenizer` and no
  `data.tokenizer` set, one tokenizer is trained first and used by every run. Returns the
  content of sweep.json.
  """
  import jax
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = config_lib.validate(config, device_count=jax.device_count(), check_files=check_files)
  check_sweep_config(config)
  if train_fn is None:
    from jmtl.train.loop import train as train_fn
    _use_compilation_cache(workdir / "jax_cache")
  if share_tokenizer and not config.data.tokenizer:
    with config.unlocked():
      config.data.tokenizer = _shared_tokenizer(config, workdir)

  code = code_digest()
  runs = grid_runs(config)
  # Check every run's config before the first one starts.
  cfgs = {run: config_lib.validate(run_config(config, run), device_count=jax.device_count(),
                                   check_files=False) for run in runs}
  keys = selection_keys(config)
  result = _summary(config, keys, [], {})
  records = []
  for i, run in enumerate(runs):
    print(f"[sweep] run {i + 1}/{len(runs)}", flush=True)
    records.append(_record(_execute(run, cfgs[run], workdir / run.relpath, train_fn, code),
                           keys))
    result = _summary(config, keys, records, {})
    predictions_lib.write_json_atomic(workdir / "sweep.json", result)

  best = result["best"]
  after = []  # with the lr selection frozen: the ablation, then the fresh-seed confirmation
  if config.sweep.ablation:
    lr = best[ABLATION_OPTIMIZER]["lr"]
    if lr is None:
      print(f"[sweep] no eligible lr for {ABLATION_OPTIMIZER}: ablation skipped", flush=True)
    else:
      after += ablation_runs(config, lr)
  after += confirm_runs(config, best)
  for run in after:
    cfg = config_lib.validate(run_config(config, run), device_count=jax.device_count(),
                              check_files=False)
    records.append(_record(_execute(run, cfg, workdir / run.relpath, train_fn, code), keys))
    result = _summary(config, keys, records, best)
    predictions_lib.write_json_atomic(workdir / "sweep.json", result)
  if result["reused_other_code"]:
    print(f"[sweep] {len(result['reused_other_code'])} reused run(s) were trained by other jmtl "
          "code (listed in sweep.json's reused_other_code)", flush=True)
  return result


def _record(rec: dict, keys: Sequence[str]) -> dict:
  s = score(rec["metrics"], keys) if rec["status"] == "ok" else math.nan
  rec["score"] = s if math.isfinite(s) else None
  return rec


def _summary(config: ml_collections.ConfigDict, keys: Sequence[str], records: list[dict],
             frozen_best: dict) -> dict:
  best = frozen_best or {name: select_best(records, name) for name in config.sweep.optimizers}
  centres = _centres(config)
  return {
      "tasks": list(config.tasks),
      "steps": config.train.steps,
      "eval_every": config.train.eval_every,
      "eval_split": config.data.eval_split,
      "select_keys": list(keys),
      "sweep": config.sweep.to_dict(),
      "grids": {name: lr_grid(centres[name], config.sweep.lr_points, config.sweep.lr_ratio)
                for name in config.sweep.optimizers},
      "best": best,
      "reused_other_code": [r["dir"] for r in records if r.get("other_code")],
      "assumed_defaults": {r["dir"]: r["assumed_defaults"] for r in records
                           if r.get("assumed_defaults")},
      "runs": records,
  }
