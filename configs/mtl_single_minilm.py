"""Multi-task study, arm `single_minilm`: one fine-tuned MiniLM-L6 per task.

The pretrained trunk of configs/mtl_minilm.py, fine-tuned separately on each of the seven
tasks for the same 240 steps of that task's 8 rows (the BERT-family single-task baseline).
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("mtl_minilm.py"))
  c.study.arm = "single_minilm"
  c.study.reference = ""
  c.study.single_task = True
  return c
