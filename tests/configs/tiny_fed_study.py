"""Tiny federated study for the smoke test: 2 arms (FedAvg; its centralized baseline) x 2 seeds."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.study.arms = ("tiny_fed_study_fedavg.py", "tiny_fed_study_central.py")
  c.study.seeds = (0, 1)
  c.study.target = 50.0
  return c
