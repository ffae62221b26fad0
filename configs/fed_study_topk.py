"""Federated study, arm `topk` (part d): top-1 % sparsification with error feedback, the kept
values in int8 (`topk:0.01+int8`; jmtl.federated.compression); FedAvg otherwise.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "topk"
  c.fed.compress = "topk:0.01+int8"
  c.study.parts = ("compression",)
  c.study.reference = "fedavg"
  return c
