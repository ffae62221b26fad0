"""Federated study, arm `dp_z01` (part e): DP-FedAvg with C = 1 and noise multiplier z = 0.1
(a much larger epsilon than `dp_z1`). FedAvg otherwise.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "dp_z01"
  c.fed.dp.clip_norm = 1.0
  c.fed.dp.noise_multiplier = 0.1
  c.fed.dp.delta = 1e-5
  c.study.parts = ("dp",)
  c.study.reference = "fedavg"
  return c
