#!/usr/bin/env python3
"""Train on N Slurm nodes x G GPUs: one `jmtl train` process per node, distributed init on.

Standard library only; never imports jmtl. Writes a batch script and submits it with sbatch;
--dry-run prints the script (and, as its last line, a comment with the sbatch command) and
runs nothing, so `slurm.py ... --dry-run > job.sbatch` gives a script to edit and submit.

  slurm.py --nodes N --gpus-per-node G --config C --workdir W [--job-name jmtl] [--time T]
           [--partition P] [--account A] [--cpus-per-task K] [--signal-before 120] [--requeue]
           [--chdir DIR] [--venv DIR]
           [--mem-fraction 0.9] [--env KEY=VALUE ...] [--script FILE] [--dry-run]
           [-- extra jmtl train args]

`srun` starts one task per node; `--config.dist.initialize=true` makes jmtl call
`jax.distributed.initialize()`, whose Slurm detection reads the coordinator (first node of the
step), the process count and the process id from SLURM_* variables. That detection would also
pin each process to the single GPU numbered SLURM_LOCALID; the script exports
JAX_LOCAL_DEVICE_IDS=0,...,G-1 so that the one process of each node drives all G GPUs.

Time limits and preemption: Slurm sends SIGTERM --signal-before seconds before --time runs out
(and at preemption); jmtl then saves a checkpoint of the current step and exits 143. Submitting
the same script again (or --requeue, for preemption) resumes from that checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402




def parser() -> C.Parser:
  p = C.Parser(prog="slurm.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--nodes", type=C.positive, required=True)
  p.add_argument("--gpus-per-node", type=C.positive, required=True)
  p.add_argument("--config", required=True, help="config path (relative to --chdir)")
  p.add_argument("--workdir", required=True, help="a directory every node can reach")
  p.add_argument("--job-name", default="jmtl")
  p.add_argument("--time", help="wall-clock limit, e.g. 04:00:00")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--cpus-per-task", type=C.positive,
                 help="CPUs of the one task per node (default: all of the node's: --exclusive)")
  p.add_argument("--signal-before", type=C.nonneg, default=120, metavar="S",
                 help="SIGTERM jmtl S seconds before the time limit, so it saves a checkpoint "
                 "and exits (#SBATCH --signal=TERM@S; default 120; 0 = none)")
  p.add_argument("--requeue", action="store_true",
                 help="#SBATCH --requeue: a preempted job is queued again and resumes from the "
                 "latest checkpoint in --workdir")
  p.add_argument("--chdir", default=str(C.REPO_ROOT),
                 help="working directory of the job (default: this checkout)")
  p.add_argument("--venv", help="virtualenv whose bin/jmtl to run (default: jmtl on PATH)")
  p.add_argument("--mem-fraction", type=C.fraction, default=0.9,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="more environment for jmtl (repeatable)")
  p.add_argument("--script", help="where to write the batch script (default: ./<job-name>.sbatch)")
  p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
  return p


def batch_script(a, extra: list[str]) -> str:
  jmtl = os.path.join(a.venv, "bin", "jmtl") if a.venv else "jmtl"
  sb = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", "--ntasks-per-node=1",
        f"--gpus-per-node={a.gpus_per_node}"]
  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05), so it is given to both.
  sb.append(f"--cpus-per-task={a.cpus_per_task}" if a.cpus_per_task else "--exclusive")
  if a.signal_before:
    sb.append(f"--signal=TERM@{a.signal_before}")
  if a.requeue:
    sb.append("--requeue")
  if a.time:
    sb.append(f"--time={a.time}")
  if a.partition:
    sb.append(f"--partition={a.partition}")
  if a.account:
    sb.append(f"--account={a.account}")
  sb += [f"--output={a.job_name}-%j.out", f"--chdir={a.chdir}"]
  env = [f"JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(a.gpus_per_node))}",
         f"XLA_PYTHON_CLIENT_MEM_FRACTION={a.mem_fraction:g}", *C.parse_env(a.env)]
  train = [jmtl, "train", "--config", a.config, "--workdir", a.workdir,
           "--config.dist.initialize=true", *extra]
  return "\n".join([
      "#!/bin/bash",
      *(f"#SBATCH {s}" for s in sb),
      "set -euo pipefail",
      "# One process per node drives all of its GPUs (JAX's Slurm detection alone would give it",
      "# only GPU SLURM_LOCALID); coordinator, process count and id come from SLURM_* variables.",
      *(f"export {k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in env)),
      "# The one task of a node gets all the CPUs the job holds there (srun does not inherit",
      "# sbatch's --cpus-per-task).",
      "srun --kill-on-bad-exit=1 --cpus-per-task="
      + (str(a.cpus_per_task) if a.cpus_per_task else '"$SLURM_CPUS_ON_NODE"')
      + f" {shlex.join(train)}",
      "",
  ])


def main(argv: list[str]) -> int:
  own, extra = C.split_extra(argv)
  a = parser().parse_args(own)
  C.check_config(a.config, a.chdir)
  C.check_uri("--workdir", a.workdir)
  text = batch_script(a, extra)
  path = a.script or f"{a.job_name}.sbatch"
  if a.dry_run:
    sys.stdout.write(text)
    print(f"# submit with: {shlex.join(['sbatch', path])}")
    return 0
  with open(path, "w") as f:
    f.write(text)
  print(f"[launch] wrote {path}", flush=True)
  return C.run_plan([["sbatch", path]], dry_run=False)


if __name__ == "__main__":
  sys.exit(C.main_wrapper(main))
