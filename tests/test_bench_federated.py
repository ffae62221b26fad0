"""`jmtl bench federated`: a federated round against the same rows trained centrally."""

import json
import pathlib
import subprocess
import sys

import pytest

from jmtl.bench.federated import bench_federated
from jmtl.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_fed.py"


@pytest.mark.slow
def test_round_and_centralised_steps_are_timed_on_the_same_devices():
  config = load_config_file(TINY)
  config.tasks = ("bbc_topic",)  # classification only: compiles in seconds
  config.fed.sites = tuple(dict(s, tasks=("bbc_topic",)) if "tasks" in s else s
                           for s in config.fed.sites)
  out = bench_federated(config, warmup=0, iters=2)
  assert out["site_mesh"] == "4x2x1x1" and out["central_mesh"] == "8x1x1"
  assert out["sites"] == 4 and out["local_steps"] == 2
  # one site's mixed batch: 8 rows of the one task; a round = 4 sites x 2 steps x 8 rows x 32
  assert out["rows_per_site_step"] == 8 and out["tokens_per_round"] == 4 * 2 * 8 * 32
  assert out["ratio"] == pytest.approx(out["round_s"] / out["central_h_steps_s"])
  assert out["central_step_s"] == pytest.approx(out["central_h_steps_s"] / 2)
  assert out["meets_target"] == (out["ratio"] <= 1.10)
  assert out["round_compilations"] == 1  # timed rounds never recompile
  json.dumps(out)


def test_a_config_without_sites_is_one_line_exit_2(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "bench", "federated", "--config",
                        str(REPO / "tests" / "configs" / "tiny_sst2.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "needs a federated config" in out.stderr, out.stderr


# ------------------------------------------- bench.federated.mode = bytes_to_target

from jmtl import config as config_lib  # noqa: E402
from jmtl.bench import federated as fb  # noqa: E402

BYTES_CONFIG = REPO / "configs" / "bench_fed_bytes.py"


def test_first_reaching_is_the_first_crossing_not_the_best():
  curve = [(50, 10, 70.0), (100, 20, 79.0), (150, 30, 82.5), (200, 40, 79.5)]
  # target 79.0: reached exactly at step 100 (>=), although the best comes later
  assert fb.first_reaching(curve, 79.0) == (100, 20, 79.0)
  assert fb.first_reaching(curve, 80.0) == (150, 30, 82.5)
  assert fb.first_reaching(curve, 82.6) is None  # not reached
  assert fb.first_reaching([(50, 10, None), (100, 20, 81.0)], 80.0) == (100, 20, 81.0)
  assert fb.first_reaching([], 0.0) is None


def test_sync_bytes_are_steps_times_sites_times_four_bytes_per_value():
  # 4 sites of a model of n = 25,762 values: a step uploads 4 x 4 x 25,762 = 412,192 bytes
  per_step = 4 * 4 * 25_762
  rows = [{"step": 10, "split": "train", "train/loss": 0.7},
          {"step": 50, "split": "eval", "sst2/accuracy": 60.0},
          {"step": 100, "split": "eval", "sst2/accuracy": 71.5}]
  assert fb.sync_curve(rows, ["sst2/accuracy"], per_step) == [
      (50, 50 * 412_192, 60.0), (100, 100 * 412_192, 71.5)]


def test_federated_bytes_are_the_rounds_own_uplink_sums_round_0_left_out():
  rows = [{"round": 0, "sst2/accuracy": 90.0},  # the untrained model: not a training outcome
          {"round": 1, "bytes_up": {"a": 5, "b": 7, "total": 12}},
          {"round": 2, "bytes_up": {"a": 5, "b": 7, "total": 12}, "sst2/accuracy": 55.0},
          {"round": 3, "bytes_up": {"a": 5, "total": 5}},  # b did not take part
          {"round": 4, "bytes_up": {"a": 5, "b": 7, "total": 12}, "sst2/accuracy": 61.0}]
  assert fb.federated_curve(rows, ["sst2/accuracy"], 10) == [(20, 24, 55.0), (40, 41, 61.0)]


def test_local_steps_must_divide_steps_and_eval_every():
  config = load_config_file(BYTES_CONFIG)
  config.bench.federated.local_steps = (10, 40)  # 40 divides neither 600's eval step 50
  with pytest.raises(config_lib.ConfigError, match="bench.federated.local_steps"):
    config_lib.validate(config, check_files=False)
  config = load_config_file(BYTES_CONFIG)
  config.bench.federated.compress = ("int8", "nope")
  with pytest.raises(config_lib.ConfigError, match="bench.federated.compress"):
    config_lib.validate(config, check_files=False)


def test_a_non_iid_config_is_one_line_exit_2():
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "bench", "federated", "--config",
                        str(BYTES_CONFIG), "--config.fed.partition=dirichlet"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "fed.partition (must be iid)" in out.stderr, out.stderr


@pytest.mark.slow
def test_bytes_to_target_end_to_end_on_sst2(tmp_path, data_dir):
  """sync + one DiLoCo arm (H = 2, int8), 4 steps of a 1-layer d_model-32 model on SST-2,
  one dev evaluation (step 4) each."""
  del data_dir
  out_file = tmp_path / "bytes.json"
  tiny = ["--config.model.layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
          "--config.model.max_len=32", "--config.data.max_len=32",
          "--config.data.length_buckets=32", "--config.data.vocab_size=500",
          "--config.data.max_train_examples=512", "--config.data.max_eval_examples=64",
          "--config.data.batch_size=8", "--config.bench.federated.steps=4",
          "--config.bench.federated.eval_every=4", "--config.bench.federated.local_steps=2",
          "--config.bench.federated.compress=int8"]
  run = subprocess.run([sys.executable, "-m", "jmtl.cli", "bench", "federated", "--config",
                        str(BYTES_CONFIG), *tiny, "--json", "--out", str(out_file)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.loads(out_file.read_text())
  assert res == json.loads(run.stdout)
  assert res["complete"] and res["mode"] == "bytes_to_target" and res["sites"] == 4
  assert res["global_batch"] == 4 * 8 and res["reference"] == "best"
  # n by hand: token 500x32 + positions 32x32 + types 2x32 + embedding norm 2x32 + one layer
  # (q, k, v, out: 4 x (32x32 + 32); 2 norms 2 x 2x32; ffn 32x64 + 64 + 64x32 + 32) + head
  # 32x2 + 2
  n = 500 * 32 + 32 * 32 + 2 * 32 + 2 * 32 + (4 * (32 * 32 + 32) + 2 * 64 + 32 * 64 + 64
                                                + 64 * 32 + 32) + 32 * 2 + 2
  assert res["values_per_site"] == n == 25_762
  assert res["sync_bytes_per_step"] == 4 * 4 * n
  sync, arm = res["rows"]
  assert sync["arm"] == "sync" and [e[:2] for e in sync["evals"]] == [[4, 4 * 4 * 4 * n]]
  assert res["reference_score"] == max(e[2] for e in sync["evals"])
  assert res["target_score"] == pytest.approx(res["reference_score"] - 1.0)
  assert sync["reached"] and sync["bytes_to_target"] == res["sync_bytes_to_target"]
  assert arm["arm"] == "diloco" and arm["local_steps"] == 2 and arm["compress"] == "int8"
  # int8 in blocks of 256 values, per leaf: 1 byte per value + a float32 scale per block;
  # blocks: 15 leaves of <= 256 values (1 each), 5 of 1,024 (4), 2 of 2,048 (8), 16,000 (63)
  per_site_round = n + 4 * (15 * 1 + 5 * 4 + 2 * 8 + 63)
  assert [e[:2] for e in arm["evals"]] == [[4, 2 * 4 * per_site_round]]  # 2 rounds, 4 sites
  if arm["reached"]:
    assert arm["ratio"] == sync["bytes_to_target"] / arm["bytes_to_target"]
  else:
    assert arm["ratio"] is None and arm["bytes_to_target"] is None
  assert res["meets_target"] == any(
      r["reached"] and r["ratio"] >= 100 for r in res["rows"] if r["arm"] == "diloco")
  assert run.stderr.count("diloco H=2 int8") == 1 and run.stderr.count("sync ") == 1
