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


def _events(folder):
  """Every Event in the TFRecord event files of `folder` (length, crc, data, crc framing)."""
  import struct

  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      out.append(event)
      i += 12 + n + 4
  return out


def test_resumed_writer_purges_tensorboard_events_after_the_checkpoint(tmp_path):
  first = writers.MetricWriter(tmp_path)
  for step in (2, 4, 6):
    first.write(step, "train", {"train/loss": float(step)})
  first.close()
  import time
  time.sleep(1.1)  # event files are named by the second they were opened in
  # A run resumed from the checkpoint at step 3 writes a START session log at step 4, which
  # TensorBoard reads as "drop the earlier events at steps >= 4".
  second = writers.MetricWriter(tmp_path, purge_step=4)
  second.write(4, "train", {"train/loss": 40.0})
  second.close()
  events = _events(tmp_path / "tb")
  starts = [e.step for e in events if e.HasField("session_log")
            and e.session_log.status == e.session_log.START]
  assert starts == [4]
  scalars = [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")]
  assert scalars == [(2, 2.0), (4, 4.0), (6, 6.0), (4, 40.0)]


def test_two_writers_opened_within_one_second_keep_both_event_files(tmp_path, monkeypatch):
  """tensorboardX names event files by the second (and host) and opens them with "wb": two
  writers of one workdir opened within the same second (here: the clock tensorboardX reads
  is frozen) must still write two files, read in opening order, so the first run's events
  survive and the resumed run's purge applies after them."""
  import types

  from tensorboardX import event_file_writer
  monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
  first = writers.MetricWriter(tmp_path)
  for step in (2, 4, 6):
    first.write(step, "train", {"train/loss": float(step)})
  first.close()
  second = writers.MetricWriter(tmp_path, purge_step=4)
  second.write(4, "train", {"train/loss": 40.0})
  second.close()
  files = sorted((tmp_path / "tb").glob("events.out.tfevents.1700000000.*"))
  assert len(files) == 2, files
  events = _events(tmp_path / "tb")
  scalars = [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")]
  assert scalars == [(2, 2.0), (4, 4.0), (6, 6.0), (4, 40.0)]
