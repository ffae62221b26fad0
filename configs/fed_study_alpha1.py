"""Federated study, arm `alpha1` (part b): FedAvg, label skew Dirichlet alpha 1.
Otherwise configs/fed_study_fedavg.py (alpha 0.3).
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "alpha1"
  c.fed.alpha = 1.0
  c.study.parts = ("noniid",)
  c.study.reference = "fedavg"
  return c
