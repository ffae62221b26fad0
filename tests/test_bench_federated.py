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
