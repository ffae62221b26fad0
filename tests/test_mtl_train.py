"""Task balancing through `jmtl train` on real GLUE data: config errors, the compile-count bound
of mixed batches, an end-to-end run with a gradient method, and exact resume of a stateful
weighting (FAMO: logits and their Adam moments live in the checkpointed train state)."""

import json
import pathlib
import subprocess
import sys

import pytest

import faults

from jmtl import cli
from jmtl import config as config_lib
from jmtl import tasks as task_registry
from jmtl.data import pipeline
from jmtl.data import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
THREE = ["--config.tasks=sst2,cola,stsb", "--config.data.mixing=mixed",
         "--config.data.mixture=uniform", "--config.data.batch_size=12",
         "--config.data.length_buckets=16,32", "--config.data.max_train_examples=256"]


_error_line = faults.cli_error_line


@pytest.mark.parametrize("override, needle", [
    ("--config.mtl.gradient=pcgrad", "'mtl.gradient' = 'pcgrad' needs data.mixing = 'mixed'"),
    ("--config.mtl.weighting=famo", "'mtl.weighting' = 'famo' needs data.mixing = 'mixed'"),
    ("--config.mtl.weighting=gradnorm", "needs data.mixing = 'mixed'"),
    ("--config.mtl.weighting=static", "'mtl.weights' = {} must give a weight for exactly"),
    ("--config.mtl.gradient=sum", "'mtl.gradient' = 'sum' is not one of: none, pcgrad, mgda, cagrad"),
    ("--config.mtl.dwa_period=0", "'mtl.dwa_period' = 0 must be >= 1"),
])
def test_bad_mtl_config_is_one_line(capsys, tmp_path, override, needle):
  line = _error_line(capsys, ["train", "--config", str(TINY), "--workdir", str(tmp_path),
                              override])
  assert needle in line, line


def test_mixed_batches_share_one_bucket(data_dir):
  """3 tasks x 2 buckets: the tasks' own buckets form more than 2 combinations over the run,
  but the batches take at most 2 shapes: every task pads to the step's largest own bucket."""
  cfg = config_lib.load_config_file(TINY)
  cli.apply_overrides(cfg, THREE)
  cfg.data.dir = str(data_dir)
  tasks = [task_registry.get_task(t) for t in cfg.tasks]
  tok = tokenizer_lib.build_tokenizer(cfg, tasks, None)
  it = pipeline.train_iterator(cfg, tasks, tok)
  combos, shapes = set(), set()
  for _ in range(60):
    own = {n: s.bucket(s.features(it.taken[n])) for n, s in it.streams.items()}
    combos.add(tuple(sorted(own.items())))
    batch = next(it)
    lengths = {n: b["input_ids"].shape[1] for n, b in batch.items()}
    assert set(lengths.values()) == {max(own.values())}, (lengths, own)
    shapes.add(tuple(sorted(lengths.items())))
  assert len(combos) > 2, f"the data gives only {combos}: the test would not show the bound"
  assert len(shapes) <= 2, shapes


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(jax_cache):
  """The module's runs use the session's JAX compilation cache (conftest.py; the resume runs
  compile one program)."""
  _CACHE["dir"] = str(jax_cache)
  yield
  _CACHE.clear()


def _env(data_dir):
  """2 CPU devices, the data root and the module's compilation cache (`faults.env`)."""
  return faults.env(data_dir, cache=_CACHE["dir"])


def _train(workdir, data_dir, *extra, fault=None):
  env = _env(data_dir)
  if fault:
    env["JMTL_FAULT"] = fault
  script = [str(REPO / "tests" / "fault_run.py")] if fault else ["-m", "jmtl.cli"]
  cmd = [sys.executable, *script, "train", "--config", str(TINY), "--workdir", str(workdir),
         *THREE, *extra]
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _rows(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines]


@pytest.mark.slow
def test_train_with_cagrad_and_gradnorm_end_to_end(tmp_path, data_dir):
  proc = _train(tmp_path, data_dir, "--config.mtl.gradient=cagrad",
                "--config.mtl.weighting=gradnorm", "--config.train.steps=12",
                "--config.train.log_every=3", "--config.train.eval_every=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  train = [r for r in _rows(tmp_path) if r["split"] == "train"]
  assert [r["step"] for r in train] == [3, 6, 9, 12]
  for r in train:
    weights = [r[f"train/{t}/weight"] for t in ("sst2", "cola", "stsb")]
    assert sum(weights) == pytest.approx(3.0, rel=1e-4)  # GradNorm keeps sum w = k
    assert 1 <= r["train/compilations"] <= 2  # one step variant per length bucket at most
  assert train[-1]["train/sst2/weight"] != pytest.approx(1.0)  # the weights moved
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert {"sst2/accuracy", "cola/mcc", "stsb/pearson"} <= set(ev)


@pytest.mark.slow
def test_famo_resume_logs_what_an_uninterrupted_run_logs(tmp_path, data_dir):
  common = ["--config.tasks=sst2,stsb", "--config.data.max_eval_examples=16",
            "--config.mtl.weighting=famo", "--config.train.steps=10",
            "--config.train.log_every=1", "--config.train.checkpoint_every=100",
            "--config.train.eval_every=0"]
  ref = _train(tmp_path / "ref", data_dir, *common)
  assert ref.returncode == 0, ref.stderr[-3000:]
  first = _train(tmp_path / "res", data_dir, *common, fault="sigterm_at=5")
  assert first.returncode == 143, first.stderr[-3000:]
  second = _train(tmp_path / "res", data_dir, *common)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint" in second.stdout
  keys = ["train/loss"] + [f"train/{t}/{m}" for t in ("sst2", "stsb")
                           for m in ("loss", "weight")]
  want = {r["step"]: r for r in _rows(tmp_path / "ref") if r["split"] == "train"}
  got = {r["step"]: r for r in _rows(tmp_path / "res") if r["split"] == "train"}
  assert sorted(got) == sorted(want) == list(range(1, 11))
  for step in want:
    for k in keys:
      assert got[step][k] == pytest.approx(want[step][k], rel=1e-6, abs=1e-7), (step, k)
  assert want[10]["train/sst2/weight"] != pytest.approx(want[1]["train/sst2/weight"])
