"""Federated study, arm `deadline` (part f): synchronous FedAvg rounds that drop a site whose
simulated round time exceeds 2.5 s. Without stragglers the slowest site (oci: 10 steps x
0.1 s / speed 0.6 + its transfers and latency) needs about 2 s; a straggler (5x compute)
needs 5 s or more, so the deadline drops the stragglers and shortens every round they slow.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "deadline"
  c.fed.deadline_s = 2.5
  c.study.parts = ("clouds",)
  c.study.reference = "fedavg"
  return c
