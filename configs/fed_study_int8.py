"""Federated study, arm `int8` (part d): each site sends its delta as int8 with one float32
scale per block of 256 values (jmtl.federated.compression); FedAvg otherwise.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "int8"
  c.fed.compress = "int8"
  c.study.parts = ("compression",)
  c.study.reference = "fedavg"
  return c
