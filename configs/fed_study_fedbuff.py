"""Federated study, arm `fedbuff` (parts c and f): asynchronous FedBuff (Nguyen et al. 2022):
every site trains concurrently, the server steps when K = 2 updates have arrived (weights
staleness-scaled; jmtl.federated.asynchronous). Equal total compute: 120 server steps of K = 2
site jobs = 240 jobs of H = 10 local steps, as 60 synchronous rounds of 4 sites; evaluation
every 10 server steps (every 20 jobs, as every 5 synchronous rounds). Its `round` counts
server steps: compare it with the synchronous arms in simulated seconds.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("fed_study_fedavg.py"))
  c.study.arm = "fedbuff"
  c.fed.mode = "async"
  c.fed.buffer_size = 2
  c.fed.rounds = 120
  c.fed.eval_every = 10
  c.fed.checkpoint_every = 10
  c.study.parts = ("aggregation", "clouds")
  c.study.reference = "fedavg"
  return c
