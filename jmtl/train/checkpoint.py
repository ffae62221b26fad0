"""Orbax checkpoints of the train state, the data-iterator position and loop bookkeeping.

Each checkpoint step holds three items: `state` (the TrainState pytree, restored directly onto
its shardings), `data` (the grain iterator state, JSON) and `meta` (JSON: the optimizer's
validation feed and counters, the unlogged part of the current log window, and the run's
fingerprint, `jmtl.train.workdir.fingerprint`). Orbax writes a step into a temporary directory
and renames it when complete, so a save killed half-way is invisible to `latest_step()`; the
writer (`read_only=False`) removes such leftovers when it starts, a reader never touches them.

Failures are named: a save that fails (now or in the background) raises `CheckpointError`
naming the step and the directory; `restore_latest` falls back to the previous step, with a
warning, when the newest one cannot be read. No step that holds a checkpoint is ever deleted
because it failed to restore (the failure may be transient: a bucket read error, memory): the
writer moves it aside, into `<directory>-unreadable/<step>` (see `unreadable_dir`), so that
training can write that step again and the files stay for inspection or a manual restore.

With several processes (each reads its own shards) the processes agree on every step they try:
a step counts as readable only if it reads on all of them, so all restore the same step, the
newest one every process can read (a step unreadable on one host only, e.g. a corrupt local
cache or a failed read there, is skipped by all).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import json

import jax
import orbax.checkpoint as ocp
from etils import epath

from jmtl.config import ConfigError
from jmtl.parallel import distributed
from jmtl.train import CheckpointError


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
  return line if len(line) <= limit else line[:limit - 3] + "..."


class Checkpointer:
  """Asynchronous saves, keep the last `keep` steps, restore onto given shardings.

  `read_only=True` (evaluation, the preflight's look at a workdir) never creates, deletes or
  cleans anything in `directory`.
  """

  def __init__(self, directory: str | epath.PathLike, *, keep: int = 1,
               read_only: bool = False):
    self.directory = epath.Path(directory)
    if not self.directory.is_absolute() and "://" not in str(directory):
      self.directory = epath.Path(self.directory.resolve())
    self.read_only = read_only
    # A reader is a manager that neither creates, cleans, prunes nor saves (orbax's own
    # read_only mode logs warnings on every use, which would break one-line error output).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "meta"))
    # The prefix of the barrier that ends each restore (Orbax's Checkpointer.restore), which a
    # process whose read failed joins (`_on_every_process`); the manager's checkpointer sets it
    # (orbax 0.12: "" rather than the options' None). Only a multi-process run joins it.
    self._barrier_prefix = None
    if distributed.multi_process():
      try:
        self._barrier_prefix = barrier_prefix(self._mngr)
      except BaseException:
        self._mngr.close()
        raise
    self._saving: int | None = None  # step of the save in flight, for error messages
    self._unreadable: list[int] = []  # steps restore_latest could not read (newest first)

  @property
  def unreadable_dir(self) -> epath.Path:
    """Where the writer moves steps that failed to restore: `<directory>-unreadable/`, beside
    the checkpoint directory (Orbax expects nothing but its own step folders inside it)."""
    return self.directory.parent / f"{self.directory.name}-unreadable"

  def remove_incomplete(self) -> None:
    """Removes step directories without orbax's `_CHECKPOINT_METADATA` (a kill while orbax was
    deleting an old step leaves part of one behind), and moves the steps `restore_latest`
    could not read into `unreadable_dir` (never deleted), each with a warning naming where.
    Call once the workdir's checkpoint is accepted, on process 0 only (never on a reader).

    Raises:
      CheckpointError: an unreadable step can be neither moved nor copied aside (it is then
        left in place, untouched).
    """
    if self.read_only:
      return
    for step in self._unreadable:
      self._set_aside(step)
    self._unreadable = []
    for step in self._mngr.all_steps():
      step_dir = self.directory / str(step)
      if step_dir.is_dir() and not (step_dir / "_CHECKPOINT_METADATA").exists():
        print(f"jmtl: warning: removing {step_dir}: an incomplete checkpoint (a run was killed "
              f"while deleting or writing it)", file=sys.stderr, flush=True)
        step_dir.rmtree()
    self._mngr.reload()

  def _set_aside(self, step: int) -> None:
    src = self.directory / str(step)
    if not src.exists():
      return
    aside = self.unreadable_dir
    dst, n = aside / str(step), 1
    while dst.exists():  # the same step failed before: keep both
      dst, n = aside / f"{step}.{n}", n + 1
    try:
      aside.mkdir(parents=True, exist_ok=True)
      try:
        src.rename(dst)
      except Exception:  # noqa: BLE001 - a bucket renames no folder: copy, then remove
        for f in sorted(src.rglob("*")):
          if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            f.copy(target)
        src.rmtree()
    except Exception as e:  # noqa: BLE001 - whatever failed, the step must not be lost
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored "
                            f"and cannot be moved aside to {dst} ({_first_line(e)}); move it "
                            f"out of {self.directory} by hand, then run again") from e
    print(f"jmtl: warning: moved the unreadable checkpoint at step {step} to {dst} (kept, not "
          f"deleted; this run writes step {step} again)", file=sys.stderr, flush=True)

  def reload(self) -> None:
    """Re-reads the directory (another process may have changed it)."""
    self._mngr.reload()

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def committed(self, step: int) -> bool:
    """Whether `step` is complete on disk (re-reads the directory, not the manager's cache)."""
    self._mngr.reload()
    return step in self._mngr.all_steps()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts an asynchronous save of `step` (a no-op if that step is already saved).

    Raises CheckpointError when this save cannot start or the previous one failed.
    """
    if self.read_only:
      raise CheckpointError(f"checkpoint save at step {step}: {self.directory} was opened "
                            f"read-only")
    self.wait()  # orbax waits for the previous save anyway; its failure is named with its step
    if step in self._mngr.all_steps():
      return
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta),
      ), force=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a failed save of `step`
      raise CheckpointError(f"checkpoint save at step {step} failed: {_first_line(e)} "
                            f"({self.directory})") from e
    self._saving = step

  def _background(self, call: Callable[[], Any]) -> None:
    """Runs an orbax call that reports a failed background save; names that save's step."""
    try:
      call()
    except Exception as e:  # noqa: BLE001 - whatever orbax raises, it is this save's failure
      raise CheckpointError(f"checkpoint save at step {self._saving} failed: {_first_line(e)} "
                            f"({self.directory})") from e

  def check(self) -> None:
    """Raises CheckpointError if a background save has failed (does not block)."""
    self._background(self._mngr.check_for_errors)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed; CheckpointError if one failed."""
    self._background(self._mngr.wait_until_finished)
    self.check()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores `step`; `abstract_state` holds ShapeDtypeStructs carrying the target shardings."""
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return restored["state"], restored["data"], restored["meta"]

  def restore_meta(self, step: int) -> dict:
    """Restores only the `meta` item of `step` (cheap: no arrays)."""
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any, *, check: Callable[[int, dict], None] | None = None
                     ) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest step that can be read, newest first; None when there is none.

    A step that fails to restore is reported on stderr (`jmtl: warning: ...` naming the step)
    and the previous one is tried. Nothing is deleted, moved or written here: unless
    read-only, the unreadable steps are remembered and `remove_incomplete` (the writer, once
    the run is accepted) moves them into `unreadable_dir`, so that training can write those
    steps again without losing them. `check(step, meta)` runs on the meta item before the
    state is read (it raises ConfigError to refuse the checkpoint: the run's fingerprint); with
    several processes the refusal is decided together (`distributed.decide_together`): when
    one process refuses, every process raises the same ConfigError naming it, and none enters
    Orbax's restore (whose barrier would wait for the refusing one forever). Raises
    CheckpointError when steps exist but none can be restored.

    With several processes every process must call this at the same point: the steps tried
    are those any process sees, and a step is used only if it reads on every process (each
    read is followed by an all-gather of the outcome), so all processes restore the same step.
    """
    steps = self._steps_seen_by_any_process()
    bad: list[int] = []
    failures = []
    for step in steps:
      meta, error = self._on_every_process(step, lambda s=step: self.restore_meta(s))
      if error is not None:
        failures.append((step, error))
        bad.append(step)
        continue
      if check is not None:  # every process's verdict, agreed before any enters the restore
        distributed.decide_together(lambda s=step, m=meta: check(s, m), ConfigError)
      restored, error = self._on_every_process(
          step, lambda s=step: self.restore(s, abstract_state))
      if error is not None:
        failures.append((step, error))
        bad.append(step)
        continue
      state, data, meta = restored
      for s, e in failures:
        print(f"jmtl: warning: checkpoint at step {s} in {self.directory} cannot be restored "
              f"({_first_line(e)}); using step {step}", file=sys.stderr, flush=True)
      if not self.read_only:
        self._unreadable = bad
      return step, state, data, meta
    if failures:
      s, e = failures[0]
      raise CheckpointError(f"no checkpoint in {self.directory} can be restored (step {s}: "
                            f"{_first_line(e)}; tried steps {steps})")
    return None

  def _steps_seen_by_any_process(self) -> list[int]:
    """The steps in the directory, newest first; with several processes the union of what each
    sees (a step one process does not see then fails there, in `_on_every_process`)."""
    mine = sorted(self._mngr.all_steps())
    if not distributed.multi_process():
      return mine[::-1]
    seen = {s for text in distributed.gather_text(json.dumps(mine)) for s in json.loads(text)}
    return sorted(seen, reverse=True)

  def _on_every_process(self, step: int, read: Callable[[], Any]
                        ) -> tuple[Any, BaseException | None]:
    """(`read()`, None) when it succeeds on every process, else (None, the error: this
    process's own, or a CheckpointError naming the processes where it failed).

    Orbax ends a restore with a barrier across all processes; a process whose read failed has
    not reached it while its peers that read the step wait there, so it joins that barrier
    (same name) before the all-gather of the outcomes: every process then makes the same calls
    in the same order, and none waits forever.
    """
    try:
      if step not in self._mngr.all_steps():
        raise FileNotFoundError(f"step {step} is not visible on process {jax.process_index()}")
      out, error = read(), None
    except Exception as e:  # noqa: BLE001 - any failure makes the step unreadable here
      out, error = None, e
      if distributed.multi_process():
        ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key(
            "Checkpointer:restore", prefix=self._barrier_prefix))
    if not distributed.multi_process():
      return out, error
    failed = [p for p, f in enumerate(distributed.gather_int(int(error is not None))) if f]
    if error is None and failed:
      return None, CheckpointError(f"step {step} cannot be read on process(es) "
                                   f"{', '.join(map(str, failed))}")
    return out, error

  def read_latest_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose meta item reads; None when there is none."""
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        return step, self.restore_meta(step)
      except Exception:  # noqa: BLE001 - restore_latest reports and skips it too
        continue
    return None

  def close(self) -> None:
    """Waits for pending saves, then releases the manager; CheckpointError if a save failed."""
    try:
      self.wait()
    finally:
      self._mngr.close()


def barrier_prefix(manager: Any) -> str | None:
  """The barrier name prefix Orbax's restore ends with: the private `_barrier_sync_key_prefix`
  of `manager`'s checkpointer (orbax-checkpoint 0.12). A process whose read failed must join
  that very barrier, so an Orbax without it is an error, not a guessed name (which would leave
  the other processes waiting at Orbax's barrier until its timeout).

  Raises:
    CheckpointError: the attribute is missing (naming the installed orbax-checkpoint version).
  """
  checkpointer = getattr(manager, "_checkpointer", None)
  if not hasattr(checkpointer, "_barrier_sync_key_prefix"):
    raise CheckpointError(
        f"orbax-checkpoint {getattr(ocp, '__version__', '?')}: its CheckpointManager's "
        f"checkpointer has no `_barrier_sync_key_prefix`, the name of the barrier a multi-process "
        f"restore ends with (orbax-checkpoint 0.12 has it): install orbax-checkpoint 0.12")
  return checkpointer._barrier_sync_key_prefix  # noqa: SLF001


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` with `shardings`, the target of a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      shardings)
