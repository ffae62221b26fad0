"""Federated study, arm `central` (part a): the centralized baseline at equal total compute.

The setting of configs/fed_study_fedavg.py without federation: `study.centralized` makes
`jmtl study federated` train one model for fed.rounds x fed.local_steps = 600 steps of the summed
batch (4 sites x 16 = 64 rows: 32 SST-2 + 32 MRPC), client AdamW at lr 2e-3, on every training
row (no site hold-out); the same 38,400 rows of forward and backward passes as the federated
run (`jmtl.study.mtl.centralized_config`). Paired with `fedavg`.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "central"
  c.study.centralized = True
  c.study.parts = ("central",)
  c.study.reference = "fedavg"
  return c
