"""`jmtl bench scaling`: per-device bytes under each mesh layout (8 CPU devices, tiny model)."""

import math

import jax
import pytest

from jmtl.bench import scaling
from jmtl.config import load_config_file

CONFIG = "configs/bench_scaling.py"


@pytest.fixture(scope="module")
def result():
  assert jax.device_count() == 8
  c = load_config_file(CONFIG)
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.model.max_len = 32
  return scaling.bench_scaling(c, sizes=("tiny",), warmup=0, iters=1)


def test_layouts_of_eight_devices():
  assert scaling.layouts(8) == {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8),
                                "mixed": (2, 2, 2)}


def test_bytes_per_layout(result):
  rows = {r["layout"]: r for r in result["rows"]}
  assert sorted(rows) == ["data", "fsdp", "mixed", "tensor"]
  data, fsdp = rows["data"], rows["fsdp"]
  # Replicated bytes = 4 bytes x parameter count (float32), whatever the layout.
  for r in rows.values():
    assert r["params_bytes_replicated"] == 4 * r["params"]
  # Data parallelism replicates everything; fsdp=8 splits it over 8 devices (the issue's
  # target: <= 1/8 x 1.05 of the replicated bytes); tensor and mixed layouts sit between.
  assert data["params_bytes_per_device"] == data["params_bytes_replicated"]
  assert fsdp["fsdp_param_ratio"] <= 1.05 / 8
  assert fsdp["opt_state_ratio"] <= 1.05 / 8
  for name in ("tensor", "mixed"):
    assert 1 / 8 <= rows[name]["fsdp_param_ratio"] < 1
  assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows.values())
