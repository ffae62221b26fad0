"""The study configs: valid, a fair grid (>= 4 log-spaced rates per optimizer, >= 3 seeds)."""

import pathlib

import numpy as np
import pytest

from jmtl import config as config_lib
from jmtl.study import sweep as sweep_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["optim_study.py", "optim_study_long.py",
                                  "optim_study_long_linear.py"])
def test_optim_study_config_is_valid_and_fair(name):
  cfg = config_lib.validate(config_lib.load_config_file(CONFIGS / name), device_count=1,
                            check_files=False)
  sweep_lib.check_sweep_config(cfg)
  runs = sweep_lib.grid_runs(cfg)
  assert len(runs) == len(cfg.sweep.optimizers) * cfg.sweep.lr_points * len(cfg.sweep.seeds)
  assert cfg.sweep.lr_points >= 4 and len(cfg.sweep.seeds) >= 3
  for name in cfg.sweep.optimizers:
    lrs = sorted({r.lr for r in runs if r.optimizer == name})
    ratios = np.diff(np.log(lrs))
    np.testing.assert_allclose(ratios, np.log(cfg.sweep.lr_ratio), rtol=2e-3)
  # Same model, data and budget for everyone: only optim.* (and seed) differ between runs.
  base = config_lib.to_json(cfg)
  for run in runs[::7]:
    rc = sweep_lib.run_config(cfg, run).to_dict()
    rc.pop("optim"), rc.pop("seed")
    ref = cfg.to_dict()
    ref.pop("optim"), ref.pop("seed")
    assert rc == ref
  assert base == config_lib.to_json(cfg)  # run_config does not mutate the study config


def test_long_study_changes_only_the_budget_of_the_study():
  """The follow-up keeps model, tasks, data and shared optimizer settings of the 48-step study."""
  short = config_lib.load_config_file(CONFIGS / "optim_study.py").to_dict()
  long = config_lib.load_config_file(CONFIGS / "optim_study_long.py").to_dict()
  changed = {f"{sec}.{k}" for sec in short if isinstance(short[sec], dict)
             for k in short[sec] if short[sec][k] != long[sec][k]}
  assert changed == {"train.steps", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "optim.warmup_steps", "data.max_eval_examples",
                     "sweep.optimizers", "sweep.lr_centres", "sweep.lr_points", "sweep.lr_ratio",
                     "sweep.ablation", "sweep.confirm_seeds"}
  assert long["model"] == short["model"] and long["tasks"] == short["tasks"]


def test_linear_variant_changes_only_jmtl_adaptive_schedule():
  long = config_lib.load_config_file(CONFIGS / "optim_study_long.py")
  lin = config_lib.load_config_file(CONFIGS / "optim_study_long_linear.py")
  a, b = long.to_dict(), lin.to_dict()
  changed = {f"{sec}.{k}" for sec in a if isinstance(a[sec], dict) for k in a[sec]
             if a[sec][k] != b[sec][k]}
  assert changed == {"sweep.overrides", "sweep.confirm_seeds"}
  for name in ("adamw", "jmtl_adaptive"):
    run = sweep_lib.Run(name, 3e-4, 0)
    assert sweep_lib.run_config(lin, run).optim.schedule == "linear"
  assert sweep_lib.run_config(long, sweep_lib.Run("jmtl_adaptive", 3e-4, 0)).optim.schedule == \
      "constant"
  # AdamW's runs are the same runs (the sweep section does not change a run).
  adamw = [sweep_lib.run_config(c, sweep_lib.Run("adamw", 3e-4, 0)).to_dict() for c in (long, lin)]
  for a in adamw:
    del a["sweep"]
  assert adamw[0] == adamw[1]
