"""launch/ scripts: the commands --dry-run prints, argument errors, and that dry runs run nothing.

Every script runs in a subprocess with fake `gcloud`, `gsutil`, `sbatch`, `srun` and `jmtl`
first on PATH; each fake appends its argv (JSON) to a marker file. No jax import, no network.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
FAKES = ("gcloud", "gsutil", "sbatch", "srun", "jmtl")


@pytest.fixture()
def fake_bin(tmp_path):
  """A PATH dir of fake tools that log their argv; `gcloud ... describe` prints ACTIVE."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "called.jsonl"
  for name in FAKES:
    p = bin_dir / name
    p.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['LAUNCH_MARKER'], 'a') as f:\n"
        "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
        "if 'describe' in sys.argv: print('ACTIVE')\n")
    p.chmod(0o755)
  return bin_dir, marker


def launch(fake_bin, script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
  bin_dir, marker = fake_bin
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LAUNCH_MARKER=str(marker))
  return subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True,
                        text=True, env=env, cwd=cwd or bin_dir.parent, timeout=60)


def dry(fake_bin, script: str, *args: str, cwd=None) -> list[list[str]]:
  """Runs with --dry-run, checks nothing was called, returns the printed commands split into words."""
  args = list(args)
  args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
  r = launch(fake_bin, script, *args, cwd=cwd)
  assert r.returncode == 0, r.stderr
  assert not fake_bin[1].exists(), f"dry run called: {fake_bin[1].read_text()}"
  return [shlex.split(line, comments=True) for line in r.stdout.splitlines()]


def remote(cmd: list[str]) -> str:
  """The --command of a gcloud ssh line, checked to be valid bash."""
  script = cmd[cmd.index("--command") + 1]
  r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
  assert r.returncode == 0, (script, r.stderr)
  return script


def called(fake_bin) -> list[list[str]]:
  marker = fake_bin[1]
  return [json.loads(l) for l in marker.read_text().splitlines()] if marker.exists() else []


# ---------------------------------------------------------------------------------- tpu_vm
def test_create_spot_single_slice_then_polls_until_active(fake_bin):
  create, poll = dry(fake_bin, "tpu_vm.py", "create", "--name", "jmtl-a", "--zone", "us-west4-a",
                     "--accelerator-type", "v5litepod-16", "--spot")
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "jmtl-a"]
  assert {"--zone=us-west4-a", "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=jmtl-a", "--spot"} <= set(create)
  assert not {"--reserved", "--node-count=1"} & set(create)
  assert poll[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "jmtl-a"]
  assert "--format=value(state.state)" in poll


def test_create_reserved_multislice(fake_bin):
  (create, _) = dry(fake_bin, "tpu_vm.py", "create", "--name", "ms", "--zone", "us-east5-b",
                    "--accelerator-type", "v5litepod-256", "--runtime-version", "v2-alpha-tpuv5-lite",
                    "--num-slices", "2", "--reserved", "--project", "p1", "--", "--network=mtu9k")
  assert {"--node-count=2", "--node-prefix=ms", "--reserved", "--project=p1"} <= set(create)
  assert not any(w.startswith("--node-id") for w in create) and "--spot" not in create
  assert create[-1] == "--network=mtu9k"


def test_create_tiers_and_no_wait(fake_bin):
  base = ["create", "--name", "t", "--zone", "z", "--accelerator-type", "v6e-8", "--no-wait"]
  (on_demand,) = dry(fake_bin, "tpu_vm.py", *base)
  assert not {"--spot", "--reserved", "--best-effort"} & set(on_demand)
  assert "--runtime-version=v2-alpha-tpuv6e" in on_demand
  (best,) = dry(fake_bin, "tpu_vm.py", *base, "--best-effort")
  assert best[:3] == ["gcloud", "alpha", "compute"] and best[-1] == "--best-effort"
  r = launch(fake_bin, "tpu_vm.py", *base, "--spot", "--reserved", "--dry-run")
  assert r.returncode != 0 and "not allowed" in r.stderr


def test_setup_ships_head_commit_and_pinned_jax(fake_bin):
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  jax_req = next(d for d in deps if re.match(r"jax\b(?!lib)", d)).replace(" ", "")
  jax_tpu = jax_req.replace("jax", "jax[tpu]", 1)
  archive, scp, env, project = dry(fake_bin, "tpu_vm.py", "setup", "--name", "n", "--zone", "z")
  assert archive[:2] == ["git", "-C"] and archive[3] == "archive" and archive[-1] == head
  tarball = next(w for w in archive if w.endswith(".tar.gz"))
  assert head in tarball
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == tarball and scp[6] == f"n:{os.path.basename(tarball)}" and "--worker=all" in scp
  for cmd in (env, project):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n"] and "--worker=all" in cmd
  env_s, project_s = remote(env), remote(project)
  assert "venv" in env_s and f'"{jax_tpu}"' in env_s
  assert head in project_s and f'-e ".[tfds,demo]" "{jax_tpu}" gcsfs' in project_s


def test_setup_multislice_runs_on_every_slice(fake_bin):
  cmds = dry(fake_bin, "tpu_vm.py", "setup", "--name", "ms", "--zone", "z", "--num-slices", "2")
  ssh_nodes = [c[5] for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert ssh_nodes == ["ms-0", "ms-1", "ms-0", "ms-1"]


def test_run_multislice_initializes_distributed_and_dcn_axis(fake_bin):
  cmds = dry(fake_bin, "tpu_vm.py", "run", "--name", "ms", "--zone", "z", "--num-slices", "2",
             "--config", "configs/quickstart.py", "--workdir", "gs://b/run", "--env", "A=1",
             "--", "--config.train.steps=100", "--config.tasks=('a','b')")
  assert [c[5] for c in cmds] == ["ms-0", "ms-1"]
  for c in cmds:
    assert "--worker=all" in c
    s = remote(c)
    train = s[s.index("nohup "):]
    words = shlex.split(train.split(">>")[0])
    assert words[:4] == ["nohup", "env", "A=1", "~/jmtl-venv/bin/jmtl"]
    assert words[4:] == ["train", "--config", "configs/quickstart.py", "--workdir", "gs://b/run",
                         "--config.dist.initialize=true", "--config.mesh.dcn_data=2",
                         "--config.train.steps=100", "--config.tasks=('a','b')"]
    assert ">> ~/jmtl-logs/train.log 2>&1 < /dev/null &" in s


def test_run_single_slice_has_no_dcn_axis(fake_bin):
  (cmd,) = dry(fake_bin, "tpu_vm.py", "run", "--name", "one", "--zone", "z",
               "--config", "configs/quickstart.py", "--workdir", "gs://b/r")
  assert cmd[5] == "one"
  s = remote(cmd)
  assert "--config.dist.initialize=true" in s and "dcn_data" not in s


def test_logs_copy_back_delete(fake_bin):
  (logs,) = dry(fake_bin, "tpu_vm.py", "logs", "--name", "ms", "--zone", "z", "--num-slices", "2",
                "--slice", "1", "--worker", "3", "--follow")
  assert logs[5] == "ms-1" and "--worker=3" in logs
  assert remote(logs) == "tail -n 100 -F ~/jmtl-logs/train.log"
  mkdir, rsync = dry(fake_bin, "tpu_vm.py", "copy-back", "--workdir", "gs://b/run", "--to", "runs/r")
  assert mkdir == ["mkdir", "-p", "runs/r"]
  assert rsync == ["gcloud", "storage", "rsync", "--recursive", "gs://b/run", "runs/r"]
  (delete,) = dry(fake_bin, "tpu_vm.py", "delete", "--name", "ms", "--zone", "z",
                  "--num-slices", "2", "--force")
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ms"]
  assert {"--force", "--quiet", "--zone=z"} <= set(delete)
  (keep_nodes,) = dry(fake_bin, "tpu_vm.py", "delete", "--name", "ms", "--zone", "z")
  assert "--force" not in keep_nodes and "--quiet" in keep_nodes


def test_without_dry_run_runs_exactly_the_printed_commands(fake_bin):
  args = ["create", "--name", "x", "--zone", "z", "--accelerator-type", "v4-8", "--spot"]
  printed = dry(fake_bin, "tpu_vm.py", *args)
  r = launch(fake_bin, "tpu_vm.py", *args)
  assert r.returncode == 0, r.stderr
  assert called(fake_bin) == printed  # the fake describe printed ACTIVE: one poll
  assert "ACTIVE" in r.stdout


# ------------------------------------------------------------------------------- gpu, slurm
def test_gpu_node(fake_bin):
  (cmd,) = dry(fake_bin, "gpu_node.py", "--config", "configs/quickstart.py", "--workdir", "runs/q",
               "--gpus", "4", "--", "--config.train.steps=5", cwd=ROOT)
  assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                 "jmtl", "train", "--config", "configs/quickstart.py", "--workdir", "runs/q",
                 "--config.train.steps=5"]
  (all_gpus,) = dry(fake_bin, "gpu_node.py", "--config", "configs/quickstart.py", "--workdir", "w",
                    "--mem-fraction", "0.5", cwd=ROOT)
  assert not any(w.startswith("CUDA_VISIBLE_DEVICES") for w in all_gpus)
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in all_gpus
  c = fake_bin[0].parent / "c.py"
  c.write_text("")
  r = launch(fake_bin, "gpu_node.py", "--config", "c.py", "--workdir", "w")
  assert r.returncode == 0
  assert called(fake_bin) == [["jmtl", "train", "--config", "c.py", "--workdir", "w"]]


def test_slurm_script(fake_bin, tmp_path):
  chdir = tmp_path / "shared" / "jmtl"  # the job's directory, as the login node sees it
  (chdir / "configs").mkdir(parents=True)
  (chdir / "configs" / "quickstart.py").write_text("")
  args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "configs/quickstart.py",
          "--workdir", "/shared/runs/q", "--time", "04:00:00", "--partition", "gpu",
          "--chdir", str(chdir), "--", "--config.train.steps=1000"]
  r = launch(fake_bin, "slurm.py", *args[:-2], "--dry-run", *args[-2:])
  assert r.returncode == 0, r.stderr
  assert not fake_bin[1].exists() and not list(tmp_path.glob("*.sbatch"))
  text = r.stdout
  assert text.startswith("#!/bin/bash\n")
  header = dict(re.findall(r"^#SBATCH (--[\w-]+)=(\S+)$", text, re.M))
  assert header == {"--job-name": "jmtl", "--nodes": "2", "--ntasks-per-node": "1",
                    "--gpus-per-node": "8", "--time": "04:00:00", "--partition": "gpu",
                    "--output": "jmtl-%j.out", "--chdir": str(chdir),
                    "--signal": "TERM@120"}
  assert "#SBATCH --exclusive" in text and "#SBATCH --requeue" not in text
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in text
  (srun,) = [l for l in text.splitlines() if l.startswith("srun ")]
  assert shlex.split(srun)[2] == "--cpus-per-task=$SLURM_CPUS_ON_NODE"
  assert shlex.split(srun)[3:] == ["jmtl", "train", "--config", "configs/quickstart.py",
                                   "--workdir", "/shared/runs/q", "--config.dist.initialize=true",
                                   "--config.train.steps=1000"]
  assert text.rstrip().splitlines()[-1] == "# submit with: sbatch jmtl.sbatch"
  assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
  # Without --dry-run: the file is written and sbatch is called on it.
  r = launch(fake_bin, "slurm.py", *args[:-2], "--script", "job.sbatch")
  assert r.returncode == 0, r.stderr
  assert called(fake_bin) == [["sbatch", "job.sbatch"]]
  assert (tmp_path / "job.sbatch").read_text() == "\n".join(text.splitlines()[:-1]).replace(
      " --config.train.steps=1000", "") + "\n"


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("script,args,flag", [
    ("tpu_vm.py", ["create", "--name", "n", "--accelerator-type", "v4-8"], "--zone"),
    ("tpu_vm.py", ["run", "--name", "n", "--zone", "z", "--config", "c"], "--workdir"),
    ("tpu_vm.py", ["setup", "--zone", "z"], "--name"),
    ("tpu_vm.py", [], "{create"),
    ("gpu_node.py", ["--config", "c"], "--workdir"),
    ("slurm.py", ["--nodes", "2", "--config", "c", "--workdir", "w"], "--gpus-per-node"),
])
def test_missing_required_argument_is_one_clear_line(fake_bin, script, args, flag):
  r = launch(fake_bin, script, *args, "--dry-run")
  assert r.returncode != 0 and r.stdout == ""
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and "required" in lines[0] and flag in lines[0], r.stderr
  assert not fake_bin[1].exists()


def test_bad_values_are_one_clear_line(fake_bin):
  for args in (["create", "--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v4-8"],
               ["create", "--name", "n", "--zone", "z", "--accelerator-type", "tpu7x-8"],
               ["logs", "--name", "n", "--zone", "z", "--slice", "2", "--num-slices", "2"],
               ["copy-back", "--workdir", "/local", "--to", "d"]):
    r = launch(fake_bin, "tpu_vm.py", *args, "--dry-run")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (args, r.stderr)


def test_dry_run_after_double_dash_is_refused(fake_bin):
  for script, args in (("gpu_node.py", ["--config", "c", "--workdir", "w"]),
                       ("tpu_vm.py", ["run", "--name", "n", "--zone", "z", "--config", "c",
                                      "--workdir", "gs://b/r"])):
    r = launch(fake_bin, script, *args, "--", "--config.train.steps=1", "--dry-run")
    assert r.returncode == 2 and "--dry-run must come before --" in r.stderr
    assert not fake_bin[1].exists()


def test_scripts_never_import_jmtl_or_jax():
  for p in LAUNCH.glob("*.py"):
    assert not re.search(r"^\s*(import|from)\s+(jmtl|jax)\b", p.read_text(), re.M), p


# ------------------------------------------------------------------ review fixes (issue 13)
def _error(fake_bin, script, *args):
  args = list(args)
  args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
  r = launch(fake_bin, script, *args)
  lines = r.stderr.splitlines()
  assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
  assert not fake_bin[1].exists()
  return lines[0]


def test_create_takes_both_spellings_of_v5e_and_names_unknown_types(fake_bin):
  for spelling in ("v5e-16", "v5litepod-16"):
    create, _ = dry(fake_bin, "tpu_vm.py", "create", "--name", "a", "--zone", "z",
                    "--accelerator-type", spelling)
    # gcloud's own spelling, and the v5e runtime of the Cloud TPU docs.
    assert "--accelerator-type=v5litepod-16" in create
    assert "--runtime-version=v2-alpha-tpuv5-lite" in create
  base = ["create", "--name", "a", "--zone", "z", "--accelerator-type"]
  assert "unknown accelerator type 'tpu7x-8'" in _error(fake_bin, "tpu_vm.py", *base, "tpu7x-8")
  assert "no such v5e slice" in _error(fake_bin, "tpu_vm.py", *base, "v5litepod-7")
  assert "no such v4 slice" in _error(fake_bin, "tpu_vm.py", *base, "v4-6")


def test_run_refuses_dcn_data_that_num_slices_sets(fake_bin):
  line = _error(fake_bin, "tpu_vm.py", "run", "--name", "ms", "--zone", "z", "--num-slices", "2",
                "--config", "configs/quickstart.py", "--workdir", "gs://b/r", "--",
                "--config.mesh.dcn_data=3")
  assert "--config.mesh.dcn_data=3" in line and "--num-slices" in line


def test_run_checks_config_here_and_in_head_and_workdir_scheme(fake_bin):
  run = ["run", "--name", "n", "--zone", "z", "--workdir", "gs://b/r", "--config"]
  assert "no such file" in _error(fake_bin, "tpu_vm.py", *run, "configs/nope.py")
  untracked = ROOT / "configs" / f"_untracked_{os.getpid()}.py"
  untracked.write_text("")
  try:
    line = _error(fake_bin, "tpu_vm.py", *run, str(untracked.relative_to(ROOT)))
    assert "not in the commit" in line
  finally:
    untracked.unlink()
  line = _error(fake_bin, "tpu_vm.py", "run", "--name", "n", "--zone", "z", "--config",
                "configs/quickstart.py", "--workdir", "gs:/b/r")
  assert "gs://b/r" in line


def test_logs_worker_must_be_an_index_or_all(fake_bin):
  assert "-1" in _error(fake_bin, "tpu_vm.py", "logs", "--name", "n", "--zone", "z",
                        "--worker=-1")
  (cmd,) = dry(fake_bin, "tpu_vm.py", "logs", "--name", "n", "--zone", "z", "--worker", "all")
  assert "--worker=all" in cmd


def test_stop_sends_sigterm_to_the_started_run_on_every_worker(fake_bin, tmp_path):
  cmds = dry(fake_bin, "tpu_vm.py", "stop", "--name", "ms", "--zone", "z", "--num-slices", "2")
  assert [c[5] for c in cmds] == ["ms-0", "ms-1"] and all("--worker=all" in c for c in cmds)
  # `run` records the pid that `stop` signals.
  (run,) = dry(fake_bin, "tpu_vm.py", "run", "--name", "n", "--zone", "z", "--config",
               "configs/quickstart.py", "--workdir", "gs://b/r")
  assert "echo $! > ~/jmtl-logs/train.pid" in remote(run)
  # The stop script, run by bash in a fake home, delivers SIGTERM to that process.
  home = tmp_path / "home"
  (home / "jmtl-logs").mkdir(parents=True)
  victim = subprocess.Popen(["sleep", "60"])
  try:
    (home / "jmtl-logs" / "train.pid").write_text(f"{victim.pid}\n")
    r = subprocess.run(["bash", "-c", remote(cmds[0])], capture_output=True, text=True,
                       env=dict(os.environ, HOME=str(home)), timeout=30)
    assert r.returncode == 0 and f"sent SIGTERM to pid {victim.pid}" in r.stdout, r
    assert victim.wait(timeout=10) == -15  # killed by signal 15
  finally:
    if victim.poll() is None:
      victim.kill()


def test_gpu_node_checks_config_and_workdir(fake_bin):
  assert "--config nope.py: no such file" in _error(fake_bin, "gpu_node.py", "--config",
                                                    "nope.py", "--workdir", "w")


def test_slurm_cpus_signal_requeue_and_config_check(fake_bin, tmp_path):
  (tmp_path / "c.py").write_text("")
  base = ["--nodes", "1", "--gpus-per-node", "2", "--workdir", "w", "--chdir", str(tmp_path)]
  r = launch(fake_bin, "slurm.py", *base, "--config", "c.py", "--cpus-per-task", "16",
             "--signal-before", "300", "--requeue", "--dry-run")
  assert r.returncode == 0, r.stderr
  sb = set(re.findall(r"^#SBATCH (\S+)$", r.stdout, re.M))
  assert {"--cpus-per-task=16", "--signal=TERM@300", "--requeue"} <= sb and "--exclusive" not in sb
  (srun,) = [l for l in r.stdout.splitlines() if l.startswith("srun ")]
  assert "--cpus-per-task=16" in srun.split()
  r = launch(fake_bin, "slurm.py", *base, "--config", "c.py", "--signal-before", "0", "--dry-run")
  assert "--signal" not in r.stdout
  line = _error(fake_bin, "slurm.py", *base, "--config", "nope.py")
  assert "--config nope.py: no such file" in line and str(tmp_path) in line
  help_text = " ".join(launch(fake_bin, "slurm.py", "--help").stdout.split()).replace("- ", "-")
  assert "./<job-name>.sbatch" in help_text and "jmtl-<job-name>" not in help_text
