"""Federated study, arm `alpha01` (part b): FedAvg, label skew Dirichlet alpha 0.1 (most
sites hold few classes of each task). Otherwise configs/fed_study_fedavg.py (alpha 0.3).
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "alpha01"
  c.fed.alpha = 0.1
  c.study.parts = ("noniid",)
  c.study.reference = "fedavg"
  return c
