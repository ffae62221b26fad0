"""Multi-process restore: 2 processes x 4 CPU devices on localhost (as tests/test_multihost.py)
restore the same step when the newest one is unreadable on one process only."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

import faults
from multihost_restore import COLS
from test_multihost import _port

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_restore.py"


def _two(directory, phase, tmp_path):
  port = _port()
  env = faults.env(tmp_path)  # CPU only; no data is read
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  jobs = [faults.Job([sys.executable, str(WORKER), str(port), str(pid), str(directory), phase],
                     env, logs=tmp_path / "logs") for pid in range(2)]
  results = [job.wait(timeout=120) for job in jobs]
  for pid, res in enumerate(results):
    assert res.returncode == 0, (pid, res.stdout[-2000:], res.stderr[-3000:])
  return results


def test_newest_step_unreadable_on_one_process_restores_the_previous_step_on_both(tmp_path):
  directory = tmp_path / "checkpoints"
  _two(directory, "save", tmp_path)
  # Step 2's array data written by process 1 (the shards of its devices, read only by it)
  # is corrupted: step 2 reads on process 0 but not on process 1.
  files = [p for p in (directory / "2" / "state").glob("ocdbt.process_1/**/*") if p.is_file()]
  assert files, sorted(str(p) for p in (directory / "2").rglob("*"))
  for p in files:
    p.write_bytes(b"\0" * 16)
  results = _two(directory, "restore", tmp_path)
  outs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
  assert [o.get("step") for o in outs] == [1, 1], (outs, [r.stderr[-2000:] for r in results])
  for pid, out in enumerate(outs):
    assert out["data"] == {"pos": 1} and out["meta"] == {"step": 1}
    # This process's shards (one row each) of step 1's arange(8 * COLS).reshape(8, COLS) + 1e4.
    want = np.arange(8 * COLS, dtype=np.float32).reshape(8, COLS) + 1e4
    for start, rows in out["shards"].items():
      np.testing.assert_array_equal(np.asarray(rows, np.float32),
                                    want[int(start):int(start) + 1])
  assert sorted(int(s) for o in outs for s in o["shards"]) == list(range(8))
  # Both processes name step 2 as the one skipped.
  for r in results:
    assert "checkpoint at step 2" in r.stderr and "using step 1" in r.stderr, r.stderr[-2000:]
