"""Federated study, arm `dp_z1` (part e): DP-FedAvg (McMahan et al. 2018): each site's delta
clipped to norm C = 1, Gaussian noise of std z C = 1 on the sum; epsilon at delta 1e-5 per
round in rounds.jsonl. With only 4 sites the noise is large against the mean update: a
small-federation cost that the report shows, not hides.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "dp_z1"
  c.fed.dp.clip_norm = 1.0
  c.fed.dp.noise_multiplier = 1.0
  c.fed.dp.delta = 1e-5
  c.study.parts = ("dp",)
  c.study.reference = "fedavg"
  return c
