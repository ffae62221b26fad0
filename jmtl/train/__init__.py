"""jmtl.train: train state, jitted step, loop, checkpoints, metric writers."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient with train.on_nonfinite = 'halt'."""


class CheckpointError(OSError):
  """A checkpoint could not be saved or restored; the message names the step and directory.

  An OSError: like a failed write of any other run file, it is an environment failure (disk
  full, permissions, a bucket that went away), reported in one line with exit code 1.
  """


class EvalError(RuntimeError):
  """An evaluation failed; the message names the step and says its checkpoint is kept."""
