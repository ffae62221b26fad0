"""Federated study, arm `diloco` (part c): DiLoCo's outer step (Douillard et al. 2023): Nesterov
momentum 0.9 at lr 0.7 on the averaged delta; inner AdamW as in every arm.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "diloco"
  c.fed.server_optimizer = "nesterov"
  c.fed.server_lr = 0.7
  c.fed.server_momentum = 0.9
  c.study.parts = ("aggregation",)
  c.study.reference = "fedavg"
  return c
