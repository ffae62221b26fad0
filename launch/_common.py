"""Shared helpers for the launch scripts (Python standard library only; never imports jmtl).

A script builds a *plan*: a list of steps. A step is one local command (an argv list) or a
group of commands that run at the same time (one per TPU slice), or a poll (a command re-run
until its output is one of the wanted values). `--dry-run` prints every command of the plan,
one per line, shell-quoted so that it can be copy-pasted, and runs nothing; without it the plan
runs step by step and stops at the first command that fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(Exception):
  """A problem the user must fix; printed as one line, exit status 2."""


@dataclasses.dataclass
class Poll:
  """Re-run `argv` every `every_s` seconds until its stdout (stripped) is in `until`.

  Fails as soon as the output is in `fail_on`, or after `timeout_s`.
  """
  argv: list[str]
  until: tuple[str, ...]
  fail_on: tuple[str, ...] = ()
  every_s: float = 30.0
  timeout_s: float | None = None

  def line(self) -> str:
    return (f"{shlex.join(self.argv)}  # repeated every {self.every_s:g} s until it prints "
            + " or ".join(self.until))


@dataclasses.dataclass
class Parallel:
  """Commands started together; the step succeeds when all of them do."""
  argvs: list[list[str]]




def lines(plan: list) -> list[str]:
  out = []
  for step in plan:
    if isinstance(step, Poll):
      out.append(step.line())
    elif isinstance(step, Parallel):
      out.extend(shlex.join(a) for a in step.argvs)
    else:
      out.append(shlex.join(step))
  return out


def _run_poll(p: Poll) -> None:
  start = time.monotonic()
  while True:
    r = subprocess.run(p.argv, capture_output=True, text=True)
    state = r.stdout.strip()
    if r.returncode == 0 and state in p.until:
      print(f"[launch] {state}", flush=True)
      return
    if state in p.fail_on:
      raise LaunchError(f"{shlex.join(p.argv)} printed {state}")
    if p.timeout_s is not None and time.monotonic() - start > p.timeout_s:
      raise LaunchError(f"still {state or r.stderr.strip()!r} after {p.timeout_s:g} s: {shlex.join(p.argv)}")
    print(f"[launch] state {state or '?'}; waiting {p.every_s:g} s", flush=True)
    time.sleep(p.every_s)


def run_plan(plan: list, dry_run: bool) -> int:
  if dry_run:
    for line in lines(plan):
      print(line)
    return 0
  for step in plan:
    if isinstance(step, Poll):
      print(f"[launch] {step.line()}", flush=True)
      _run_poll(step)
    elif isinstance(step, Parallel):
      procs = []
      for argv in step.argvs:
        print(f"[launch] {shlex.join(argv)}", flush=True)
        procs.append((argv, subprocess.Popen(argv)))
      failed = [(a, p.wait()) for a, p in procs]
      failed = [(a, rc) for a, rc in failed if rc != 0]
      if failed:
        a, rc = failed[0]
        print(f"[launch] failed (exit {rc}): {shlex.join(a)}", file=sys.stderr)
        return rc
    else:
      print(f"[launch] {shlex.join(step)}", flush=True)
      rc = subprocess.call(step)
      if rc != 0:
        print(f"[launch] failed (exit {rc}): {shlex.join(step)}", file=sys.stderr)
        return rc
  return 0


class Parser(argparse.ArgumentParser):
  """argparse with one clear line (and exit status 2) for a usage error."""

  def error(self, message: str):  # noqa: D102
    self.exit(2, f"{self.prog}: error: {message}\n")


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits `a b -- c d` into ([a, b], [c, d]).

  `--dry-run` after `--` is refused rather than passed on: a misplaced --dry-run must never
  turn into a real launch.
  """
  if "--" in argv:
    i = argv.index("--")
    own, extra = argv[:i], argv[i + 1:]
    if "--dry-run" in extra:
      raise LaunchError("--dry-run must come before --")
    return own, extra
  return argv, []


def parse_env(pairs: list[str]) -> list[str]:
  for p in pairs:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", p):
      raise LaunchError(f"--env wants KEY=VALUE, got {p!r}")
  return pairs


def git(*args: str) -> str:
  r = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
  if r.returncode != 0:
    raise LaunchError(f"git {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
  return r.stdout.strip()


def head_commit() -> str:
  return git("rev-parse", "HEAD")


def jax_requirement(commit: str | None = None) -> str:
  """The `jax` requirement of pyproject.toml (at `commit` if given), e.g. 'jax>=0.10.2,<0.11'."""
  if commit is not None:
    text = git("show", f"{commit}:pyproject.toml")
  else:
    text = (REPO_ROOT / "pyproject.toml").read_text()
  m = re.search(r'["\'](jax\s*(?:[<>=!~][^"\']*)?)["\']', text)
  if not m:
    raise LaunchError("no jax requirement in pyproject.toml dependencies")
  return re.sub(r"\s+", "", m.group(1))


def tpu_names():
  """jmtl/tpu_names.py, the table of TPU generations `jmtl compile` also reads, loaded by path
  (standard library only: neither jmtl nor jax is imported)."""
  import importlib.util  # noqa: PLC0415
  path = REPO_ROOT / "jmtl" / "tpu_names.py"
  spec = importlib.util.spec_from_file_location("_jmtl_tpu_names", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses looks the module up while the file runs
  spec.loader.exec_module(module)
  return module


def check_config(config: str, base: str | os.PathLike[str] | None = None) -> None:
  """LaunchError unless `config` (relative to `base`, default the current directory) is a file
  here: a typo must not cost a queued job or a slice's start-up."""
  path = Path(base or ".") / config
  if not path.is_file():
    where = f" (relative to {base})" if base is not None and not Path(config).is_absolute() else ""
    raise LaunchError(f"--config {config}: no such file{where}")


def check_uri(flag: str, path: str) -> None:
  """LaunchError for `name:/...` (a URI missing a slash, e.g. gs:/b/x for gs://b/x), which jmtl
  would take for a local folder."""
  m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", path)
  if m:
    raise LaunchError(f"{flag} {path}: looks like a URI missing a slash (did you mean "
                      f"{m.group(1)}://{path.split(':/', 1)[1]}?)")


def main_wrapper(fn, argv: list[str] | None = None) -> int:
  try:
    return fn(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:  # `--dry-run | head -1`: the reader left; no traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush
    return 141  # 128 + SIGPIPE, as a shell reports it


def positive(value: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
  return n


def nonneg(value: str) -> int:
  """argparse type: an integer >= 0."""
  try:
    n = int(value)
  except ValueError:
    n = -1
  if n < 0:
    raise argparse.ArgumentTypeError(f"{value!r} is not a non-negative integer")
  return n


def fraction(value: str) -> float:
  """argparse type: a float in (0, 1]."""
  try:
    x = float(value)
  except ValueError:
    x = -1.0
  if not 0.0 < x <= 1.0:
    raise argparse.ArgumentTypeError(f"{value!r} is not in (0, 1]")
  return x
