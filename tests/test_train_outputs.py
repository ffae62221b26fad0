"""Evaluation outputs per split: a test split never overwrites the validation files, and an
unlabelled split (GLUE test.tsv) gets predictions with null references and no metrics."""

import json
import os
import subprocess
import sys

import pytest

from faults import REPO

pytestmark = pytest.mark.slow
TINY = os.path.join("tests", "configs", "tiny_sst2.py")


def _jmtl(*args, data_dir, cache):
  """`jmtl ARGS` on 2 CPU devices with the session's JAX compilation cache (conftest.py:
  `jmtl eval` loads the programs `jmtl train` compiled; the programs are the same)."""
  env = dict(os.environ, JMTL_DATA_DIR=str(data_dir),
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, "-m", "jmtl.cli", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_unlabelled_test_split_writes_its_own_files(tmp_path, data_dir, jax_cache):
  if not (data_dir / "glue" / "SST-2" / "test.tsv").is_file():
    pytest.fail("glue/SST-2/test.tsv is missing from JMTL_DATA_DIR")
  w = tmp_path / "w"
  common = ["--config", TINY, "--workdir", str(w), "--config.train.steps=4",
            "--config.train.eval_every=0", "--config.train.checkpoint_every=4"]
  proc = _jmtl("train", *common, data_dir=data_dir, cache=jax_cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  validation = (w / "eval.json").read_text()
  assert json.loads(validation)["split"] == "validation"

  proc = _jmtl("eval", *common, "--config.data.eval_split=test", data_dir=data_dir,
               cache=jax_cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (w / "eval.json").read_text() == validation  # untouched
  result = json.loads((w / "eval_test.json").read_text())
  assert result == {"step": 4, "split": "test"}  # no made-up metrics
  rows = [json.loads(line) for line in (w / "predictions_test" / "sst2.jsonl").open()]
  assert len(rows) == 64  # data.max_eval_examples of the tiny config
  assert all(r["reference"] is None and r["prediction"] in ("negative", "positive")
             for r in rows)
