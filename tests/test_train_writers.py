"""Train-line window means (`jmtl.train.writers.window_means`) on hand-computed examples."""

import math

from jmtl.train import writers


def test_window_means_per_key_over_the_steps_that_have_it():
  steps = [{"train/loss": 1.0, "train/a/loss": 1.0, "grad_norm": 2.0},
           {"train/loss": 3.0, "train/b/loss": 3.0, "grad_norm": 4.0},
           {"train/loss": 5.0, "train/a/loss": 5.0, "grad_norm": 6.0}]
  assert writers.window_means(steps) == {"train/loss": 3.0, "train/a/loss": 3.0,
                                         "train/b/loss": 3.0, "grad_norm": 4.0}


def test_window_means_leave_out_non_finite_steps():
  steps = [{"train/loss": 2.0}, {"train/loss": math.inf}, {"train/loss": 4.0}]
  assert writers.window_means(steps) == {"train/loss": 3.0}
  bad = writers.window_means([{"train/loss": 1.0, "train/a/loss": math.nan},
                              {"train/loss": math.inf}])
  assert bad["train/loss"] == 1.0 and math.isnan(bad["train/a/loss"])
  assert math.isnan(writers.window_means([{"x": math.inf}, {"x": math.nan}])["x"])  # the last


def test_tensorboard_that_cannot_be_written_fails_once_naming_tb(tmp_path):
  """A full disk at close: one OSError naming W/tb, and no traceback from tensorboardX's exit
  hook retrying the write afterwards (checked in a fresh interpreter, whose stderr must stay
  empty)."""
  script = f"""
import errno, sys
from jmtl.train import writers
w = writers.MetricWriter({str(tmp_path)!r})
w.write(1, "train", {{"train/loss": 1.0}})
fw = next(iter(w._tb.all_writers.values()))
def full(*a, **k):
  raise OSError(errno.ENOSPC, "No space left on device")
fw.event_writer._ev_writer.flush = full
try:
  w.close()
except OSError as e:
  print("raised", e.errno, e.filename)
else:
  print("no error")
"""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == f"raised 28 {tmp_path / 'tb'}", out.stdout
  assert out.stderr.strip() == "", out.stderr
