"""jmtl.train: train state, jitted step, loop, checkpoints, metric writers."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient with train.on_nonfinite = 'halt'."""
