"""Runs the `jmtl` command with a fault injected (tests only; production code has no hooks).

  JMTL_FAULT="nan_at=7,sigterm_at=8" python tests/fault_run.py train --config C --workdir W ...

`JMTL_FAULT` holds comma-separated faults (empty or unset: none, a plain `jmtl` run):

  nan_at=K             the batch of training step K gets example_weight NaN (a NaN loss)
  sigterm_at=K         SIGTERM to this process when the batch of training step K is produced
                       (a prefetching loop produces it a step or two early: "around" step K)
  sigterm_again=S      after each injected SIGTERM, a second one S seconds later
  sigterm_in_save=K    SIGTERM from inside Checkpointer.save(K), before the save starts
  enospc_at_save=K     Checkpointer.save(K) raises OSError(ENOSPC) (the disk is full)
  sleep_in_save=S      every Checkpointer.save sleeps S seconds first
  step_sleep=S         every training batch takes S seconds more to produce (a slow run)
  hold_at=K:PATH       the batch of training step K is not produced until the file PATH exists
                       (the run waits there: a test can act on a run in progress, then let go)
  eval_error[=N]       evaluate_task raises RuntimeError at its N-th call (without N: every call)
  sigterm_in_eval[=N]  SIGTERM at evaluate_task's N-th call (default 1); the call goes on
  sigterm_in_close     SIGTERM when the run closes its (writing) Checkpointer, the closer that
                       waits for the last save to commit; the close goes on
  sigterm_after_run    SIGTERM as soon as `train` / `federated` has returned (its handlers
                       removed), before the command prints its final line

Training step K is the 1-based step whose batch is `TrainIterator.__next__` with
`self.step == K - 1`. With `JMTL_FAULT_TRACE=FILE`, the runner appends one line per produced
batch (`batch K`), save call (`save K`), evaluate_task call (`eval N`) and injected fault.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time

_MAIN_PID = os.getpid()  # a batch may be produced in a prefetch thread: signal the process
_lock = threading.Lock()


def parse(spec: str) -> dict[str, str]:
  """"a=1,b" -> {"a": "1", "b": ""}."""
  out = {}
  for part in spec.split(","):
    part = part.strip()
    if part:
      key, _, value = part.partition("=")
      out[key.strip()] = value.strip()
  return out


def _trace(line: str) -> None:
  path = os.environ.get("JMTL_FAULT_TRACE")
  if path:
    with _lock, open(path, "a") as f:
      f.write(line + "\n")


def _sigterm(faults: dict[str, str], why: str) -> None:
  _trace(f"sigterm {why}")
  os.kill(_MAIN_PID, signal.SIGTERM)
  if "sigterm_again" in faults:
    delay = float(faults["sigterm_again"] or 0.05)

    def again():
      _trace(f"sigterm again {why}")
      os.kill(_MAIN_PID, signal.SIGTERM)

    t = threading.Timer(delay, again)
    t.daemon = True
    t.start()


def install(faults: dict[str, str]) -> None:
  """Monkeypatches jmtl for `faults` (and the trace file, if any)."""
  import numpy as np

  from jmtl.data import pipeline
  from jmtl.train import checkpoint
  from jmtl.train import evaluate

  fired: set[str] = set()

  def once(key: str) -> bool:
    with _lock:
      if key in fired:
        return False
      fired.add(key)
      return True

  orig_next = pipeline.TrainIterator.__next__

  def next_(self):
    step = self.step + 1
    if "step_sleep" in faults:
      time.sleep(float(faults["step_sleep"]))
    if "hold_at" in faults:
      at, _, path = faults["hold_at"].partition(":")
      if step == int(at):
        _trace(f"hold {step}")
        while not os.path.exists(path):
          time.sleep(0.05)
    batch = orig_next(self)
    _trace(f"batch {step}")
    if "nan_at" in faults and step == int(faults["nan_at"]):
      _trace(f"nan {step}")
      batch = {task: {**tb, "example_weight": np.full(np.shape(tb["example_weight"]), np.nan,
                                                       np.float32)}
               for task, tb in batch.items()}
    if "sigterm_at" in faults and step == int(faults["sigterm_at"]) and once("sigterm_at"):
      _sigterm(faults, f"batch {step}")
    return batch

  pipeline.TrainIterator.__next__ = next_

  orig_save = checkpoint.Checkpointer.save

  def save(self, *args, **kwargs):
    step = int(args[0] if args else kwargs["step"])
    _trace(f"save {step}")
    if "sleep_in_save" in faults:
      time.sleep(float(faults["sleep_in_save"]))
    if "enospc_at_save" in faults and step == int(faults["enospc_at_save"]):
      _trace(f"enospc {step}")
      raise OSError(errno.ENOSPC, "No space left on device")
    if ("sigterm_in_save" in faults and step == int(faults["sigterm_in_save"])
        and once("sigterm_in_save")):
      _sigterm(faults, f"save {step}")
    return orig_save(self, *args, **kwargs)

  checkpoint.Checkpointer.save = save

  orig_close = checkpoint.Checkpointer.close

  def close(self):
    if "sigterm_in_close" in faults and not self.read_only and once("sigterm_in_close"):
      _sigterm(faults, "close")
    return orig_close(self)

  checkpoint.Checkpointer.close = close

  if "sigterm_after_run" in faults:
    import jmtl.federated.loop as fed_loop  # pylint: disable=import-outside-toplevel
    import jmtl.train.loop as train_loop  # pylint: disable=import-outside-toplevel

    def after(run):
      def wrapped(*args, **kwargs):
        out = run(*args, **kwargs)
        _sigterm(faults, "after run")
        return out
      return wrapped

    train_loop.train = after(train_loop.train)
    fed_loop.federated = after(fed_loop.federated)

  orig_eval = evaluate.evaluate_task
  calls = [0]

  def evaluate_task(*args, **kwargs):
    with _lock:
      calls[0] += 1
      n = calls[0]
    _trace(f"eval {n}")
    if "eval_error" in faults and (not faults["eval_error"] or n == int(faults["eval_error"])):
      _trace(f"eval_error {n}")
      raise RuntimeError("injected eval failure")
    if "sigterm_in_eval" in faults and n == int(faults["sigterm_in_eval"] or 1):
      _sigterm(faults, f"eval {n}")
    return orig_eval(*args, **kwargs)

  evaluate.evaluate_task = evaluate_task
  # A module that imported the function by name would not see the patch: rebind it there too.
  for name in ("jmtl.train.loop",):
    module = sys.modules.get(name)
    if module is not None and getattr(module, "evaluate_task", None) is orig_eval:
      module.evaluate_task = evaluate_task


def main() -> None:
  faults = parse(os.environ.get("JMTL_FAULT", ""))
  if faults or os.environ.get("JMTL_FAULT_TRACE"):
    import jmtl.train.loop  # noqa: F401  (imported first, so `install` can rebind its names)
    install(faults)
  from jmtl import cli
  cli.main(["jmtl", *sys.argv[1:]])


if __name__ == "__main__":
  main()
