#!/usr/bin/env python3
"""Train on one GPU node: one `jmtl train` process that drives all of the node's GPUs.

Standard library only; never imports jmtl. --dry-run prints the exact command and runs nothing.

  gpu_node.py --config C --workdir W [--gpus N] [--mem-fraction 0.9] [--env KEY=VALUE ...]
              [--jmtl PATH] [--dry-run] [-- extra jmtl train args, e.g. --config.train.steps=100]

JAX uses every GPU it can see from a single process, so there is no distributed init here.
--gpus N limits it to GPUs 0..N-1 (CUDA_VISIBLE_DEVICES); XLA_PYTHON_CLIENT_MEM_FRACTION is the
share of each GPU's memory JAX preallocates (JAX's own default is 0.75).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402




def parser() -> C.Parser:
  p = C.Parser(prog="gpu_node.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--gpus", type=C.positive, help="use GPUs 0..N-1 (default: all visible)")
  p.add_argument("--mem-fraction", type=C.fraction, default=0.9,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="more environment for jmtl (repeatable)")
  p.add_argument("--jmtl", default="jmtl", help="the jmtl executable (default: jmtl on PATH)")
  p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
  return p


def plan(a, extra: list[str]) -> list:
  env = []
  if a.gpus is not None:
    env.append("CUDA_VISIBLE_DEVICES=" + ",".join(str(i) for i in range(a.gpus)))
  env.append(f"XLA_PYTHON_CLIENT_MEM_FRACTION={a.mem_fraction:g}")
  env += C.parse_env(a.env)
  return [["env", *env, a.jmtl, "train", "--config", a.config, "--workdir", a.workdir, *extra]]


def main(argv: list[str]) -> int:
  own, extra = C.split_extra(argv)
  a = parser().parse_args(own)
  C.check_config(a.config)
  C.check_uri("--workdir", a.workdir)
  return C.run_plan(plan(a, extra), a.dry_run)


if __name__ == "__main__":
  sys.exit(C.main_wrapper(main))
