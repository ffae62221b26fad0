"""`jmtl federated` end to end on the offline BBC corpus (tests/configs/tiny_fed.py: 4 sites x 2
devices, one site without the headline task): documented files, exact bytes, a SIGKILLed run
resumed logs exactly the reference's rounds, `jmtl eval` and `jmtl data` on a federated config,
bad site entries as one line with exit 2; an asynchronous (FedBuff) run's server steps replayed
from the documented event rules and resumed after SIGKILL."""

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
def cache(jax_cache):
  """The session's JAX compilation cache (conftest.py)."""
  return jax_cache


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
  assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
  zero, rows = rows[0], rows[1:]  # round 0: the initial model's evaluation only (eval_every 3)
  assert set(zero) == {"round"} | {k for k in rows[2] if "/" in k}, zero
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
  assert r["round"] == 1
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
def test_eval_and_data_on_a_federated_config(reference, tmp_path, data_dir, cache, capfd,
                                             monkeypatch):
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
  # Other decoding settings: the run's site results (decoded otherwise) are not mixed in.
  import shutil
  other = tmp_path / "other"
  shutil.copytree(reference, other)
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "eval", "--config", str(TINY),
                        "--workdir", str(other), "--config.eval.max_decode_len=4"], env=env,
                       cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "eval.json keeps no site/... results" in out.stderr and "eval.max_decode_len" in out.stderr
  assert not any(k.startswith("site/") for k in json.loads((other / "eval.json").read_text()))
  # `jmtl data` reads and partitions the data, compiles nothing: run in this process (8 CPU
  # devices, as the subprocesses above).
  out = faults.cli_in_process(["data", "--config", str(TINY)], capfd, monkeypatch,
                              {"JMTL_DATA_DIR": str(data_dir)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "partition dirichlet (seed 0) over 4 sites:" in out.stdout
  line_d = next(l for l in out.stdout.splitlines() if l.strip().startswith("d ("))
  assert "bbc_topic" in line_d and "bbc_headline" not in line_d
  assert "business" in line_d  # rows per label


@pytest.mark.slow
def test_fed_rounds_extend_on_resume_and_cannot_shrink_below_the_checkpoint(
    reference, tmp_path, data_dir, cache, capfd, monkeypatch):
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  env = _env(data_dir, cache)
  cmd = [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(TINY), "--workdir",
         str(workdir)]
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "the run already finished at round 6" in out.stdout  # no evaluation again
  assert _rounds(workdir) == _rounds(reference)
  # Refused before any work: in this process (`cli.main`, the same exit code and stderr).
  out = faults.cli_in_process(cmd[3:] + ["--config.fed.rounds=5"], capfd, monkeypatch,
                              {"JMTL_DATA_DIR": str(data_dir)})
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "holds a checkpoint at round 6, past fed.rounds = 5" in out.stderr
  out = subprocess.run(cmd + ["--config.fed.rounds=7"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from checkpoint at round 6" in out.stdout
  assert "fed.rounds changed 6 -> 7" in out.stderr
  rows = _rounds(workdir)
  assert [r["round"] for r in rows] == list(range(8))
  assert rows[:7] == _rounds(reference)
  assert "bbc_topic/accuracy" in rows[7]  # the new last round is the final evaluation


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


BAD_FED_KEYS = [
    ("--config.fed.participation=0", "config key 'fed.participation' = 0.0 must be in (0, 1]"),
    ("--config.fed.client_optimizer=sgdd", "config key 'fed.client_optimizer' = 'sgdd' is not an "
                                           "optimizer name"),
    ("--config.data.length_buckets=16,32", "a federated run needs one bucket"),
    ("--config.fed.backend=pmap", "config key 'fed.backend' = 'pmap' maps one device per site, "
                                  "but the sites span 2 devices each"),
    ("--config.mtl.weighting=uncertainty", "config key 'mtl.weighting' = 'uncertainty': "
                                           "federated runs train each site on the plain sum"),
    ("--config.fed.compress=topk:0.1+q9", "config key 'fed.compress' = 'topk:0.1+q9' must be a "
                                          "compression spec"),
]


@pytest.mark.parametrize("override,message", BAD_FED_KEYS)
def test_bad_fed_keys_are_one_line_exit_2(override, message, tmp_path, data_dir, capfd,
                                         monkeypatch):
  # In-process (`cli.main`, the same exit code and stderr); the command as a process:
  # test_a_bad_fed_key_ends_the_process_with_exit_2_and_one_line below.
  out = faults.cli_in_process(["federated", "--config", str(TINY), "--workdir",
                               str(tmp_path / "w"), override], capfd, monkeypatch,
                              {"JMTL_DATA_DIR": str(data_dir)})
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
def test_a_bad_site_entry_is_one_line_naming_it(entry, message, tmp_path, data_dir, capfd,
                                                monkeypatch):
  cfg = tmp_path / "bad.py"
  cfg.write_text(
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('tiny_fed', {str(TINY)!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "def get_config():\n"
      "  c = m.get_config()\n"
      f"  c.fed.sites = ({entry},) + tuple(c.fed.sites[1:])\n"
      "  return c\n")
  out = faults.cli_in_process(["federated", "--config", str(cfg), "--workdir",
                               str(tmp_path / "w")], capfd, monkeypatch,
                              {"JMTL_DATA_DIR": str(data_dir)})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1, out.stderr
  assert f"jmtl: error: config key 'fed.sites' {message}" in out.stderr
  assert not (tmp_path / "w").exists()


def test_a_bad_fed_key_ends_the_process_with_exit_2_and_one_line(tmp_path, data_dir):
  """`python -m jmtl.cli federated` with a bad key: the process's exit status is 2 and its
  stderr one line (nothing else at start-up or exit); the other bad keys and site entries are
  checked in-process above."""
  override, message = BAD_FED_KEYS[0]
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "federated", "--config", str(TINY),
                        "--workdir", str(tmp_path / "w"), override], env=_env(data_dir, None),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("jmtl: error: "), out.stderr
  assert message in out.stderr


@pytest.mark.slow
def test_real_glue_sst2_over_four_dirichlet_sites_learns_with_the_pmap_backend(
    tmp_path, data_dir, cache):
  """Issue requirement 10: real SST-2, 4 sites (one device each, `fed.backend=pmap`),
  Dirichlet(0.3) label skew: the validation accuracy after 10 rounds is well above the initial
  model's (round 0, evaluated by the job itself)."""
  config = REPO / "tests" / "configs" / "tiny_fed_sst2.py"
  faults.run(faults.cmd(tmp_path, command="federated", config=config), _env(data_dir, cache))
  rows = _rounds(tmp_path)
  assert [r["round"] for r in rows] == list(range(11))
  start, end = rows[0]["sst2/accuracy"], rows[-1]["sst2/accuracy"]
  assert end > start + 10, (start, end)
  # A measured step time (fed.step_time_s = 0) is there before round 1: its simulated seconds
  # hold compute beyond the network time (site defaults: 50 ms latency, 100 Mbit/s each way).
  net = 2 * 0.05 + 2 * rows[1]["bytes_up"]["s0"] * 8 / 1e8
  compute = [r["sim_seconds"] - net for r in rows[1:]]
  assert min(compute) > 0.25 * max(compute) > 0, compute


ASYNC = ("--config.fed.mode=async", "--config.fed.buffer_size=2",
         "--config.fed.faults.stragglers=0.25", "--config.fed.eval_every=0")


@pytest.mark.slow
def test_async_run_logs_server_steps_and_resumes_after_sigkill(tmp_path, data_dir, cache):
  """FedBuff (K = 2 of 4 sites, a straggler per job wave): one line per server step with the
  simulated clock and each deliverer's staleness, the event queue checked against a replay of
  the documented rules; a run SIGKILLed after a checkpoint, held where some site reads a batch
  index none reached by round 3, resumes to exactly the uninterrupted run's lines."""
  ref = tmp_path / "ref"
  faults.run(faults.cmd(ref, *ASYNC, command="federated", config=TINY), _env(data_dir, cache))
  rows = _rounds(ref)
  assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(len(r["sites"]) == 2 and r["dropped"] == [] for r in rows)
  # Replay the event queue from the documented rules: each job lasts 2 x 50 ms latency + bytes
  # x 8 / 100 Mbit/s down + 2 steps x 50 ms / speed x (5 if it straggles) + bytes x 8 / up.
  cfg_trunk, topic_head, headline_head = _param_counts(ref)
  nbytes = {s: 4 * (cfg_trunk + topic_head + (headline_head if s != "d" else 0)) for s in "abcd"}
  speed, up = {"a": 1.0, "b": 0.5, "c": 2.0, "d": 1.0}, {"a": 1e8, "b": 1e8, "c": 2e7, "d": 1e8}
  from jmtl.federated import asynchronous as fa
  slow = lambda s, r: fa.slowdown(0, r, 4, 0.25, 5.0)["abcd".index(s)]  # round r's draw
  job_seconds = lambda s, r: (0.1 + nbytes[s] * 8 / 1e8 + nbytes[s] * 8 / up[s]
                              + 2 * 0.05 / speed[s] * slow(s, r))
  finish = {s: job_seconds(s, 1) for s in "abcd"}
  version = {s: 0 for s in "abcd"}
  clock, lagged = 0.0, 0
  for v, r in enumerate(rows):
    buffer = sorted("abcd", key=lambda s: (finish[s], s))[:2]
    t = finish[buffer[1]]
    assert sorted(r["sites"]) == sorted(buffer)
    assert r["staleness"] == {s: v - version[s] for s in buffer}
    assert math.isclose(r["sim_clock"], t, rel_tol=1e-12)
    assert math.isclose(r["sim_seconds"], t - clock, rel_tol=1e-9, abs_tol=1e-12)
    w = {s: r["weights"][s] * math.sqrt(1 + r["staleness"][s]) for s in buffer}
    assert math.isclose(sum(w.values()), 1.0, rel_tol=1e-5)  # n_k / sum n over the buffer
    lagged += len(r["stragglers"])
    for s in buffer:
      finish[s], version[s] = t + job_seconds(s, v + 2), v + 1
    clock = t
  assert lagged >= 1 and any(max(r["staleness"].values()) >= 1 for r in rows)
  # Kill: hold the first read of a batch index no site reached by round 3 (2 per delivery).
  reads = {s: 0 for s in "abcd"}
  for r in rows[:3]:
    for s in r["sites"]:
      reads[s] += 2
  workdir = tmp_path / "w"
  hold = f"hold_at={max(reads.values()) + 1}:{tmp_path / 'never'}"
  job = faults.Job(faults.cmd(workdir, *ASYNC, command="federated", config=TINY),
                    _env(data_dir, cache, hold), logs=tmp_path / "logs")
  faults.signal_when(job, lambda: 2 in faults.checkpoint_steps(workdir), signal.SIGKILL,
                     what="checkpoint 2")
  proc = faults.run(faults.cmd(workdir, *ASYNC, command="federated", config=TINY),
                    _env(data_dir, cache))
  assert "resumed from checkpoint at round" in proc.stdout
  assert _rounds(workdir) == rows
  assert json.loads((workdir / "eval.json").read_text()) == \
      json.loads((ref / "eval.json").read_text())
  # `jmtl eval` restores the async checkpoint (with the sites' start parameters) and evaluates
  # the same server parameters the run evaluated last.
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "eval", "--config", str(TINY),
                        "--workdir", str(ref), *ASYNC], env=_env(data_dir, cache), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  again = json.loads(out.stdout)
  assert again["step"] == 6
  assert again["bbc_topic/accuracy"] == json.loads((ref / "eval.json").read_text())[
      "bbc_topic/accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigterm_in_close", "sigterm_after_run"])
def test_sigterm_as_a_finished_run_closes_prints_its_lines_and_exits_143(
    fault, tmp_path, data_dir, cache):
  """SIGTERM while the finished run closes (its last checkpoint committing), or right after it
  returned (before the final line): the checkpoint of the last round is on disk, the final
  line and the signal line are printed, exit 128 + 15, as the trainer answers a signal (it
  was killed silently, or the signal was dropped with exit 0)."""
  workdir = tmp_path / "w"
  proc = faults.run(faults.cmd(workdir, "--config.fed.rounds=2", command="federated",
                               config=TINY), _env(data_dir, cache, fault))
  assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-3000:])
  assert "final evaluation (validation, round 2)" in proc.stdout, proc.stdout[-2000:]
  assert "received signal 15: saved checkpoint at round 2, exiting" in proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert faults.checkpoint_steps(workdir)[-1] == 2
  assert [r["round"] for r in _rounds(workdir)] == [0, 1, 2]  # 0: the initial model
