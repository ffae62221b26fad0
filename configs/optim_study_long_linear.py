"""The long optimizer study with `jmtl_adaptive` on AdamW's linear decay (a variant).

`configs/optim_study_long.py` runs `jmtl_adaptive` at a constant base rate under its own
metric-driven schedule; its dev curve trailed AdamW's in the middle of training. This variant
changes only that: `jmtl_adaptive` gets the study's warm-up + linear decay to 0 too, with its
metric schedule on top (lr_t = linear(t) * scale_t * late(t)). AdamW's runs are the same runs.
No confirmation seeds. See docs/results/optim_study_long/linear_decay/.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("optim_study_long.py"))
  c.sweep.overrides = (("paper_adaptive", "optim.schedule", "constant"),)
  c.sweep.confirm_seeds = ()
  return c
