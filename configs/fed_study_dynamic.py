"""Federated study, arm `dynamic` (part c): dynamic weighted aggregation (the third paper's
claim, arXiv 2410.19130: it converges faster than FedAvg): site weights examples x exp((loss
and improvement) / T), T = 1 (rules in jmtl.federated.aggregation). Server sgd lr 1 as FedAvg.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "dynamic"
  c.fed.aggregator = "dynamic"
  c.fed.temperature = 1.0
  c.study.parts = ("aggregation",)
  c.study.reference = "fedavg"
  return c
