"""Orbax checkpoints of the train state, the data-iterator position and loop bookkeeping.

Each checkpoint step holds three items: `state` (the TrainState pytree, restored directly onto
its shardings), `data` (the grain iterator state, JSON) and `meta` (JSON: the optimizer's
validation feed and counters). Orbax writes a step into a temporary directory and renames it
when complete, so a save killed half-way is invisible to `latest_step()` and cleaned up on the
next start.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Asynchronous saves, keep the last `keep` steps, restore onto given shardings."""

  def __init__(self, directory: str | os.PathLike[str], *, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts an asynchronous save of `step` (a no-op if that step is already saved)."""
    if step in self._mngr.all_steps():
      return
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
    ), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores `step`; `abstract_state` holds ShapeDtypeStructs carrying the target shardings."""
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return restored["state"], restored["data"], restored["meta"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` with `shardings`, the target of a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      shardings)
