"""The run directory: one `etils.epath` path (local or a bucket), an exclusive lock, atomic
small files, and the check that a checkpoint in it belongs to the config being run."""

from __future__ import annotations

from typing import Any


def preflight(config: Any, workdir: str, command: str) -> None:
  """Everything about `workdir` the config alone can tell, before any work (raises ConfigError).

  command "train": the workdir (or its parent) is writable, not a file, `checkpoints` is not a
  file, and a checkpoint already in it was trained with a compatible config.
  command "eval": it holds a complete checkpoint of a compatible config.
  """
  del config, workdir, command  # filled in by the loop-reliability work
