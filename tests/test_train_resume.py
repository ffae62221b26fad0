"""End-to-end trainer checks on real SST-2 data: outputs, window means, kill-during-save, a
half-written checkpoint. SIGTERM and SIGKILL resume at odd moments: tests/test_train_faults.py."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
pytestmark = pytest.mark.slow

COMMON = ["--config.train.steps=16", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.eval_every=8"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "jmtl.cli", "train", "--config", str(TINY), "--workdir",
          str(workdir), *COMMON, *extra]


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(jax_cache):
  """The module's runs use the session's JAX compilation cache (conftest.py: they compile the
  same programs)."""
  _CACHE["dir"] = str(jax_cache)
  yield
  _CACHE.clear()


def _env(data_dir):
  env = dict(os.environ)
  env["JMTL_DATA_DIR"] = str(data_dir)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_COMPILATION_CACHE_DIR"] = _CACHE["dir"]
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _losses(workdir) -> dict[int, float]:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  steps = [r["step"] for r in train]
  assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
  return {r["step"]: r["train/loss"] for r in train}


def _run(cmd, env):
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("ref")
  _run(_cmd(workdir), _env(data_dir))
  return workdir


def test_run_writes_documented_files(reference):
  for name in ("config.json", "metrics.jsonl", "eval.json", "tokenizer.json",
               "predictions/sst2.jsonl"):
    assert (reference / name).is_file(), name
  assert any((reference / "tb").iterdir())
  steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 16
  ev = json.loads((reference / "eval.json").read_text())
  assert 0.0 <= ev["sst2/accuracy"] <= 100.0
  preds = [json.loads(l) for l in (reference / "predictions/sst2.jsonl").read_text().splitlines()]
  ids = [p["id"] for p in preds]
  assert len(preds) == 64 and len(set(ids)) == 64 and all(i.isdigit() for i in ids)
  acc = 100.0 * sum(p["prediction"] == p["reference"] for p in preds) / len(preds)
  assert abs(acc - ev["sst2/accuracy"]) < 1e-6
  assert len(_losses(reference)) == 16


def test_train_lines_are_window_means(reference, tmp_path, data_dir):
  """log_every=4: each train line holds the mean over its 4 steps of the per-step losses the
  reference run (log_every=1, same seed and data) logged."""
  _run(_cmd(tmp_path, "--config.train.log_every=4"), _env(data_dir))
  ref, got = _losses(reference), _losses(tmp_path)
  assert sorted(got) == [4, 8, 12, 16]
  for step, value in got.items():
    want = sum(ref[s] for s in range(step - 3, step + 1)) / 4
    assert value == pytest.approx(want, rel=1e-5), step
  assert got[4] != pytest.approx(ref[4], rel=1e-3)  # not the last step's loss alone


def _kill_when(proc, predicate, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.01)
  proc.kill()
  raise AssertionError("condition never met")


def _logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]
  return max([r["step"] for r in rows], default=0)


def _saving(workdir) -> bool:
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())


def test_kill_during_save_then_resume(reference, tmp_path, data_dir):
  env = _env(data_dir)
  proc = subprocess.Popen(_cmd(tmp_path), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  killed = _kill_when(proc, lambda: _logged_steps(tmp_path) >= 6 and _saving(tmp_path))
  assert killed, "run ended before a save could be interrupted"
  _run(_cmd(tmp_path), env)
  ref, got = _losses(reference), _losses(tmp_path)
  for step in ref:
    assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step


def test_half_written_checkpoint_is_ignored(reference, tmp_path, data_dir):
  """A step directory left under orbax's temporary name (save never committed) is not resumed."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  ckpt = workdir / "checkpoints"
  shutil.rmtree(ckpt / "16")
  fake = ckpt / "16.orbax-checkpoint-tmp-1"
  shutil.copytree(ckpt / "15", fake)
  for f in fake.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  out = _run(_cmd(workdir), _env(data_dir))
  assert "resumed from checkpoint at step 15" in out.stdout
  assert _losses(workdir) == pytest.approx(_losses(reference), rel=1e-6)
