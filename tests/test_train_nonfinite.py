"""train.on_nonfinite: `halt` stops naming step and task and keeps the last good checkpoint;
`skip` drops the update, counts it and finishes."""

import json

import pytest

from jmtl import config as config_lib
from jmtl.cli import apply_overrides
from jmtl.train import NonFiniteError
from jmtl.train import loop

# Adam with lr 1e30 moves every weight to ~1e30 at step 1 (still finite); the forward pass of
# step 2 then overflows, so step 2 is the first non-finite step.
OVERFLOW = ["--config.optim.lr=1e30", "--config.optim.warmup_steps=0", "--config.optim.grad_clip=0.0",
            "--config.optim.schedule=constant", "--config.train.steps=4", "--config.train.log_every=1",
            "--config.train.checkpoint_every=1", "--config.train.eval_every=0",
            "--config.data.max_eval_examples=32"]


def _cfg(*extra):
  cfg = config_lib.load_config_file("tests/configs/tiny_sst2.py")
  apply_overrides(cfg, [*OVERFLOW, *extra])
  return config_lib.validate(cfg, device_count=8)


def test_halt_names_step_and_task_and_keeps_last_checkpoint(tmp_path, data_dir):
  with pytest.raises(NonFiniteError, match=r"at step 2 \(task sst2\).*last good checkpoint: step 1"):
    loop.train(_cfg(), tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1]
  assert not (tmp_path / "eval.json").exists()


def test_skip_counts_and_finishes(tmp_path, data_dir):
  loop.train(_cfg("--config.train.on_nonfinite=skip"), tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r for r in rows if r["split"] == "train"}
  assert train[1]["train/skipped_steps"] == 0
  assert train[4]["train/skipped_steps"] == 3  # steps 2, 3, 4 dropped: the weights stay finite
  assert train[2]["train/loss"] is None  # non-finite values are written as null
  assert (tmp_path / "eval.json").exists()
