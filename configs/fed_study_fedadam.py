"""Federated study, arm `fedadam` (part c): FedAdam (Reddi et al. 2021, "Adaptive Federated
Optimization"): the server applies Adam to the averaged delta, lr 1e-2 (the paper's grid
holds 1e-2; not tuned here), betas and eps of optim.*.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "fedadam"
  c.fed.server_optimizer = "adam"
  c.fed.server_lr = 1e-2
  c.study.parts = ("aggregation",)
  c.study.reference = "fedavg"
  return c
