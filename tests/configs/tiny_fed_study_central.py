"""Tiny centralized arm of the federated smoke study: the FedAvg arm's setting as one plain run
of 2 x 2 steps of the 4 x 8 = 32-row summed batch (`study.centralized`)."""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("tiny_fed_study_fedavg.py"))
  c.study.arm = "central"
  c.study.centralized = True
  c.study.parts = ("central",)
  c.study.reference = "fedavg"
  return c
