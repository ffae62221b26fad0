"""Federated study, arm `iid` (part b): FedAvg with each task's rows split IID over the 4 sites
(Dirichlet alpha -> infinity). Otherwise configs/fed_study_fedavg.py.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "iid"
  c.fed.partition = "iid"
  c.study.parts = ("noniid",)
  c.study.reference = "fedavg"
  return c
