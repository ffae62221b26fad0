"""`jmtl study mtl` and `jmtl study federated`: a study of arms x seeds as one resumable command.

Written for the multi-task study (arXiv 2412.06249); the federated study (issue 15) shares every
piece (arms, plan, executor, study.json), with `kind="federated"` where they differ.

The study config (`configs/mtl_study.py`) lists the arms' config files in `study.arms` (paths
relative to its own folder) and the seeds in `study.seeds`. Each arm config (`configs/mtl_*.py`)
is an ordinary training config with `study.arm` (its name), `study.single_task` and
`study.reference` (the arm it is paired with in `jmtl report mtl`). Every arm is trained with
every seed:

* a multi-task arm: one run of its config, `<W>/<arm>/seed<s>/`;
* a single-task arm (`study.single_task`): one run per task t of its `tasks`, with
  `tasks = (t,)` and `data.batch_size` = the rows t has in one batch of the multi-task setting
  (`jmtl.data.pipeline.rows_per_task` of the uniform rates: data.batch_size / len(tasks)),
  for the same `train.steps`, in `<W>/<arm>/<t>/seed<s>/`. Under `data.mixing = "mixed"` the
  multi-task run trains every task in every step with those rows, so each single-task model
  gets the same optimizer steps and the same training examples of its task.

Runs are sequential, seed by seed (every arm at seed 0 first, so paired results come early),
through `jmtl.study.runs.execute`: a finished run is skipped when its config matches, so an
interrupted study resumes where it stopped. Arms that train their own tokenizer
(`data.tokenizer = ''`) share one, trained once over the union of their tasks
(`<W>/tokenizer.json`), so single-task and multi-task models see the same token ids.
`<W>/study.json` holds the arms and every run's status and final metrics.

Command-line overrides (`--config.KEY=VALUE`) of `study.arms`, `study.seeds`,
`study.target` and `study.target_metric` change the study config; every other override applies
to every arm config (e.g. `--config.train.steps=4`).

The federated study (`kind="federated"`, configs/fed_study.py): every arm is a federated config
(`fed.sites`) trained by `jmtl.federated.loop.federated` in `<W>/<arm>/seed<s>/`, except a
centralized arm (`study.centralized`), a plain `jmtl.train.loop.train` run at equal total
compute (`run_config`); `study.reference` names the arm it is paired with (FedAvg), which need
not be single-task; the study config's `study.target` and `study.target_metric` are copied into
every run's config (the report reads them there; a changed target does not invalidate finished runs:
`jmtl.study.runs.check_same_config` ignores it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from collections.abc import Sequence

import ml_collections

from jmtl import config as config_lib
from jmtl.data import pipeline
from jmtl.eval import predictions as predictions_lib
from jmtl.study import runs as runs_lib

# Overrides of these change the study config; all others apply to every arm.
STUDY_KEYS = ("study.arms", "study.seeds", "study.target", "study.target_metric")
KINDS = ("mtl", "federated")
TOKENIZER_KEYS = ("data.vocab_size", "data.tokenizer_kind", "data.lowercase",
                  "data.max_train_examples", "data.dir", "data.split_seed")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: its name (`study.arm`), config file and config (overrides applied)."""

  name: str
  path: str
  config: ml_collections.ConfigDict

  @property
  def single_task(self) -> bool:
    return bool(self.config.study.single_task)

  @property
  def reference(self) -> str:
    return self.config.study.reference

  @property
  def centralized(self) -> bool:
    return bool(self.config.study.centralized)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `task` is the task of a single-task arm's run, "" for a multi-task run."""

  arm: str
  seed: int
  task: str = ""

  @property
  def relpath(self) -> str:
    return f"{self.arm}/{self.task}/seed{self.seed}" if self.task else f"{self.arm}/seed{self.seed}"


def load_arms(study: ml_collections.ConfigDict, study_path: str | os.PathLike[str],
              overrides: Sequence[str] = (),
              apply_overrides=None, kind: str = "mtl") -> list[Arm]:
  """Loads each `study.arms` file (relative to `study_path`'s folder) and applies `overrides`
  (`--config.KEY=VALUE` strings, through `apply_overrides(config, overrides)`) to it. Raises
  ConfigError naming the file or key: a missing file, an arm without `study.arm`, two arms of
  one name, a `study.reference` naming an arm of the study that is not single-task (`kind`
  "mtl"; one that is not in the study is only named on the console: a study may be split over
  workdirs); `kind` "federated": an arm whose config has no `fed.sites`, and a `study.reference`
  naming a centralized arm."""
  if not study.study.arms:
    raise config_lib.ConfigError(f"config key 'study.arms' is empty in {study_path}: list the "
                                 "arms' config files (e.g. 'mtl_scratch.py')")
  folder = pathlib.Path(study_path).resolve().parent
  arms: list[Arm] = []
  for entry in study.study.arms:
    path = folder / entry
    if not path.is_file():
      raise config_lib.ConfigError(f"config key 'study.arms': file not found: {path}")
    cfg = config_lib.load_config_file(path)
    if apply_overrides is not None:
      apply_overrides(cfg, list(overrides))
    name = cfg.get("study", {}).get("arm", "")
    if not name:
      raise config_lib.ConfigError(f"config key 'study.arm' is empty in {path}: an arm config "
                                   "names its arm")
    if kind == "federated" and not cfg.fed.sites:
      what = "the centralized arm matches a federated setting" if cfg.study.centralized else \
          "every arm of a federated study is a federated config"
      raise config_lib.ConfigError(f"config key 'fed.sites' is empty in {path}: {what}")
    if any(a.name == name for a in arms):
      raise config_lib.ConfigError(f"config key 'study.arms': two configs name the arm {name!r} "
                                   f"(study.arm), the second is {path}")
    arms.append(Arm(name, str(path), cfg))
  names = {a.name: a for a in arms}
  for a in arms:
    ref = a.reference
    if ref and ref not in names:
      # A study may be split over several workdirs (`jmtl report mtl --runs W1 W2` joins them).
      print(f"[study] arm {a.name!r}: its reference arm {ref!r} is not in this study; the "
            "report pairs them only if that arm's runs are passed to --runs too", flush=True)
    elif ref and kind == "federated" and names[ref].centralized:
      raise config_lib.ConfigError(f"config key 'study.reference' = {ref!r} in {a.path} is the "
                                   "centralized arm (pair with a federated arm, e.g. FedAvg)")
    elif ref and kind == "mtl" and not names[ref].single_task:
      raise config_lib.ConfigError(f"config key 'study.reference' = {ref!r} in {a.path} is not a "
                                   "single-task arm (study.single_task)")
  return arms


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
  """(overrides of the study config: `STUDY_KEYS`; those of every arm)."""
  study, arm = [], []
  for o in overrides:
    key = o[len("--config."):].split("=", 1)[0]
    (study if key in STUDY_KEYS else arm).append(o)
  return study, arm


def task_rows(config: ml_collections.ConfigDict, task: str) -> int:
  """Rows of `task` in one batch of the multi-task setting `config` (uniform rates)."""
  tasks = list(config.tasks)
  return pipeline.rows_per_task({t: 1.0 / len(tasks) for t in tasks},
                                int(config.data.batch_size))[task]


def runs_of(arm: Arm, seeds: Sequence[int]) -> list[Run]:
  """The runs of `arm`: one per seed, times one per task when single-task."""
  if arm.single_task:
    return [Run(arm.name, int(s), t) for s in seeds for t in arm.config.tasks]
  return [Run(arm.name, int(s)) for s in seeds]


def run_config(arm: Arm, run: Run) -> ml_collections.ConfigDict:
  """`arm.config` with the run's seed; a single-task run keeps only its task, with that task's
  rows of a multi-task batch as its batch; a centralized arm's run (`centralized_config`)."""
  cfg = centralized_config(arm.config) if arm.centralized else copy.deepcopy(arm.config)
  with cfg.unlocked():
    cfg.seed = int(run.seed)
    if run.task:
      cfg.data.batch_size = task_rows(arm.config, run.task)
      cfg.tasks = (run.task,)
  return cfg


def centralized_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The plain training run at equal total compute to the federated `config` (S = number of
  `fed.sites`, H = `fed.local_steps`, R = `fed.rounds`, B = `data.batch_size`, one site's batch
  per local step): the federated run takes S x H x R local steps of B rows; this run takes
  H x R steps of the summed batch S x B rows, so both compute the same S x H x R x B
  forward/backward passes over rows of the same tasks and mixture. Optimizer
  `fed.client_optimizer` at `fed.client_lr` (the local steps' rule; `optim.*` otherwise, as the
  clients get it); evaluation every `fed.eval_every` x H steps (0: only at the end),
  checkpoints every `fed.checkpoint_every` x H, train lines every H; no stragglers (a
  simulation of sites). `fed.sites` is emptied; `fed.rounds` / `fed.local_steps` stay, so
  the report maps step s to round ceil(s / H). Differences left: the centralized run trains
  on every training row (the federated one holds `fed.holdout` of each site's rows out), in
  one data order.
  ConfigError when `config` has no `fed.sites`."""
  fed = config.fed
  if not fed.sites:
    raise config_lib.ConfigError("config key 'study.centralized' needs the federated setting it "
                                 "matches (fed.sites is empty)")
  cfg = copy.deepcopy(config)
  H, R, S = int(fed.local_steps), int(fed.rounds), len(fed.sites)
  with cfg.unlocked():
    cfg.train.steps = H * R
    cfg.data.batch_size = S * int(config.data.batch_size)
    cfg.optim.name, cfg.optim.lr = fed.client_optimizer, float(fed.client_lr)
    cfg.train.eval_every = H * int(fed.eval_every)
    cfg.train.checkpoint_every = H * int(fed.checkpoint_every)
    cfg.train.log_every = H
    cfg.fed.sites = ()
    cfg.fed.faults.stragglers = 0.0
  return cfg


def plan(study: ml_collections.ConfigDict, arms: Sequence[Arm]) -> list[tuple[Run, ml_collections.ConfigDict]]:
  """Every (run, config) of the study, seed by seed, in arm order, with the study config's
  `study.target`; configs are validated (keys, values, registries; not files or devices)."""
  seeds = list(study.study.seeds)
  out = []
  for seed in seeds:
    for arm in arms:
      for run in runs_of(arm, [seed]):
        cfg = run_config(arm, run)
        with cfg.unlocked():
          cfg.study.target = float(study.study.target)
          cfg.study.target_metric = str(study.study.target_metric)
        out.append((run, config_lib.validate(cfg, check_files=False)))
  return out


def default_train(config: ml_collections.ConfigDict, run_dir: pathlib.Path):
  """`jmtl.federated.loop.federated` for a federated config (`fed.sites`), else
  `jmtl.train.loop.train`; both write config.json, metrics.jsonl and eval.json."""
  if config.fed.sites:
    from jmtl.federated.loop import federated  # noqa: PLC0415 (imports jax)
    return federated(config, run_dir)
  from jmtl.train.loop import train  # noqa: PLC0415
  return train(config, run_dir)


def _tokenizer(arms: Sequence[Arm], workdir: pathlib.Path) -> str | None:
  """One tokenizer over the union of the tasks of the arms that train their own; None when
  none does. Those arms must agree on the keys a tokenizer depends on (ConfigError)."""
  own = [a for a in arms if not a.config.data.tokenizer]
  if not own:
    return None
  flat0 = runs_lib.flat(own[0].config.to_dict())
  for a in own[1:]:
    f = runs_lib.flat(a.config.to_dict())
    for k in TOKENIZER_KEYS:
      if f[k] != flat0[k]:
        raise config_lib.ConfigError(
            f"config key {k!r}: arms {own[0].name!r} and {a.name!r} share the study's trained "
            f"tokenizer but differ ({flat0[k]!r} vs {f[k]!r})")
  tasks = []
  for a in own:
    tasks += [t for t in a.config.tasks if t not in tasks]
  cfg = copy.deepcopy(own[0].config)
  with cfg.unlocked():
    cfg.tasks = tuple(tasks)
  return runs_lib.shared_tokenizer(cfg, workdir)


def run_study(study: ml_collections.ConfigDict, arms: Sequence[Arm],
              workdir: str | os.PathLike[str], *, train_fn: runs_lib.TrainFn | None = None) -> dict:
  """Trains every run of `plan(study, arms)` that has no results yet, in order; writes
  `<W>/study.json` after each run and returns its content.

  `train_fn(config, run_dir)` defaults to `default_train` (with a JAX compilation cache in
  `<W>/jax_cache` unless one is set). Raises ValueError when a finished run directory holds
  another config (`jmtl.study.runs.check_same_config`).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runs = plan(study, arms)  # every config checked before the first run starts
  if train_fn is None:
    train_fn = default_train
    runs_lib.use_compilation_cache(workdir / "jax_cache")
  tokenizer = _tokenizer(arms, workdir)
  code = runs_lib.code_digest()
  records = []
  result = _summary(study, arms, records)
  for i, (run, cfg) in enumerate(runs):
    if not cfg.data.tokenizer and tokenizer:
      with cfg.unlocked():
        cfg.data.tokenizer = tokenizer
    print(f"[study] run {i + 1}/{len(runs)}", flush=True)
    rec = runs_lib.execute(run.relpath, cfg, workdir / run.relpath, train_fn, code, tag="study")
    records.append({"arm": run.arm, "task": run.task, "seed": run.seed, "dir": run.relpath,
                    **rec})
    result = _summary(study, arms, records)
    predictions_lib.write_json_atomic(workdir / "study.json", result)
  if result["reused_other_code"]:
    print(f"[study] {len(result['reused_other_code'])} reused run(s) were trained by other jmtl "
          "code (listed in study.json's reused_other_code)", flush=True)
  return result


def _arm_summary(a: Arm) -> dict:
  out = {"config": a.path, "single_task": a.single_task, "reference": a.reference,
         "tasks": list(a.config.tasks)}
  if not a.config.fed.sites:
    return {**out, "steps": a.config.train.steps}
  fed = a.config.fed  # a federated study's arm: its rounds x local steps
  return {**out, "centralized": a.centralized, "parts": list(a.config.study.parts),
          "rounds": fed.rounds, "local_steps": fed.local_steps,
          "steps": fed.rounds * fed.local_steps if a.centralized else None}


def _summary(study: ml_collections.ConfigDict, arms: Sequence[Arm], records: list[dict]) -> dict:
  return {
      "seeds": list(study.study.seeds),
      "target": float(study.study.target),
      "target_metric": str(study.study.target_metric),
      "arms": {a.name: _arm_summary(a) for a in arms},
      "reused_other_code": [r["dir"] for r in records if r.get("other_code")],
      "assumed_defaults": {r["dir"]: r["assumed_defaults"] for r in records
                           if r.get("assumed_defaults")},
      "runs": records,
  }
