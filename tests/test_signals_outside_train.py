"""SIGTERM outside `train()`: between the runs of a study / sweep (their evaluation and
reporting parts) and during `jmtl eval`. A study stops before its next run with one line and
exit 128 + 15, and the same command resumes it; `jmtl eval` stops with one line (nothing to
save), never a traceback or a silent kill."""

import os
import signal

import pytest

import faults
from jmtl.study import sweep as sweep_lib
from jmtl.train.loop import StopRequest
from test_study_sweep import FakeTrainer, study_config

SIGTERM_EXIT = 128 + signal.SIGTERM


class SignalledTrainer(FakeTrainer):
  """A FakeTrainer whose `at`-th call receives SIGTERM (after it wrote the run's results): the
  signal of a study's evaluation/reporting part, which no trainer answers."""

  def __init__(self, at):
    super().__init__()
    self.at = at

  def __call__(self, cfg, run_dir):
    out = super().__call__(cfg, run_dir)
    if len(self.calls) == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return out


def test_sigterm_between_sweep_runs_stops_before_the_next_one_and_resumes(tmp_path, capsys):
  first = SignalledTrainer(at=2)
  with StopRequest() as stop, pytest.raises(SystemExit) as exit_info:
    sweep_lib.run_sweep(study_config(), tmp_path, train_fn=first, share_tokenizer=False,
                        check_files=False)
  assert stop.signal == signal.SIGTERM
  assert exit_info.value.code == SIGTERM_EXIT
  assert len(first.calls) == 2  # the third run never started
  lines = [l for l in capsys.readouterr().out.splitlines() if "received signal" in l]
  assert len(lines) == 1 and lines[0].startswith("[sweep] received signal 15: stopped before"), \
      lines
  # The same command again: the two finished runs are skipped, the rest are trained.
  again = FakeTrainer()
  result = sweep_lib.run_sweep(study_config(), tmp_path, train_fn=again, share_tokenizer=False,
                               check_files=False)
  reference = FakeTrainer()
  want = sweep_lib.run_sweep(study_config(), tmp_path / "reference", train_fn=reference,
                             share_tokenizer=False, check_files=False)
  assert first.calls + again.calls == reference.calls
  assert result["best"] == want["best"]


@pytest.mark.slow
def test_sigterm_during_jmtl_eval_is_one_line_and_exit_143(tmp_path, data_dir):
  workdir = tmp_path / "w"
  env = faults.env(data_dir)
  base = ["--config.train.steps=2", "--config.train.eval_every=0", "--config.train.progress=none"]
  faults.run(faults.cmd(workdir, *base), env, expect=0)
  before = (workdir / "eval.json").read_bytes()
  out = faults.run(faults.cmd(workdir, *base, command="eval"),
                   faults.env(data_dir, "sigterm_in_eval=1"))
  assert out.returncode == SIGTERM_EXIT, (out.returncode, out.stdout[-2000:],
                                          out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == (
      "received signal 15: evaluation stopped, nothing to save (no outputs written), exiting")
  assert (workdir / "eval.json").read_bytes() == before  # nothing written
