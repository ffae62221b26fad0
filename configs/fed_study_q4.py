"""Federated study, arm `q4` (part d): unbiased stochastic 4-bit quantization of each site's
delta, blocks of 256 values (jmtl.federated.compression); FedAvg otherwise.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "q4"
  c.fed.compress = "q4"
  c.study.parts = ("compression",)
  c.study.reference = "fedavg"
  return c
