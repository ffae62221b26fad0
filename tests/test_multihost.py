"""Multi-host runs: 2 processes x 4 CPU devices form one 8-device mesh on localhost (JAX's
distributed runtime, gloo collectives) and must give what one process with 8 devices gives.

- The same losses (<= 1e-5 relative) and the same predictions on every task kind
  (classification, regression, extractive QA, summarization), written once, by process 0.
- SIGTERM reaching one process only: both save the same step, exit 143; process 0 says which
  process received it, and that process says so on its own stderr.
- A check one host may fail alone (its data differ from the checkpoint's, or from process 0's)
  stops every process with the same one line naming that process, exit 2; nobody hangs.
- A checkpoint written by the 2-process run resumes in a 1-process run, and the other way
  round, ending with the uninterrupted run's train lines and eval.json.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import signal
import socket

import pytest

import faults

pytestmark = pytest.mark.slow

REPO = faults.REPO
MULTI = REPO / "tests" / "configs" / "tiny_multi.py"
SIGTERM_EXIT = 128 + signal.SIGTERM
# Train lines at 2, 4, 6 (sst2) / 2, 4 (multi); one evaluation, at the end.
SST2 = ["--config.train.steps=6", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=100"]
FOUR = ["--config.train.steps=4", "--config.train.eval_every=0",
        "--config.data.max_eval_examples=16"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(jax_cache):
  """The session's JAX compilation cache (conftest.py)."""
  return jax_cache


@pytest.fixture(scope="module")
def sst2_reference(tmp_path_factory, data_dir, cache):
  """The uninterrupted 1-process SST-2 run the interrupted ones must end up equal to."""
  ref = tmp_path_factory.mktemp("sst2_reference")
  one(ref, data_dir, cache, *SST2)
  return ref


def _env(data_dir, cache, devices: int, fault: str = "") -> dict[str, str]:
  env = faults.env(data_dir, fault, cache=cache)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def one(workdir, data_dir, cache, *extra, config=faults.TINY, fault="", expect=0):
  """A 1-process run over 8 CPU devices."""
  return faults.run(faults.cmd(workdir, *extra, config=config),
                    _env(data_dir, cache, 8, fault), expect=expect)


def two(workdir, data_dir, cache, *extra, config=faults.TINY, faults_by_process=("", ""),
        expect=(0, 0), extra_by_process=((), ()), data_by_process=(None, None),
        timeout=faults.TIMEOUT):
  """A 2-process run, 4 CPU devices each, joined through a coordinator on localhost (process
  `p` reads `data_by_process[p]` when given, else `data_dir`). A process still running after
  `timeout` s fails the test, and both are killed."""
  port = _port()
  jobs = []
  for pid in range(2):
    argv = faults.cmd(workdir, *extra, *extra_by_process[pid], "--config.dist.initialize=true",
                      f"--config.dist.coordinator_address=localhost:{port}",
                      "--config.dist.num_processes=2", f"--config.dist.process_id={pid}",
                      config=config)
    jobs.append(faults.Job(argv, _env(data_by_process[pid] or data_dir, cache, 4,
                                      faults_by_process[pid]),
                           logs=pathlib.Path(str(workdir) + ".logs")))
  try:
    results = [job.wait(timeout) for job in jobs]
  finally:
    for job in jobs:
      if job.poll() is None:
        job.proc.kill()
        job.proc.wait()
  for pid, (res, want) in enumerate(zip(results, expect)):
    assert res.returncode == want, (
        f"process {pid}: exit {res.returncode}, expected {want}\n"
        f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}")
  return results


def _predictions(workdir) -> dict[str, list]:
  out = {}
  for p in sorted((pathlib.Path(workdir) / "predictions").glob("*.jsonl")):
    out[p.stem] = [json.loads(line)["prediction"] for line in p.read_text().splitlines()]
  return out


def _same_predictions(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for task, rows in want.items():
    assert len(got[task]) == len(rows), task
    for a, b in zip(got[task], rows):
      if isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (task, a, b)
      else:
        assert a == b, (task, a, b)


def test_two_processes_equal_one_process_on_every_task_kind(tmp_path, data_dir, cache):
  ref, multi = tmp_path / "one", tmp_path / "two"
  one(ref, data_dir, cache, *FOUR, config=MULTI)
  results = two(multi, data_dir, cache, *FOUR, config=MULTI)
  faults.assert_same_train(multi, ref, rel=1e-5)
  _same_predictions(_predictions(multi), _predictions(ref))
  got, want = faults.eval_json(multi), faults.eval_json(ref)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if key.startswith("stsb/"):
      # Pearson/Spearman of a barely trained regressor divide by the spread of its outputs
      # (~1e-5 here), so float32 rounding of the outputs (compared above) moves them more.
      continue
    if isinstance(value, float):
      assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, got[key], value)
    else:
      assert got[key] == value, key
  # Only process 0 writes: one line per step and split, one summary line on the console.
  rows = faults.metric_rows(multi)
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys)), keys
  assert "final evaluation" in results[0].stdout
  assert "final evaluation" not in results[1].stdout


def test_sigterm_on_one_host_saves_one_step_then_resumes_in_one_process(
    tmp_path, data_dir, cache, sst2_reference):
  ref, work = sst2_reference, tmp_path / "work"
  results = two(work, data_dir, cache, *SST2, faults_by_process=("", "sigterm_at=3"),
                expect=(SIGTERM_EXIT, SIGTERM_EXIT))
  lines = [faults.SIGNAL_LINE.search(r.stdout) for r in results]
  assert lines[0] is not None and lines[1] is None, [r.stdout for r in results]
  step = int(lines[0].group(2))
  # Process 0 never received the signal: its line names the process that did, and that
  # process says the same on its own stderr (where its user looks).
  said = f"process 1 received signal 15: saved checkpoint at step {step}, exiting"
  assert said in results[0].stdout, results[0].stdout[-2000:]
  assert said in results[1].stderr, results[1].stderr[-2000:]
  assert "process 0 received" not in results[0].stdout + results[1].stderr
  assert faults.checkpoint_steps(work) == [step] and 1 <= step < 6
  out = one(work, data_dir, cache, *SST2)
  assert f"resumed from checkpoint at step {step}" in out.stdout
  faults.assert_same_train(work, ref, rel=1e-5)
  faults.assert_same_eval(work, ref, rel=1e-5)


def test_one_process_checkpoint_resumes_in_two_processes(tmp_path, data_dir, cache,
                                                          sst2_reference):
  ref, work = sst2_reference, tmp_path / "work"
  out = one(work, data_dir, cache, *SST2, fault="sigterm_at=4", expect=SIGTERM_EXIT)
  step = int(faults.SIGNAL_LINE.search(out.stdout).group(2))
  results = two(work, data_dir, cache, *SST2)
  assert f"resumed from checkpoint at step {step}" in results[0].stdout
  faults.assert_same_train(work, ref, rel=1e-5)
  faults.assert_same_eval(work, ref, rel=1e-5)


def test_different_config_on_one_process_stops_both_with_one_line(tmp_path, data_dir, cache):
  """Processes with different configs would train a mix of two runs (or wait on each other
  forever): the preflight compares them and every process names the differing key."""
  work = tmp_path / "work"
  results = two(work, data_dir, cache, *SST2, extra_by_process=((), ("--config.seed=1",)),
                expect=(2, 2))
  for res in results:
    lines = [x for x in res.stderr.splitlines() if x.startswith("jmtl: ")]
    assert len(lines) == 1 and "seed" in lines[0] and "differ" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
  assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()


FED = REPO / "tests" / "configs" / "tiny_fed.py"  # 4 sites x 2 devices: 2 sites per process


def _fed_cmd(workdir, *extra):
  # bbc_topic only: the headline decoder's compile and beam search would double the time.
  return faults.cmd(workdir, "--config.fed.eval_every=0", "--config.tasks=bbc_topic", *extra,
                    command="federated", config=FED)


def _fed_rounds(workdir) -> list[dict]:
  return [json.loads(l) for l in (pathlib.Path(workdir) / "rounds.jsonl").read_text().splitlines()]


def _same_rounds(got: list[dict], want: list[dict]) -> None:
  assert [r["round"] for r in got] == [r["round"] for r in want]
  for a, b in zip(got, want):
    assert a["sites"] == b["sites"] and a["bytes_up"] == b["bytes_up"], (a, b)
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["round"], a["loss"], b["loss"])
    for key in ("site_loss", "weights"):
      for site, value in b[key].items():
        assert math.isclose(a[key][site], value, rel_tol=1e-5, abs_tol=1e-7), (key, site)


def test_federated_sites_on_two_processes_equal_one_process_and_resume_across(
    tmp_path, data_dir, cache):
  """Sites on different hosts: process 0 holds sites a, b and process 1 sites c, d (each reads
  only its sites' data). Rounds and the final evaluation equal a 1-process run's; the
  2-process run's checkpoint (round 2) resumes in one process to the reference's round 3."""
  ref, multi = tmp_path / "one", tmp_path / "two"
  faults.run(_fed_cmd(ref, "--config.fed.rounds=3"), _env(data_dir, cache, 8))
  port = _port()
  jobs = [faults.Job(_fed_cmd(multi, "--config.fed.rounds=2", "--config.dist.initialize=true",
                              f"--config.dist.coordinator_address=localhost:{port}",
                              "--config.dist.num_processes=2", f"--config.dist.process_id={pid}"),
                     _env(data_dir, cache, 4), logs=tmp_path / "logs")
          for pid in range(2)]
  results = [job.wait() for job in jobs]
  assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
  assert "final evaluation" in results[0].stdout and "final evaluation" not in results[1].stdout
  _same_rounds(_fed_rounds(multi), _fed_rounds(ref)[:2])
  proc = faults.run(_fed_cmd(multi, "--config.fed.rounds=3"), _env(data_dir, cache, 8))
  assert "resumed from checkpoint at round 2" in proc.stdout
  _same_rounds(_fed_rounds(multi), _fed_rounds(ref))
  got, want = faults.eval_json(multi), faults.eval_json(ref)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if isinstance(value, float):
      assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, got[key], value)


def _other_sst2_labels(root: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
  """A data root like `data_dir` whose SST-2 train file has every label flipped (0 <-> 1):
  the same sentences, other training data (what a host with a stale copy would read)."""
  glue = root / "glue"
  (glue / "SST-2").mkdir(parents=True)
  for entry in (data_dir / "glue").iterdir():
    if entry.name != "SST-2":
      (glue / entry.name).symlink_to(entry)
  for entry in (data_dir / "glue" / "SST-2").iterdir():
    if entry.name != "train.tsv":
      (glue / "SST-2" / entry.name).symlink_to(entry)
  lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
  flipped = [lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in (x.rsplit("\t", 1) for x in lines[1:])]
  (glue / "SST-2" / "train.tsv").write_text("\n".join(flipped) + "\n")
  return root


def _one_error_line(results) -> str:
  """Every process printed the same single `jmtl: error:` line and no traceback; returns it."""
  lines = set()
  for res in results:
    errors = [x for x in res.stderr.splitlines() if x.startswith("jmtl: ")]
    assert len(errors) == 1 and errors[0].startswith("jmtl: error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines.add(errors[0])
  assert len(lines) == 1, lines
  return lines.pop()


def test_checkpoint_refused_on_one_host_stops_both_with_one_line(tmp_path, data_dir, cache,
                                                                 sst2_reference):
  """Resuming where process 1 reads other SST-2 labels than the checkpoint was trained on: only
  process 1 can tell, yet both must stop (exit 2, the same line naming process 1) instead of
  process 0 waiting in the restore for a peer that left. The checkpoint is a copy of the
  module's 1-process SST-2 run (its step 6): the check comes before the run could tell it is
  finished."""
  work = tmp_path / "work"
  shutil.copytree(sst2_reference, work)
  kept = faults.checkpoint_steps(work)
  assert kept == [6]
  other = _other_sst2_labels(tmp_path / "data", data_dir)
  results = two(work, data_dir, cache, *SST2, data_by_process=(None, other), expect=(2, 2),
                timeout=240)
  line = _one_error_line(results)
  assert line.startswith(f"jmtl: error: process 1: --workdir {work} holds a checkpoint (step "
                         f"{kept[-1]}) of a different run: the training data of task 'sst2' "
                         f"differ"), line
  assert "resumed" not in results[0].stdout
  assert faults.checkpoint_steps(work) == kept


def test_fresh_run_with_other_data_on_one_host_stops_both_with_one_line(
    tmp_path, data_dir, cache):
  """A fresh run where process 1 reads other SST-2 training data than process 0 would train
  on a mix of the two without a word: both stop before the first step, naming the task and
  process 1, and nothing is written."""
  work = tmp_path / "work"
  other = _other_sst2_labels(tmp_path / "data", data_dir)
  results = two(work, data_dir, cache, *SST2, data_by_process=(None, other), expect=(2, 2),
                timeout=240)
  line = _one_error_line(results)
  assert line == ("jmtl: error: the training data of task 'sst2' differ between the processes "
                  "of this run (process 1 read other rows than process 0); give every host "
                  "the same data files (data.dir / $JMTL_DATA_DIR)"), line
  assert not (work / "checkpoints").exists() or not any((work / "checkpoints").iterdir())
  assert not (work / "metrics.jsonl").exists()


def test_federated_sigterm_on_one_host_is_named_by_both(tmp_path, data_dir, cache):
  """`jmtl federated` shares the agreed stop: SIGTERM reaching process 1 only stops both at the
  same round (exit 143); process 0 names process 1, which says the same on its stderr."""
  work, port = tmp_path / "work", _port()
  jobs = [faults.Job(_fed_cmd(work, "--config.fed.rounds=6", "--config.fed.checkpoint_every=1",
                              "--config.dist.initialize=true",
                              f"--config.dist.coordinator_address=localhost:{port}",
                              "--config.dist.num_processes=2", f"--config.dist.process_id={pid}"),
                     _env(data_dir, cache, 4), logs=tmp_path / "logs")
          for pid in range(2)]
  try:
    faults.wait_until(lambda: 1 in faults.checkpoint_steps(work), jobs[1], what="round 1 saved")
    jobs[1].signal(signal.SIGTERM)
    results = [job.wait(240) for job in jobs]
  finally:
    for job in jobs:
      if job.poll() is None:
        job.proc.kill()
        job.proc.wait()
  assert [r.returncode for r in results] == [SIGTERM_EXIT] * 2, [r.stderr[-2000:] for r in results]
  said = re.search(r"process 1 received signal 15: saved checkpoint at round (\d+), exiting",
                   results[0].stdout)
  assert said is not None, results[0].stdout[-2000:]
  assert said.group(0) in results[1].stderr, results[1].stderr[-2000:]
  assert faults.checkpoint_steps(work)[-1] == int(said.group(1)) < 6
