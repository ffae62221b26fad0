"""End-to-end fault tests: a training run never loses work and never lies.

Each test runs `jmtl` (through tests/fault_run.py, which injects one fault: a NaN batch, a
SIGTERM at a step, in a save or in an evaluation, a full disk, a failing evaluation) on the tiny
real-SST-2 config and checks what the user sees (exit code, one stderr line) and what the workdir
holds (committed checkpoints, metrics.jsonl, eval.json); a rerun must end where an uninterrupted
run ends. The uninterrupted reference run is shared by the module.
"""

import shutil
import signal
import time

import pytest

import faults
from faults import cmd
from jmtl.data import sources

pytestmark = pytest.mark.slow

STEPS = 16
# The reference cadence: train lines at 4, 8, 12, 16; eval only at the end (adamw does not read
# the eval metric, so eval_every does not change the losses); checkpoints 12, 15, 16 kept.
BASE = [f"--config.train.steps={STEPS}", "--config.train.log_every=4",
        "--config.train.eval_every=0", "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=3", "--config.train.progress=none"]
SIGTERM_EXIT = 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def cache(jax_cache):
  """The session's JAX compilation cache (conftest.py): the module's runs compile the same
  programs."""
  return jax_cache


@pytest.fixture(scope="module")
def env(data_dir, cache):
  def make(fault="", *, trace=None, data=None):
    return faults.env(data or data_dir, fault, trace=trace, cache=cache)
  return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """The uninterrupted run every interrupted one must end up equal to."""
  workdir = tmp_path_factory.mktemp("reference")
  faults.run(cmd(workdir, *BASE), env(), expect=0)
  assert faults.checkpoint_steps(workdir) == [12, 15, 16]
  rows = faults.train_rows(workdir)
  assert sorted(rows) == [4, 8, 12, 16]
  assert all("train/loss" in r and "train/skipped_steps" in r for r in rows.values()), rows
  return workdir


def _resume_equals_reference(workdir, reference, env, step, *extra):
  """Reruns the command without a fault: it resumes from checkpoint `step`, exits 0 and ends
  with the reference's train lines and eval.json."""
  out = faults.run(cmd(workdir, *BASE, *extra), env(), expect=0)
  assert f"resumed from checkpoint at step {step}" in out.stdout, out.stdout[-2000:]
  faults.assert_same_train(workdir, reference)
  faults.assert_same_eval(workdir, reference)
  return out


# 1. SIGTERM (preemption) at odd moments: exit 143 after committing the step it names.

@pytest.mark.parametrize("fault", [
    "sigterm_at=6",                     # between log steps (log_every=4, checkpoint_every=5)
    "sigterm_at=10",                    # on a checkpoint step
    "sigterm_in_save=5",                # inside a save
    "sigterm_in_eval=1",                # during the final evaluation (eval_every=0)
    "sigterm_at=6,sigterm_again=0.05",  # twice, the second during the exit save/wait
], ids=["between_log_steps", "checkpoint_step", "in_save", "final_eval", "twice"])
def test_sigterm_commits_named_step_and_resumes_exactly(fault, reference, tmp_path, env):
  workdir = tmp_path / "w"
  out = faults.run(cmd(workdir, *BASE, "--config.train.checkpoint_every=5"), env(fault))
  assert out.returncode == SIGTERM_EXIT, (
      f"exit {out.returncode}, expected {SIGTERM_EXIT}\nstdout: {out.stdout[-2000:]}\n"
      f"stderr: {out.stderr[-3000:]}")
  saved = faults.signal_step(out.stdout + out.stderr)
  steps = faults.checkpoint_steps(workdir)
  assert saved in steps, f"'saved checkpoint at step {saved}' but committed: {steps}"
  assert max(steps) == saved, f"latest committed {max(steps)} is not the step named ({saved})"
  assert not faults.temporary_checkpoints(workdir), (
      f"half-written saves left after a clean exit: {faults.temporary_checkpoints(workdir)}")
  faults.assert_small_files_whole(workdir)
  _resume_equals_reference(workdir, reference, env, saved, "--config.train.checkpoint_every=5")


@pytest.mark.parametrize("fault", ["sigterm_in_close", "sigterm_after_run"])
def test_sigterm_as_a_finished_run_closes_prints_its_lines_and_exits_143(fault, tmp_path, env):
  """SIGTERM while the finished run closes (its last save committing) or right after it
  returned, before the final line: the final line and the signal line naming the last step
  are printed and the run exits 143 (the signal was dropped, exit 0, or it killed the process
  with no line)."""
  workdir = tmp_path / "w"
  out = faults.run(cmd(workdir, *BASE, "--config.train.steps=4"), env(fault))
  assert out.returncode == SIGTERM_EXIT, (out.returncode, out.stderr[-3000:])
  assert "final evaluation (validation, step 4)" in out.stdout, out.stdout[-2000:]
  assert faults.signal_step(out.stdout) == 4
  assert faults.checkpoint_steps(workdir)[-1] == 4
  assert "Traceback" not in out.stderr, out.stderr[-3000:]


# 2. A failing evaluation: one line, the step's checkpoint committed first, a rerun only evaluates.

@pytest.mark.parametrize("extra,committed", [
    (["--config.train.checkpoint_every=5"], STEPS),                                # final eval
    (["--config.train.eval_every=6", "--config.train.checkpoint_every=6"], 6),   # periodic eval
], ids=["final", "periodic"])
def test_eval_failure_keeps_checkpoint_and_rerun_finishes(extra, committed, reference, tmp_path,
                                                          env):
  workdir = tmp_path / "w"
  out = faults.run(cmd(workdir, *BASE, *extra), env("eval_error=1"))
  assert out.returncode != 0, out.stdout[-2000:]
  faults.one_error_line(out.stderr)
  steps = faults.checkpoint_steps(workdir)
  assert committed in steps and max(steps) == committed, steps
  # at committed == 16 nothing is left to train: the rerun resumes at the end and only evaluates
  _resume_equals_reference(workdir, reference, env, committed, *extra)


# 3. Two commands on one workdir while a run is in progress.

@pytest.fixture(scope="module")
def concurrent(tmp_path_factory, env, reference):
  """A training run held before step 5 (after committing checkpoint 4) while a fake in-flight
  save directory is added and `jmtl eval` and a second `jmtl train` run on its workdir; then it
  is let go and finishes."""
  del reference  # run first: its compilations fill the cache
  root = tmp_path_factory.mktemp("concurrent")
  workdir, release = root / "w", root / "release"
  args = [*BASE, "--config.train.checkpoint_every=2"]
  job = faults.Job(cmd(workdir, *args), env(f"hold_at=5:{release}"), logs=root / "logs")
  try:
    faults.wait_until(lambda: 4 in faults.checkpoint_steps(workdir), job,
                      what="committed checkpoint 4")
    inflight = workdir / "checkpoints" / "1000.orbax-checkpoint-tmp-1700000000000"
    (inflight / "state").mkdir(parents=True)
    (inflight / "state" / "partial").write_bytes(b"\0" * 64)
    ev = faults.Job(cmd(workdir, *args, command="eval"), env(), logs=root / "logs")
    tr = faults.Job(cmd(workdir, *args), env(), logs=root / "logs")
    # Both normally end while the run is held; one that waits for the workdir instead is let
    # finish after the run (at most 3 minutes of waiting here).
    t0 = time.time()
    while (ev.poll() is None or tr.poll() is None) and time.time() - t0 < 180:
      time.sleep(0.05)
    second_ended_first = tr.poll() is not None
    inflight_kept = inflight.is_dir()
    held = job.poll() is None
  finally:
    release.touch()
  res = job.wait()
  return dict(workdir=workdir, first=res, eval=ev.wait(), second=tr.wait(), held=held,
              second_ended_first=second_ended_first, inflight_kept=inflight_kept)


def _first_run_finished_normally(c, reference):
  first = c["first"]
  assert c["held"], (f"the first run ended while held: exit {first.returncode}\n"
                     f"{first.stderr[-3000:]}")
  assert first.returncode == 0, f"first run: exit {first.returncode}\n{first.stderr[-3000:]}"
  workdir = c["workdir"]
  assert faults.checkpoint_steps(workdir) == [12, 14, 16]
  faults.assert_same_train(workdir, reference)
  faults.assert_same_eval(workdir, reference)


def test_eval_during_training_leaves_inflight_saves(concurrent, reference):
  """3(a): `jmtl eval` either evaluates or refuses (exit 2, one line: the workdir is in use); it
  must not delete the running job's temporary checkpoint directories."""
  ev = concurrent["eval"]
  assert ev.returncode in (0, 2), f"eval: exit {ev.returncode}\n{ev.stderr[-3000:]}"
  if ev.returncode == 2:
    assert "in use" in faults.one_error_line(ev.stderr)
  assert concurrent["inflight_kept"], "jmtl eval deleted the running job's in-flight save"
  _first_run_finished_normally(concurrent, reference)


def test_second_train_in_same_workdir_is_refused(concurrent, reference):
  """3(b): a second `jmtl train` on a workdir in use: exit 2, one line saying so; the first run
  finishes as if alone."""
  second = concurrent["second"]
  assert concurrent["second_ended_first"], "the second train waited for the first run to end"
  assert second.returncode == 2, f"second train: exit {second.returncode}\n{second.stderr[-3000:]}"
  assert "in use" in faults.one_error_line(second.stderr)
  _first_run_finished_normally(concurrent, reference)


# 4. A bucket workdir without bucket access.

def test_bucket_workdir_fails_in_one_line_without_local_dir(tmp_path, env):
  out = faults.run(cmd("gs://jmtl-test-bucket/run", *BASE, "--config.train.steps=2"), env(),
                   cwd=tmp_path, timeout=300)
  assert out.returncode != 0, "a gs:// workdir cannot be reached here, yet the run succeeded"
  assert not (tmp_path / "gs:").exists(), "a local directory 'gs:' was created"
  assert not list(tmp_path.iterdir()), f"files left in the cwd: {list(tmp_path.iterdir())}"
  faults.one_error_line(out.stderr)


# 5. A non-finite step with train.on_nonfinite=halt.

NONFINITE = [*BASE, "--config.train.on_nonfinite=halt", "--config.train.log_every=5",
             "--config.train.checkpoint_every=3"]


def test_nonfinite_halts_at_its_step_keeping_only_good_checkpoints(tmp_path, env):
  workdir = tmp_path / "w"
  out = faults.run(cmd(workdir, *NONFINITE), env("nan_at=7"), expect=3)
  line = faults.one_error_line(out.stderr)
  assert "step 7" in line and "last good checkpoint: step 6" in line, line
  steps = faults.checkpoint_steps(workdir)
  assert steps and max(steps) == 6, f"committed checkpoints {steps}: want the last one at step 6"
  assert not (workdir / "eval.json").exists()


def test_nonfinite_then_sigterm_still_halts_and_rerun_halts_again(tmp_path, env):
  """The SIGTERM right after the bad step must not save it as a checkpoint (nor exit 0): a rerun
  replays the bad batch and halts at step 7 again."""
  workdir = tmp_path / "w"
  out = faults.run(cmd(workdir, *NONFINITE), env("nan_at=7,sigterm_at=8"))
  steps = faults.checkpoint_steps(workdir)
  assert not steps or max(steps) <= 6, f"a checkpoint after the non-finite step 7: {steps}"
  # exit 3; or, if the signal landed before step 7 trained (prefetch), a clean 143 at <= 6
  assert out.returncode == 3 or (out.returncode == SIGTERM_EXIT and
                                 faults.signal_step(out.stdout + out.stderr) <= 6), (
      f"exit {out.returncode}\nstdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-3000:]}")
  if out.returncode == 3:
    assert "step 7" in faults.one_error_line(out.stderr)
  again = faults.run(cmd(workdir, *NONFINITE), env("nan_at=7"), expect=3)
  assert "step 7" in faults.one_error_line(again.stderr)
  steps = faults.checkpoint_steps(workdir)
  assert not steps or max(steps) <= 6, steps


# 6. Resume with a changed config or changed data: refused before any work.

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, env, reference):
  """A run stopped by SIGTERM around step 8, with checkpoints (3, 6, ...)."""
  del reference
  workdir = tmp_path_factory.mktemp("interrupted") / "w"
  faults.run(cmd(workdir, *BASE), env("sigterm_at=8"), expect=SIGTERM_EXIT)
  assert faults.checkpoint_steps(workdir)
  return workdir


def _assert_refused_untouched(workdir, out, *names):
  assert out.returncode == 2, (f"exit {out.returncode}, expected 2\nstdout: {out.stdout[-2000:]}"
                               f"\nstderr: {out.stderr[-3000:]}")
  line = faults.one_error_line(out.stderr)
  assert any(n in line for n in names), f"the line names none of {names}: {line}"
  return line


@pytest.mark.parametrize("override,key,process", [
    ("--config.model.layers=2", "model.layers", True),
    ("--config.optim.name=sgd", "optim.name", False),
    ("--config.tasks=('sst2','mrpc')", "tasks", False),
    ("--config.data.batch_size=32", "data.batch_size", False),
    ("--config.seed=1", "seed", False),
    ("--config.data.vocab_size=600", "data.vocab_size", False),
    ("--config.data.max_train_examples=256", "data.max_train_examples", False),
], ids=["model.layers", "optim.name", "tasks", "data.batch_size", "seed", "data.vocab_size",
        "data.max_train_examples"])
def test_resume_with_changed_config_is_refused(override, key, process, interrupted, tmp_path,
                                               env, data_dir, capfd, monkeypatch):
  """The refusal comes before any work: the first case is checked on the `jmtl` process itself
  (its exit status, all of its stderr), the others run `jmtl train` in this process
  (`faults.cli_in_process`: the same exit code and stderr, no interpreter start per case)."""
  if "mrpc" in override:  # real data: missing is a failure (conftest's data_dir rule)
    assert (data_dir / "glue" / "MRPC" / "train.tsv").is_file(), "glue/MRPC/train.tsv is missing"
  workdir = tmp_path / "w"
  shutil.copytree(interrupted, workdir)
  before = (workdir / "config.json").read_bytes()
  steps = faults.checkpoint_steps(workdir)
  if process:
    out = faults.run(cmd(workdir, *BASE, override), env(), timeout=300)
  else:
    out = faults.cli_in_process(["train", "--config", str(faults.TINY), "--workdir",
                                 str(workdir), *BASE, override], capfd, monkeypatch,
                                {"JMTL_DATA_DIR": str(data_dir)})
  _assert_refused_untouched(workdir, out, key)
  assert (workdir / "config.json").read_bytes() == before, "config.json was rewritten"
  assert faults.checkpoint_steps(workdir) == steps


def test_resume_with_changed_training_file_is_refused(tmp_path, env, data_dir):
  data = tmp_path / "data"
  shutil.copytree(data_dir / "glue" / "SST-2", data / "glue" / "SST-2")
  workdir = tmp_path / "w"
  faults.run(cmd(workdir, *BASE), env("sigterm_at=8", data=data), expect=SIGTERM_EXIT)
  assert faults.checkpoint_steps(workdir)
  train = data / "glue" / "SST-2" / "train.tsv"
  lines = train.read_text().split("\n")
  # One row of the subset the run trains on (data.max_train_examples caps the file to a seeded
  # subset; an edit outside it would change no training record).
  rows = [i for i in range(1, len(lines)) if lines[i].strip()]
  row = sources.cap_records(rows, 512, 0)[0]
  sentence, label = lines[row].rsplit("\t", 1)
  lines[row] = f"an edited {sentence}\t{label}"
  train.write_text("\n".join(lines))
  before = (workdir / "config.json").read_bytes()
  out = faults.run(cmd(workdir, *BASE), env(data=data), timeout=300)
  _assert_refused_untouched(workdir, out, "sst2", "SST-2", "train.tsv")
  assert (workdir / "config.json").read_bytes() == before, "config.json was rewritten"


def test_more_steps_on_a_finished_run_resumes(reference, tmp_path, env):
  """train.steps may change: a finished 16-step run continues to 20."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  out = faults.run(cmd(workdir, *BASE, "--config.train.steps=20"), env(), expect=0)
  assert "resumed from checkpoint at step 16" in out.stdout, out.stdout[-2000:]
  assert sorted(faults.train_rows(workdir)) == [4, 8, 12, 16, 20]
  assert faults.checkpoint_steps(workdir)[-1] == 20
  assert faults.eval_json(workdir)["step"] == 20


# 7. Damaged workdirs and a full disk.

@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn_metrics_line"])
def test_sigkill_resume_logs_exactly_the_reference_lines(torn, reference, tmp_path, env):
  """8 (and 7a with a torn last line): checkpoint_every=3 is not a multiple of log_every=4; a
  run SIGKILLed after checkpoint 9 resumes and logs train lines at exactly 4, 8, 12, 16 with
  the reference's values, train/skipped_steps included."""
  workdir = tmp_path / "w"
  job = faults.Job(cmd(workdir, *BASE), env(f"hold_at=11:{tmp_path / 'never'}"),
                   logs=tmp_path / "logs")  # the run cannot pass step 10
  faults.signal_when(job, lambda: 9 in faults.checkpoint_steps(workdir), signal.SIGKILL,
                     what="checkpoint 9")
  assert faults.checkpoint_steps(workdir)[-1] == 9, faults.checkpoint_steps(workdir)
  if torn:
    with (workdir / "metrics.jsonl").open("a") as f:
      f.write('{"step": 99, "spl')
  _resume_equals_reference(workdir, reference, env, 9)


def test_disk_full_at_save_stops_at_once_in_one_line(reference, tmp_path, env):
  """7(b): ENOSPC at the save of step 6: stop before training on to the next save, one line
  naming the step and the error; checkpoint 3 intact; a rerun finishes like the reference."""
  workdir = tmp_path / "w"
  trace = tmp_path / "trace"
  out = faults.run(cmd(workdir, *BASE), env("enospc_at_save=6", trace=trace))
  assert out.returncode != 0, out.stdout[-2000:]
  line = faults.one_error_line(out.stderr)
  assert "step 6" in line and "No space left" in line, line
  saves = [int(t.split()[1]) for t in faults.read_trace(trace) if t.startswith("save ")]
  assert max(saves) == 6, f"saves attempted after the failed one: {saves}"
  assert faults.checkpoint_steps(workdir) == [3]
  faults.assert_small_files_whole(workdir)
  _resume_equals_reference(workdir, reference, env, 3)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, env):
  """7(c): checkpoint 16's state files overwritten with garbage: the rerun warns naming step
  16, resumes from 15 and ends like the reference."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  files = [f for f in (workdir / "checkpoints" / "16" / "state").rglob("*") if f.is_file()]
  assert files
  for f in files:
    f.write_bytes(b"garbage!" * 16)
  out = faults.run(cmd(workdir, *BASE), env(), expect=0)
  text = out.stdout + out.stderr
  warned = [l for l in text.splitlines()
            if "16" in l and "checkpoint" in l.lower() and not l.startswith("resumed from")]
  assert warned, f"no warning naming checkpoint 16:\n{text[-3000:]}"
  assert "resumed from checkpoint at step 15" in out.stdout, out.stdout[-2000:]
  faults.assert_same_train(workdir, reference)
  faults.assert_same_eval(workdir, reference)


def test_small_files_complete_and_no_tmp_left(reference):
  """7(d): config.json and tokenizer.json are whole JSON documents; no *.tmp file is left (also
  checked after the SIGTERM and disk-full exits above)."""
  faults.assert_small_files_whole(reference)
