"""Multi-task study, arm `single_scratch`: one single-task model per task, from scratch.

The trunk, heads and training setting of configs/mtl_scratch.py; each of the seven tasks gets
its own model, trained for the same 240 steps on that task's 8 rows per step (the rows it has
in a multi-task batch), so it sees the same 1,920 training examples as in the multi-task run.
`jmtl study mtl` expands this arm into one run per task (`study.single_task`).
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("mtl_scratch.py"))
  c.study.arm = "single_scratch"
  c.study.reference = ""
  c.study.single_task = True
  return c
