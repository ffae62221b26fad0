"""A resumed federated run hides the interrupted run's TensorBoard events after its checkpoint,
as the trainer does (metrics.jsonl is trimmed by `truncate_after`; TensorBoard needs a START
session log at the checkpoint's round + 1, tensorboardX's `purge_step`)."""

import pathlib

import pytest

import faults
from jmtl.train import writers
from test_train_writers import _events

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_fed.py"
FAST = ("--config.tasks=bbc_topic", "--config.fed.eval_every=0")


def _env(data_dir):
  env = faults.env(data_dir)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return env


def _as_tensorboard_reads(events):
  """(tag, step, value) of the scalars TensorBoard shows: events in file order, a START
  session log at step s drops the scalars read before it at steps >= s (TensorBoard's
  purge rule for a restarted run); two events of one tag and step both show."""
  shown = []
  for e in events:
    if e.HasField("session_log") and e.session_log.status == e.session_log.START:
      shown = [x for x in shown if x[1] < e.step]
    elif e.HasField("summary"):
      shown += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
  return shown


@pytest.mark.slow
def test_resumed_federated_run_purges_tensorboard_events_after_the_checkpoint(
    tmp_path, data_dir):
  workdir = tmp_path / "w"
  faults.run(faults.cmd(workdir, *FAST, "--config.fed.rounds=1", command="federated",
                        config=TINY), _env(data_dir), expect=0)
  assert faults.checkpoint_steps(workdir)[-1] == 1
  # What a run killed after checkpoint 1 leaves behind: its round-2 line and event.
  stale = writers.MetricWriter(workdir)
  stale.write(2, "train", {"train/loss": 99.0})
  stale.close()
  proc = faults.run(faults.cmd(workdir, *FAST, "--config.fed.rounds=2", command="federated",
                               config=TINY), _env(data_dir), expect=0)
  assert "resumed from checkpoint at round 1" in proc.stdout
  shown = _as_tensorboard_reads(_events(workdir / "tb"))
  loss = [(step, value) for tag, step, value in shown if tag == "train/loss"]
  assert [step for step, _ in loss] == [1, 2], loss  # round 2 once: the resumed run's
  assert loss[1][1] != 99.0, loss
