"""Tiny single-task arm of the smoke study: one model per task of tests/configs/tiny_mtl_multi.py,
each with that task's 8 rows per step for the same steps."""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("tiny_mtl_multi.py"))
  c.mtl.weighting = "equal"
  c.study.arm = "single"
  c.study.reference = ""
  c.study.single_task = True
  return c
