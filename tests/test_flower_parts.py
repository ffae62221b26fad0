"""The parts of jmtl.federated.flower that need no Flower processes: payloads, the server's
aggregation against numpy, and the one-line errors of `jmtl federated` with fed.backend=flower."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from jmtl.federated import flower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "configs" / "tiny_fed_flower.py")


def test_payload_roundtrip_is_raw_float32_bytes():
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": np.full((), 2.5, np.float32),  # 0-d: Flower's wire format sends it as (1,)
          "c": {"m": np.array([1, -2], np.int32)}}
  rec = flower.to_record(tree)
  assert flower.payload_bytes(rec) == 6 * 4 + 4 + 2 * 4  # values only, no header
  assert rec["['w']"].data == np.arange(6, dtype="<f4").tobytes()
  back = flower.from_record(rec, tree)
  for k in ("w", "b"):
    assert back[k].shape == tree[k].shape and back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], tree[k])
  np.testing.assert_array_equal(back["c"]["m"], [1, -2])
  with pytest.raises(ValueError, match=r"\['w'\]"):
    flower.from_record(rec, {**tree, "w": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="no leaf"):
    flower.from_record(rec, {**tree, "z": np.zeros(1, np.float32)})


def test_aggregate_is_the_example_weighted_mean_over_arrived_sites_and_holders():
  rng = np.random.default_rng(0)
  like = {"trunk": np.zeros(4, np.float32), "head": np.zeros(2, np.float32)}
  d = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in like.items()}
       for _ in range(3)]
  n = np.array([10.0, 30.0, 60.0], np.float32)
  groups = {"trunk": 0, "head": 1}
  holds = np.array([[1, 1], [1, 0], [1, 1]], np.float32)  # site 1 does not hold the head
  got, w = flower.aggregate([d[0], d[1], None], n, like, groups, holds)  # site 2 lost
  np.testing.assert_allclose(w, [0.25, 0.75, 0.0], rtol=1e-6)
  np.testing.assert_allclose(got["trunk"], 0.25 * d[0]["trunk"] + 0.75 * d[1]["trunk"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["head"], d[0]["head"], rtol=1e-5, atol=1e-6)  # its only holder
  none, w0 = flower.aggregate([None, None, None], n, like)
  assert np.all(w0 == 0) and all(np.all(np.asarray(v) == 0) for v in none.values())


def _cli(tmp_path, *overrides):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             FLWR_HOME=str(tmp_path / "flwr_home"))
  return subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                         "--workdir", str(tmp_path / "wd"), "--config.fed.backend=flower",
                         *overrides], env=env, capture_output=True, text=True, timeout=120)


def test_flower_backend_refuses_what_it_does_not_run_in_one_line(tmp_path):
  out = _cli(tmp_path, "--config.fed.compress=bf16")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jmtl: error: config key 'fed.backend'")
  assert "fed.compress" in lines[0]


def test_flower_backend_unknown_superlink_connection_is_one_line(tmp_path):
  out = _cli(tmp_path, "--config.fed.flower.superlink=nowhere")
  assert out.returncode == 2, out.stdout + out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "jmtl: error: config key 'fed.flower.superlink' = 'nowhere': flwr run failed"), lines
  assert "nowhere" in lines[0][60:]
  assert not (tmp_path / "wd").exists()  # nothing was written


def test_flower_backend_refuses_a_workdir_with_a_run(tmp_path):
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "rounds.jsonl").write_text('{"round": 1}\n')
  out = _cli(tmp_path)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"jmtl: error: --workdir {tmp_path / 'wd'}")
  assert (tmp_path / "wd" / "rounds.jsonl").read_text() == '{"round": 1}\n'
