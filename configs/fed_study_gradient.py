"""Federated study, arm `gradient` (part c): gradient-based aggregation: site weights
examples x exp(cos(update, mean update) / T), T = 1 (jmtl.federated.aggregation). Server sgd
lr 1 as FedAvg.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "gradient"
  c.fed.aggregator = "gradient"
  c.fed.temperature = 1.0
  c.study.parts = ("aggregation",)
  c.study.reference = "fedavg"
  return c
