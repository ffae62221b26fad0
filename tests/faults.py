"""Helpers of the end-to-end fault tests: run `jmtl` through tests/fault_run.py with a fault,
signal it at a logged step, and read back what the run left in its workdir."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
RUNNER = REPO / "tests" / "fault_run.py"
TIMEOUT = 600
SIGNAL_LINE = re.compile(r"received signal (\d+): saved checkpoint at step (\d+), exiting")


def cmd(workdir: str | os.PathLike[str], *extra: str, command: str = "train",
        config: str | os.PathLike[str] = TINY) -> list[str]:
  """`jmtl COMMAND --config CONFIG --workdir WORKDIR EXTRA...` run through the fault runner."""
  return [sys.executable, str(RUNNER), command, "--config", str(config), "--workdir",
          str(workdir), *extra]


def env(data_dir: str | os.PathLike[str], fault: str = "", *, trace: str | None = None,
        cache: str | os.PathLike[str] | None = None) -> dict[str, str]:
  """The subprocess environment: 2 CPU devices, the data root, the fault spec (JMTL_FAULT), an
  optional trace file, and an optional shared JAX compilation cache (saves most of each run's
  start-up; the compiled programs, hence the numbers, are the same)."""
  out = dict(os.environ)
  out["JMTL_DATA_DIR"] = str(data_dir)
  out["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  out["JAX_PLATFORMS"] = "cpu"
  out["JMTL_FAULT"] = fault
  out.pop("JMTL_FAULT_TRACE", None)
  if trace:
    out["JMTL_FAULT_TRACE"] = str(trace)
  if cache:
    out["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return out


class Job:
  """A started command; stdout and stderr go to files (a pipe nobody reads could block it)."""

  def __init__(self, argv: Sequence[str], environ: Mapping[str, str], *,
               cwd: str | os.PathLike[str] = REPO, logs: str | os.PathLike[str]):
    logs = pathlib.Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    self.out_path, self.err_path = logs / f"{n}.out", logs / f"{n}.err"
    self.argv = list(argv)
    with self.out_path.open("w") as out, self.err_path.open("w") as err:
      self.proc = subprocess.Popen(self.argv, env=dict(environ), cwd=cwd, stdout=out,
                                   stderr=err, text=True)

  def poll(self) -> int | None:
    return self.proc.poll()

  def signal(self, sig: int) -> None:
    self.proc.send_signal(sig)

  def wait(self, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f"timed out after {timeout} s: {self.argv}\n"
                           f"{self.err_path.read_text()[-3000:]}")
    return subprocess.CompletedProcess(self.argv, rc, self.out_path.read_text(),
                                       self.err_path.read_text())


def run(argv: Sequence[str], environ: Mapping[str, str], *, cwd: str | os.PathLike[str] = REPO,
        timeout: float = TIMEOUT, expect: int | None = None) -> subprocess.CompletedProcess:
  """Runs to the end; with `expect`, asserts the exit code (showing stderr if it differs)."""
  try:
    proc = subprocess.run(list(argv), env=dict(environ), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"timed out after {timeout} s: {argv}") from e
  if expect is not None:
    assert proc.returncode == expect, (
        f"exit {proc.returncode}, expected {expect}\nstdout: {proc.stdout[-2000:]}\n"
        f"stderr: {proc.stderr[-3000:]}")
  return proc


def wait_until(predicate: Callable[[], bool], job: Job | None = None, *,
               timeout: float = 300, what: str = "condition") -> None:
  """Polls `predicate` every 10 ms; fails if `job` ends first or `timeout` passes."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return
    if job is not None and job.poll() is not None:
      if predicate():
        return
      res = job.wait()
      raise AssertionError(f"the run ended (exit {res.returncode}) before {what}\n"
                           f"stderr: {res.stderr[-3000:]}")
    time.sleep(0.01)
  if job is not None:
    job.proc.kill()
    job.proc.wait()
  raise AssertionError(f"{what} not reached in {timeout} s")


def signal_when(job: Job, predicate: Callable[[], bool], sig: int = signal.SIGKILL, *,
                timeout: float = 300, what: str = "condition") -> subprocess.CompletedProcess:
  """Sends `sig` as soon as `predicate` holds and waits for the end of the run."""
  wait_until(predicate, job, timeout=timeout, what=what)
  job.signal(sig)
  return job.wait()


def signal_at_logged_step(job: Job, workdir: str | os.PathLike[str], step: int,
                          sig: int = signal.SIGKILL, **kw) -> subprocess.CompletedProcess:
  """Sends `sig` once metrics.jsonl logs a step >= `step`."""
  return signal_when(job, lambda: logged_step(workdir) >= step, sig,
                     what=f"a logged step >= {step}", **kw)


def metric_rows(workdir: str | os.PathLike[str]) -> list[dict]:
  """The complete lines of metrics.jsonl (a torn last line is left out)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def logged_step(workdir: str | os.PathLike[str]) -> int:
  return max((r["step"] for r in metric_rows(workdir)), default=0)


def train_rows(workdir: str | os.PathLike[str]) -> dict[int, dict]:
  """step -> train line of metrics.jsonl; every line must be valid JSON and no step repeated."""
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  assert not text or text.endswith("\n"), f"metrics.jsonl ends in a torn line: {text[-200:]!r}"
  rows = [json.loads(line) for line in text.splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  steps = [r["step"] for r in train]
  assert len(steps) == len(set(steps)), f"duplicate train steps in metrics.jsonl: {steps}"
  return {r["step"]: r for r in train}


def losses(workdir: str | os.PathLike[str]) -> dict[int, float]:
  return {s: r["train/loss"] for s, r in train_rows(workdir).items()}


def _compared(key: str) -> bool:
  """The train-line values an interrupted run must reproduce: losses, grad_norm, skip count
  (not timings such as train/tokens_per_s)."""
  return key.endswith("/loss") or key in ("grad_norm", "train/skipped_steps")


def assert_same_train(workdir: str | os.PathLike[str], reference: str | os.PathLike[str],
                      rel: float = 1e-6) -> None:
  """The train lines of `workdir` are at the reference's steps and hold its values (losses,
  grad_norm, train/skipped_steps)."""
  got, ref = train_rows(workdir), train_rows(reference)
  assert sorted(got) == sorted(ref), f"train lines at steps {sorted(got)}, want {sorted(ref)}"
  for step, want in ref.items():
    for key, value in want.items():
      if not _compared(key):
        continue
      assert key in got[step], f"step {step}: {key} missing"
      have = got[step][key]
      if value is None or have is None:
        assert have == value, (step, key, have, value)
      else:
        assert math.isclose(have, value, rel_tol=rel, abs_tol=1e-9), (step, key, have, value)


def eval_json(workdir: str | os.PathLike[str]) -> dict:
  return json.loads((pathlib.Path(workdir) / "eval.json").read_text())


def assert_same_eval(workdir, reference, rel: float = 1e-6) -> None:
  got, want = eval_json(workdir), eval_json(reference)
  assert sorted(got) == sorted(want), (sorted(got), sorted(want))
  for key, value in want.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-9), (key, got[key], value)
    else:
      assert got[key] == value, (key, got[key], value)


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
  """Committed checkpoints: the digit-named directories under W/checkpoints."""
  path = pathlib.Path(workdir) / "checkpoints"
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def temporary_checkpoints(workdir: str | os.PathLike[str]) -> list[str]:
  """Half-written saves: entries of W/checkpoints that are not digit-named (orbax's
  `<step>.orbax-checkpoint-tmp-<n>`)."""
  path = pathlib.Path(workdir) / "checkpoints"
  if not path.is_dir():
    return []
  return sorted(p.name for p in path.iterdir() if "tmp" in p.name)


def assert_small_files_whole(workdir: str | os.PathLike[str]) -> None:
  """config.json and tokenizer.json (and eval.json, when there) are complete JSON documents and
  no `*.tmp` file (a half-done atomic write) is left anywhere in the workdir."""
  workdir = pathlib.Path(workdir)
  for name in ("config.json", "tokenizer.json", "eval.json"):
    path = workdir / name
    if name != "eval.json" or path.exists():
      try:
        json.loads(path.read_text())
      except (OSError, ValueError) as e:
        raise AssertionError(f"{path} is not a complete JSON document: {e}") from e
  left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*.tmp"))
  assert not left, f"temporary files left in the workdir: {left}"


def one_error_line(stderr: str) -> str:
  """stderr is exactly one line, starting with 'jmtl: ' (nothing else: no traceback, no absl
  or JAX warning); returns it."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("jmtl: "), (
      f"stderr should be one 'jmtl: ' line, got {len(lines)} lines:\n{stderr[-3000:]}")
  return lines[0]


def signal_step(text: str, sig: int = signal.SIGTERM) -> int:
  """N from the line `received signal SIG: saved checkpoint at step N, exiting` in `text`."""
  found = [m for m in SIGNAL_LINE.finditer(text) if int(m.group(1)) == sig]
  assert found, (f"no 'received signal {sig}: saved checkpoint at step N, exiting' line in:\n"
                 f"{text[-3000:]}")
  return int(found[-1].group(2))


def read_trace(path: str | os.PathLike[str]) -> list[str]:
  path = pathlib.Path(path)
  return path.read_text().splitlines() if path.exists() else []


def cli_error_line(capsys, argv, code: int = 2) -> str:
  """Runs `jmtl ARGV...` in-process; asserts it exits `code` with exactly one `jmtl: error:`
  line on stderr and no traceback; returns that line."""
  import pytest  # noqa: PLC0415
  from jmtl import cli  # noqa: PLC0415
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", *argv])
  assert exit_info.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("jmtl: error: "), err
  assert "Traceback" not in err[0]
  return err[0]


def cli_in_process(argv: Sequence[str], capfd, monkeypatch, environ: Mapping[str, str] = (),
                   cwd: str | os.PathLike[str] = REPO) -> subprocess.CompletedProcess:
  """`jmtl ARGV...` run in this process as `python -m jmtl.cli` runs it (`cli.main`, its
  SystemExit code), in `cwd` with `environ` set; stdout and stderr are read at the file
  descriptors (C++ and absl output included) and a Python warning raised during the call is
  written to the returned stderr (a subprocess would print it there). For checks that end
  before any real work (a config error): no interpreter start and no jax import per case."""
  import warnings  # noqa: PLC0415
  from jmtl import cli  # noqa: PLC0415
  for key, value in dict(environ).items():
    monkeypatch.setenv(key, value)
  monkeypatch.chdir(cwd)
  capfd.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      cli.main(["jmtl", *argv])
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  out = capfd.readouterr()
  err = out.err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
  return subprocess.CompletedProcess(["jmtl", *argv], code, out.out, err)
