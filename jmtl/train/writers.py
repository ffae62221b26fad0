"""Metric writers: `metrics.jsonl`, TensorBoard events, and a progress display.

`metrics.jsonl` holds one JSON object per line: `{"step": int, "split": "train"|"eval", ...}`;
a train line holds the means over the steps since the previous one (`window_means`).
On resume, lines for steps after the restored checkpoint are dropped first, so the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tqdm
from etils import epath


def _clean(v: float | int) -> float | int | None:
  """JSON has no NaN/inf: write them as null (the step is still recorded)."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def window_means(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean of each key over the steps of one logging window that have it with a finite value.

  A step logs only the tasks in its batch, so `train/<task>/loss` is that task's mean over
  the window's steps that trained it. Non-finite values (skipped updates) are left out; a key
  with no finite value keeps its last value (so a window of bad steps still shows as bad).
  """
  out: dict[str, float] = {}
  for key in dict.fromkeys(k for m in steps for k in m):
    values = [float(m[key]) for m in steps if key in m]
    finite = [v for v in values if math.isfinite(v)]
    out[key] = math.fsum(finite) / len(finite) if finite else values[-1]
  return out


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`).

  `workdir` is an `etils.epath` path (local or a bucket). Locally each line is appended; a
  bucket object cannot be appended to, so there the whole file is rewritten on each write (one
  atomic object write; metrics files are small).
  """

  def __init__(self, workdir: str | os.PathLike[str] | epath.Path, *, tensorboard: bool = True,
               purge_step: int | None = None):
    """`purge_step` (a resumed run: the checkpoint's step + 1) makes TensorBoard hide the
    events at steps >= it that earlier event files hold (logged after that checkpoint by the
    interrupted run; tensorboardX's `purge_step`, a SessionLog START event), as
    `truncate_after` does for metrics.jsonl."""
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._local = "://" not in str(self.path)
    self._lines: list[str] | None = None  # bucket: the file's lines, rewritten on each write
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      # tensorboardX names an event file `events.out.tfevents.<second>.<host>` and opens it
      # with mode "wb": a second writer opened within the same second in the same folder
      # (a restart right after a stop, a clock stepped back) would truncate the first one's
      # events. The suffix (wall-clock ns, then the process id) makes each name unique and
      # keeps the files of one second in the order they were opened, the order TensorBoard
      # reads them in (which `purge_step` relies on).
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tb"), purge_step=purge_step,
                               filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def truncate_after(self, step: int, *, eval_before: int | None = None) -> None:
    """Drops lines with `step` > `step` (left by a run killed after its last checkpoint), and
    eval lines at steps >= `eval_before` (evaluations that will run again).

    A line that is not valid JSON (torn by a kill mid-write) is dropped with a warning naming
    its line number.
    """
    lines = self._read_lines()
    if lines is None:
      return
    kept = []
    for lineno, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        row_step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        print(f"jmtl: warning: {self.path}:{lineno}: not a complete metrics line (torn by a "
              f"kill, or corrupted); dropped", file=sys.stderr, flush=True)
        continue
      if row_step > step:
        continue
      if eval_before is not None and row.get("split") == "eval" and row_step >= eval_before:
        continue
      kept.append(line)
    self._replace(kept)

  def _read_lines(self) -> list[str] | None:
    if not self.path.exists():
      return None
    return self.path.read_text().splitlines()

  def _replace(self, lines: list[str]) -> None:
    from jmtl.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    workdir_lib.write_text_atomic(self.path, "".join(line + "\n" for line in lines))
    if not self._local:
      self._lines = list(lines)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    row = {"step": int(step), "split": split}
    row.update({k: _clean(float(v)) for k, v in metrics.items()})
    line = json.dumps(row)
    if self._local:
      try:
        with open(self.path, "a", encoding="utf-8") as f:
          f.write(line + "\n")
      except OSError as e:  # e.g. disk full: name the file (f.write's error names none)
        raise OSError(e.errno, e.strerror, str(self.path)) from e
    else:
      if self._lines is None:
        self._lines = self._read_lines() or []
      self._replace(self._lines + [line])
    if self._tb is not None:
      for k, v in metrics.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(f"{split}/{k}" if split == "eval" else k, float(v), step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes TensorBoard; OSError naming `W/tb` when that fails (disk full).

    On failure the event writer is abandoned (its thread stopped, marked closed), so that
    tensorboardX's exit hook does not retry the write and print a traceback after jmtl's own
    one-line error.
    """
    tb, self._tb = self._tb, None
    if tb is None:
      return
    try:
      tb.close()
    except OSError as e:
      _abandon(tb)
      raise OSError(e.errno, f"cannot write TensorBoard events: {e.strerror or e}",
                    str(self.path.parent / "tb")) from e


def _abandon(tb: Any) -> None:
  """Stops a tensorboardX SummaryWriter whose file cannot be written, without writing."""
  for fw in (getattr(tb, "all_writers", None) or {}).values():
    ew = getattr(fw, "event_writer", None)
    if ew is None or getattr(ew, "_closed", True):
      continue
    worker = getattr(ew, "_worker", None)
    if worker is not None:
      worker.stop()
    ew._closed = True  # pylint: disable=protected-access - what its close() sets last


class NullWriter:
  """A MetricWriter that writes nothing: the processes other than process 0 of a multi-host
  run (only process 0 writes metrics.jsonl and TensorBoard)."""

  def truncate_after(self, step: int, *, eval_before: int | None = None) -> None:
    del step, eval_before

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    del step, split, metrics

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class Progress:
  """A tqdm bar on a terminal, plain periodic lines otherwise (mode: auto|bar|lines|none)."""

  def __init__(self, total: int, initial: int, mode: str = "auto"):
    if mode == "auto":
      mode = "bar" if sys.stderr.isatty() else "lines"
    self.mode, self.total = mode, total
    self._bar = None
    self._t0, self._s0 = time.time(), initial
    if mode == "bar":
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def start_clock(self, step: int) -> None:
    """Counts the ETA from here (after `step`): the first step's compilation is not a step."""
    self._t0, self._s0 = time.time(), step

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    if self.mode == "none":
      return
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
      self._bar.refresh()
      return
    done = step - self._s0
    elapsed = time.time() - self._t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s  "
          f"ETA {_fmt_seconds(eta)}", flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
