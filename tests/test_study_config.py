"""The study config: valid, a fair grid (>= 4 log-spaced rates per optimizer, >= 3 seeds)."""

import pathlib

import numpy as np

from jmtl import config as config_lib
from jmtl.study import sweep as sweep_lib

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "optim_study.py"


def test_optim_study_config_is_valid_and_fair():
  cfg = config_lib.validate(config_lib.load_config_file(CONFIG), device_count=1,
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
