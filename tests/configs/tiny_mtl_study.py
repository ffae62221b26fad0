"""Tiny multi-task study for the smoke test: 2 arms x 2 seeds (6 runs of 4 steps)."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.study.arms = ("tiny_mtl_multi.py", "tiny_mtl_single.py")
  c.study.seeds = (0, 1)
  return c
