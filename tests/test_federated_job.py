"""`jmtl federated` end to end on the offline BBC corpus (tests/configs/tiny_fed.py: 4 sites x 2
devices, one site without the headline task): documented files, exact bytes, a SIGKILLed run
resumed logs exactly the reference's rounds, `jmtl eval` and `jmtl data` on a federated config,
bad site entries as one line with exit 2."""

import json
import math
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import faults

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_fed.py"


def _env(data_dir, cache, fault=""):
  env = faults.env(data_dir, fault, cache=cache)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _rounds(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, cache):
  workdir = tmp_path_factory.mktemp("ref")
  faults.run(faults.cmd(workdir, command="federated", config=TINY), _env(data_dir, cache))
  return workdir


@pytest.mark.slow
def test_run_writes_documented_files_and_exact_bytes(reference):
  for name in ("config.json", "rounds.jsonl", "metrics.jsonl", "eval.json", "tokenizer.json",
               "predictions/bbc_topic.jsonl", "predictions/bbc_headline.jsonl"):
    assert (reference / name).is_file(), name
  assert any((reference / "tb").iterdir())
  rows = _rounds(reference)
  assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
  # Exact bytes: float32 values of the trunk and each head, counted from the model definition.
  cfg_trunk, topic_head, headline_head = _param_counts(reference)
  want_d = 4 * (cfg_trunk + topic_head)
  want_abc = 4 * (cfg_trunk + topic_head + headline_head)
  for r in rows:
    assert r["bytes_up"] == r["bytes_down"]
    assert r["bytes_up"]["d"] == want_d and r["bytes_up"]["a"] == want_abc
    assert r["bytes_up"]["total"] == 3 * want_abc + want_d
    assert set(r["site_loss"]) == set(r["sites"]) == {"a", "b", "c", "d"}
    assert math.isclose(sum(r["weights"].values()), 1.0, rel_tol=1e-5)
  # example-weighted loss of the participants: sum_k n_k L_k / sum_k n_k with w_k = n_k / sum n
  r = rows[0]
  assert math.isclose(r["loss"], sum(r["weights"][k] * r["site_loss"][k] for k in r["sites"]),
                      rel_tol=1e-5)
  # simulated seconds: the slowest site; c uploads at 20 Mbit/s, b computes at speed 0.5.
  H, step = 2, 0.05
  t = {"a": 0.1 + want_abc * 8 / 1e8 + H * step + want_abc * 8 / 1e8,
       "b": 0.1 + want_abc * 8 / 1e8 + H * step / 0.5 + want_abc * 8 / 1e8,
       "c": 0.1 + want_abc * 8 / 1e8 + H * step / 2.0 + want_abc * 8 / 2e7,
       "d": 0.1 + want_d * 8 / 1e8 + H * step + want_d * 8 / 1e8}
  assert math.isclose(r["sim_seconds"], max(t.values()), rel_tol=1e-9)
  T = max(t.values())
  gcp = 2 * (2 * T / 3600 * 1.0 + want_abc / 1e9 * 0.12)
  aws = 2 * T / 3600 * 2.0 + want_abc / 1e9 * 0.09 + 2 * T / 3600 * 2.0 + want_d / 1e9 * 0.09
  assert math.isclose(r["sim_cost"]["gcp"], gcp, rel_tol=1e-9)
  assert math.isclose(r["sim_cost"]["aws"], aws, rel_tol=1e-9)
  assert math.isclose(rows[-1]["sim_cost_total"], 6 * (gcp + aws), rel_tol=1e-9)
  ev = json.loads((reference / "eval.json").read_text())
  assert 0 <= ev["bbc_topic/accuracy"] <= 100
  for s in "abcd":
    assert f"site/{s}/bbc_topic/accuracy" in ev
  assert "site/d/bbc_headline/rouge1" not in ev  # d holds no headline rows
  assert "site/a/bbc_headline/rouge1" in ev
  assert "bbc_topic/accuracy" in rows[2] and "bbc_topic/accuracy" not in rows[1]  # eval_every 3
  assert rows[-1]["loss"] < rows[0]["loss"]


def _param_counts(workdir):
  """(trunk, bbc_topic head, bbc_headline head) parameter counts of the tiny model (abstract)."""
  from flax import nnx
  from jmtl import tasks
  from jmtl.config import load_config_file
  from jmtl.data.tokenizer import Tokenizer
  from jmtl.model.multitask import HeadSpec, MultiTaskModel
  cfg = load_config_file(TINY)
  vocab = Tokenizer.load(str(workdir / "tokenizer.json")).vocab_size
  specs = {t: HeadSpec(tasks.get_task(t).kind, tasks.get_task(t).num_labels) for t in cfg.tasks}
  model = nnx.eval_shape(lambda: MultiTaskModel(cfg.model, vocab, specs, rngs=nnx.Rngs(0)))
  count = lambda m: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  return (count(model.trunk), count(model.heads["bbc_topic"]),
          count(model.heads["bbc_headline"]))


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_to_exactly_the_reference_rounds(
    reference, tmp_path, data_dir, cache):
  """The run is held before round 4's batches (iterator batch 7 with 2 local steps), after
  checkpoint 3 (an evaluation round): SIGKILL, resume, compare every round line."""
  workdir = tmp_path / "w"
  hold = f"hold_at=7:{tmp_path / 'never'}"
  job = faults.Job(faults.cmd(workdir, command="federated", config=TINY),
                   _env(data_dir, cache, hold), logs=tmp_path / "logs")
  faults.signal_when(job, lambda: 3 in faults.checkpoint_steps(workdir), signal.SIGKILL,
                     what="checkpoint 3")
  assert faults.checkpoint_steps(workdir)[-1] == 3
  proc = faults.run(faults.cmd(workdir, command="federated", config=TINY), _env(data_dir, cache))
  assert "resumed from checkpoint at round 3" in proc.stdout
  assert _rounds(workdir) == _rounds(reference)
  assert json.loads((workdir / "eval.json").read_text()) == \
      json.loads((reference / "eval.json").read_text())


@pytest.mark.slow
def test_eval_and_data_on_a_federated_config(reference, tmp_path, data_dir, cache):
  env = _env(data_dir, cache)
  before = json.loads((reference / "eval.json").read_text())
  sites = {k: v for k, v in before.items() if k.startswith("site/")}
  assert sites
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "eval", "--config", str(TINY),
                        "--workdir", str(reference)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)["step"] == 6
  after = json.loads((reference / "eval.json").read_text())
  assert {k: after.get(k) for k in sites} == sites  # the run's per-site results are kept
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "data", "--config", str(TINY)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "partition dirichlet (seed 0) over 4 sites:" in out.stdout
  line_d = next(l for l in out.stdout.splitlines() if l.strip().startswith("d ("))
  assert "bbc_topic" in line_d and "bbc_headline" not in line_d
  assert "business" in line_d  # rows per label


COMPRESSED_DP = ("--config.tasks=bbc_topic", "--config.fed.rounds=2", "--config.fed.eval_every=0",
                 "--config.fed.compress=topk:0.1+int8", "--config.fed.dp.clip_norm=0.5",
                 "--config.fed.dp.noise_multiplier=0.8", "--config.fed.participation=0.5")


def _hand_bytes(n):
  """topk:0.1+int8 bytes of a leaf of n values: k = max(1, ceil(n / 10)) int8 values, one
  float32 scale per 256 of them, an index of 1 / 2 / 4 bytes (n <= 2^8 / 2^16 / more)."""
  k = max(1, -(-n // 10))
  width = 1 if n <= 256 else 2 if n <= 65536 else 4
  return k + 4 * (-(-k // 256)) + k * width


@pytest.mark.slow
def test_compressed_dp_run_counts_encoded_bytes_and_reports_epsilon(tmp_path, data_dir, cache):
  """bbc_topic only, 2 rounds, 2 of 4 sites per round, top-k 10 % + int8 with error feedback,
  DP-FedAvg (C = 0.5, z = 0.8): bytes_up by hand per leaf, epsilon from dp-accounting."""
  from dp_accounting import dp_event
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  workdir = tmp_path / "w"
  faults.run(faults.cmd(workdir, *COMPRESSED_DP, command="federated", config=TINY),
             _env(data_dir, cache))
  rows = _rounds(workdir)
  assert [r["round"] for r in rows] == [1, 2]
  sizes = _leaf_sizes(workdir, ("bbc_topic",))
  up = sum(_hand_bytes(n) for n in sizes)
  down = 4 * sum(sizes)
  event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(0.8))
  for r in rows:
    assert len(r["sites"]) == 2
    assert r["bytes_up"] == {**{s: up for s in r["sites"]}, "total": 2 * up}
    assert r["bytes_down"] == {**{s: down for s in r["sites"]}, "total": 2 * down}
    assert r["weights"] == {s: 0.5 for s in r["sites"]}  # 1 / (q S): uniform, fixed
    rdp = rdp_privacy_accountant.RdpAccountant().compose(event, r["round"]).get_epsilon(1e-5)
    pld = pld_privacy_accountant.PLDAccountant().compose(event, r["round"]).get_epsilon(1e-5)
    assert math.isclose(r["dp_epsilon_rdp"], rdp, rel_tol=1e-9)
    assert math.isclose(r["dp_epsilon_pld"], pld, rel_tol=1e-9)
  assert up < down / 10  # what compression is for
  assert math.isfinite(rows[-1]["loss"])
  assert 0 <= json.loads((workdir / "eval.json").read_text())["bbc_topic/accuracy"] <= 100


def _leaf_sizes(workdir, tasks_):
  """Sizes of the parameter leaves a site holding `tasks_` sends (trunk + those heads)."""
  from flax import nnx
  from jmtl import tasks
  from jmtl.config import load_config_file
  from jmtl.data.tokenizer import Tokenizer
  from jmtl.model.multitask import HeadSpec, MultiTaskModel
  cfg = load_config_file(TINY)
  cfg.tasks = tasks_
  vocab = Tokenizer.load(str(workdir / "tokenizer.json")).vocab_size
  specs = {t: HeadSpec(tasks.get_task(t).kind, tasks.get_task(t).num_labels) for t in cfg.tasks}
  model = nnx.eval_shape(lambda: MultiTaskModel(cfg.model, vocab, specs, rngs=nnx.Rngs(0)))
  return [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("override,message", [
    ("--config.fed.participation=0", "config key 'fed.participation' = 0.0 must be in (0, 1]"),
    ("--config.fed.client_optimizer=sgdd", "config key 'fed.client_optimizer' = 'sgdd' is not an "
                                           "optimizer name"),
    ("--config.data.length_buckets=16,32", "a federated run needs one bucket"),
    ("--config.fed.compress=topk:0.1+q9", "config key 'fed.compress' = 'topk:0.1+q9' must be a "
                                          "compression spec"),
])
def test_bad_fed_keys_are_one_line_exit_2(override, message, tmp_path, data_dir):
  env = _env(data_dir, None)
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", str(TINY),
                        "--workdir", str(tmp_path / "w"), override], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("jmtl: error: "), out.stderr
  assert message in out.stderr


BAD_SITES = [
    ("dict(name='a', devices=2, up_mbps=-5)", "entry 0 ('a'): field 'up_mbps' = -5 must be > 0"),
    ("dict(devices=2)", "entry 0: field 'name' is required"),
    ("dict(name='a', devices=2, colour='red')", "entry 0 ('a'): unknown field 'colour'"),
    ("dict(name='a', devices=2, tasks=('sst2',))",
     "entry 0 ('a'): field 'tasks' names 'sst2', which is not in tasks"),
]


@pytest.mark.parametrize("entry,message", BAD_SITES)
def test_a_bad_site_entry_is_one_line_naming_it(entry, message, tmp_path, data_dir):
  cfg = tmp_path / "bad.py"
  cfg.write_text(
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('tiny_fed', {str(TINY)!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "def get_config():\n"
      "  c = m.get_config()\n"
      f"  c.fed.sites = ({entry},) + tuple(c.fed.sites[1:])\n"
      "  return c\n")
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", str(cfg),
                        "--workdir", str(tmp_path / "w")], env=_env(data_dir, None), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1, out.stderr
  assert f"jmtl: error: config key 'fed.sites' {message}" in out.stderr
  assert not (tmp_path / "w").exists()
