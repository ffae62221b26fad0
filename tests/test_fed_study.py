"""The federated study: `jmtl study federated` (plan, centralized arm at equal compute, resume)
and `jmtl report federated` (numbers checked against hand-computed values from hand-written
rounds.jsonl / metrics.jsonl files, and from the files a tiny real study wrote)."""

import csv
import json
import math
import pathlib

import pytest

import faults

from jmtl import cli
from jmtl import config as config_lib
from jmtl.defaults import base_config
from jmtl.study import fed_report
from jmtl.study import mtl as study_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_fed_study.py"
T_975_2 = 4.302652729749464  # Student's t, 0.975 quantile, 2 degrees of freedom (tables: 4.303)
TARGET = 70.0

# Dev evaluations of the hand-written runs: seed -> {round: (sst2/accuracy, mrpc/f1)}; the
# score is their mean. The last round is also the run's eval.json.
FEDAVG = {0: {0: (50, 80), 2: (60, 80), 4: (66, 80)},   # 65, 70 (reached at 2), 73
          1: {0: (50, 80), 2: (50, 80), 4: (62, 80)},   # 65, 65, 71 (reached at 4)
          2: {0: (70, 80), 2: (55, 80), 4: (56, 80)}}   # 75 at round 0 does not count; 67.5, 68
INT8 = {0: {0: (50, 80), 2: (64, 80), 4: (70, 80)},     # 72 (2), 75
        1: {0: (50, 80), 2: (62, 80), 4: (64, 80)},     # 71 (2), 72
        2: {0: (50, 80), 2: (58, 80), 4: (62, 80)}}     # 69, 71 (4)
# The centralized arm (H = 5 steps per round): step -> (sst2, f1); round = ceil(step / 5).
CENTRAL = {0: {4: (40, 80), 12: (61, 80), 20: (64, 80)},  # rounds 1, 3 (70.5: reached), 4
           1: {4: (40, 80), 12: (50, 80), 20: (60, 80)}}  # reached at round 4 (70)


def _config(arm, seed, parts, reference="", centralized=False, **fed):
  c = base_config()
  c.tasks = ("sst2", "mrpc")
  c.seed = seed
  c.study.arm, c.study.parts, c.study.reference = arm, tuple(parts), reference
  c.study.centralized, c.study.target = centralized, TARGET
  c.fed.local_steps = 5
  c.fed.sites = () if centralized else (dict(name="a", cloud="gcp"), dict(name="b", cloud="aws"))
  for k, v in fed.items():
    c.fed[k] = v
  return c


def _write_fed_run(run_dir, cfg, evals, *, seconds, up, eps=None):
  """rounds.jsonl of rounds 0-4 (sites a, b; b dropped in round 3), evaluations `evals`;
  round r lasts seconds[r - 1] and uploads `up` bytes; cost per cloud grows by 0.1 a round."""
  run_dir.mkdir(parents=True)
  (run_dir / "config.json").write_text(config_lib.to_json(cfg))
  rows = []
  for r in range(5):
    row = {"round": r}
    if r:
      sites = ["a"] if r == 3 else ["a", "b"]
      row.update({"sites": sites, "dropped": ["b"] if r == 3 else [],
                  "bytes_up": {"a": up, "total": up}, "sim_seconds": seconds[r - 1],
                  "sim_cost": {"aws": 0.1 * r, "gcp": 0.2 * r}, "sim_cost_total": 0.3 * r})
      if eps is not None:
        row["dp_epsilon_rdp"], row["dp_epsilon_pld"] = eps * r, 0.8 * eps * r
    if r in evals:
      row.update({"sst2/accuracy": evals[r][0], "mrpc/f1": evals[r][1], "mrpc/accuracy": 1.0})
    rows.append(row)
  (run_dir / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  last = evals[max(evals)]
  (run_dir / "eval.json").write_text(json.dumps({"sst2/accuracy": last[0], "mrpc/f1": last[1],
                                                 "site/a/sst2/accuracy": 1.0}))


@pytest.fixture
def fake_study(tmp_path):
  root = tmp_path / "study"
  everything = ("central", "noniid", "aggregation", "compression", "dp", "clouds")
  for s in range(3):
    _write_fed_run(root / "fedavg" / f"seed{s}", _config("fedavg", s, everything), FEDAVG[s],
                   seconds=[2.0 + 0.5 * s, 3.0, 2.5, 4.0], up=1000)
    _write_fed_run(root / "buff" / f"seed{s}",
                   _config("buff", s, ["clouds"], "fedavg", mode="async", buffer_size=2),
                   INT8[s], seconds=[1.0] * 4, up=500)
    _write_fed_run(root / "int8" / f"seed{s}",
                   _config("int8", s, ["compression"], "fedavg", compress="int8"), INT8[s],
                   seconds=[1.0] * 4, up=250)
  for s in range(2):
    _write_fed_run(root / "dp" / f"seed{s}", _config("dp", s, ["dp"], "fedavg"), FEDAVG[s],
                   seconds=[1.0] * 4, up=1000, eps=1.0)
    d = root / "central" / f"seed{s}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(config_lib.to_json(
        _config("central", s, ["central"], "fedavg", centralized=True)))
    rows = [{"step": k, "split": "eval", "sst2/accuracy": a, "mrpc/f1": f}
            for k, (a, f) in CENTRAL[s].items()]
    rows.insert(1, {"step": 5, "split": "train", "train/loss": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    a, f = CENTRAL[s][20]
    (d / "eval.json").write_text(json.dumps({"sst2/accuracy": a, "mrpc/f1": f}))
  return root


def _std(xs):
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_report_matches_hand_computed_values(fake_study, tmp_path):
  out = tmp_path / "report"
  rep = fed_report.report_federated([fake_study], out)
  assert rep["target"] == TARGET
  assert rep["parts"]["compression"] == ["fedavg", "int8"]
  assert rep["parts"]["central"] == ["fedavg", "central"]
  t = rep["table"]

  f = t["fedavg"]
  assert f["final"]["values"] == [73.0, 71.0, 68.0]
  assert f["final"]["mean"] == pytest.approx(212 / 3) and f["final"]["std"] == pytest.approx(
      _std([73, 71, 68]))
  assert f["rounds_to_target"] == [2, 4, None]  # seed 2's round-0 score of 75 does not count
  assert f["reached"] == 2 and f["rounds_to_target_mean"] == pytest.approx(3.0)
  # clocks: seed 0 rounds 1-2 = 2 + 3; seed 1 rounds 1-4 = 2.5 + 3 + 2.5 + 4
  assert f["sim_s_to_target"]["values"] == pytest.approx([5.0, 12.0])
  assert f["bytes_up_to_target"]["values"] == [2000.0, 4000.0]
  assert f["bytes_up"]["mean"] == 4000.0
  assert f["sim_seconds"]["values"] == pytest.approx([11.5, 12.0, 12.5])
  assert f["cost_total"]["mean"] == pytest.approx(1.2)
  assert f["cost"]["gcp"]["mean"] == pytest.approx(0.8)
  assert f["clouds"]["aws"]["in"]["mean"] == 3 and f["clouds"]["aws"]["dropped"]["mean"] == 1
  assert f["clouds"]["gcp"]["in"]["mean"] == 4
  assert f["epsilon_rdp"]["n"] == 0 and "paired" not in f

  i = t["int8"]
  assert i["rounds_to_target"] == [2, 2, 4]
  assert i["bytes_up_to_target"]["mean"] == pytest.approx((500 + 500 + 1000) / 3)
  p = i["paired"]  # 75 - 73, 72 - 71, 71 - 68
  half = T_975_2 * 1.0 / math.sqrt(3)
  assert p["per_seed"] == pytest.approx({"0": 2.0, "1": 1.0, "2": 3.0})
  assert p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0)
  assert p["ci95"] == pytest.approx([2.0 - half, 2.0 + half]) and p["ahead"] == 3
  pr = i["paired_rounds"]  # seeds where both reached it: 2 - 2, 2 - 4
  assert pr["n"] == 2 and pr["mean"] == pytest.approx(-1.0)
  assert pr["std"] == pytest.approx(math.sqrt(2.0))

  c = t["central"]  # rounds = ceil(step / 5): step 12 -> 3, step 20 -> 4
  assert c["rounds_to_target"] == [3, 4] and c["sim_s_to_target"]["n"] == 0
  assert c["bytes_up"]["n"] == 0 and c["paired"]["per_seed"] == pytest.approx(
      {"0": -1.0, "1": -1.0})

  b = t["buff"]  # asynchronous: a round is a server step, so rounds are not paired with FedAvg's
  assert b["paired"]["n"] == 3 and "paired_rounds" not in b
  assert rep["settings"]["clouds"]["buff"] == "async FedBuff K=2"

  d = t["dp"]
  assert d["epsilon_rdp"]["values"] == [4.0, 4.0]
  assert d["epsilon_pld"]["mean"] == pytest.approx(3.2)

  with (out / "federated.csv").open() as fh:
    rows = {(r["part"], r["arm"]): r for r in csv.DictReader(fh)}
  r = rows[("compression", "int8")]
  assert (r["setting"], r["n"], r["reference"], r["ahead"], r["reached"]) == (
      "int8", "3", "fedavg", "3", "3")
  assert float(r["delta_mean"]) == pytest.approx(2.0)
  assert float(r["bytes_up_mean"]) == 1000.0 and r["rounds_to_target_values"] == "2 2 4"
  assert rows[("compression", "fedavg")]["setting"] == "float32"
  with (out / "clouds.csv").open() as fh:
    clouds = {(r["arm"], r["cloud"]): r for r in csv.DictReader(fh)}
  assert float(clouds[("fedavg", "aws")]["cost_mean"]) == pytest.approx(0.4)
  md = (out / "federated.md").read_text()
  assert ("| int8 | int8 | 3 | 72.67 ± 2.08 | +2.00 ± 1.00 [-0.48, +4.48] (3/3) | 2.7 (3/3) | "
          "-1.0 ± 1.4") in md
  assert "## (e) Client-level differential privacy" in md
  assert rep["parts"]["noniid"] == ["fedavg"]  # fedavg alone in (b): its numbers, no pairs
  for name in ("dev_vs_round.png", "dev_vs_sim_seconds.png", "bytes_vs_score.png",
               "epsilon_vs_score.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_refuses_mixed_targets_and_bad_lines(fake_study, tmp_path):
  other = tmp_path / "other" / "seed0"
  cfg = _config("int8", 5, ["compression"], "fedavg")
  cfg.study.target = 60.0
  _write_fed_run(other, cfg, INT8[0], seconds=[1.0] * 4, up=1)
  with pytest.raises(ValueError, match="different study.target"):
    fed_report.report_federated([fake_study, tmp_path / "other"], tmp_path / "o")
  bad = fake_study / "int8" / "seed1" / "rounds.jsonl"
  bad.write_text(bad.read_text() + "{not json\n")
  with pytest.raises(ValueError, match=r"rounds.jsonl:6: not valid JSON"):
    fed_report.report_federated([fake_study], tmp_path / "o")


def _set_study(root, **keys):
  """Rewrites `study.<key>` in every config.json under `root` (as a study config sets them)."""
  for path in root.rglob("config.json"):
    cfg = json.loads(path.read_text())
    cfg["study"].update(keys)
    path.write_text(json.dumps(cfg))


def test_report_scores_by_target_metric(fake_study, tmp_path):
  # study.target_metric = sst2/accuracy, target 60: the score is SST-2 accuracy alone (by hand
  # from FEDAVG / INT8 / CENTRAL above; round 0 never counts).
  _set_study(fake_study, target=60.0, target_metric="sst2/accuracy")
  rep = fed_report.report_federated([fake_study], tmp_path / "r")
  assert rep["target"] == 60.0 and rep["target_metric"] == "sst2/accuracy"
  t = rep["table"]
  assert t["fedavg"]["final"]["values"] == [66.0, 62.0, 56.0]
  assert t["fedavg"]["rounds_to_target"] == [2, 4, None]  # seed 2: 70 at round 0 only
  assert t["int8"]["final"]["values"] == [70.0, 64.0, 62.0]
  assert t["int8"]["rounds_to_target"] == [2, 2, 4]
  assert t["central"]["rounds_to_target"] == [3, 4]  # steps 12 (61) and 20 (60), H = 5
  md = (tmp_path / "r" / "federated.md").read_text()
  assert "Dev score = sst2/accuracy (study.target_metric, percent)" in md
  _set_study(fake_study, target_metric="rte/accuracy")
  with pytest.raises(ValueError, match="study.target_metric 'rte/accuracy' names a task the "
                                       "run did not train"):
    fed_report.report_federated([fake_study], tmp_path / "r")
  _set_study(fake_study / "int8", target_metric="mrpc/f1")
  with pytest.raises(ValueError, match="different study.target_metric"):
    fed_report.report_federated([fake_study], tmp_path / "r")


def _tiny(overrides=()):
  study = config_lib.load_config_file(TINY)
  study_over, arm_over = study_lib.split_overrides(list(overrides))
  cli.apply_overrides(study, study_over)
  arms = study_lib.load_arms(study, TINY, arm_over, cli.apply_overrides, kind="federated")
  return study, arms


def test_centralized_arm_matches_total_compute():
  study, arms = _tiny(["--config.study.target=55"])
  runs = study_lib.plan(study, arms)
  assert [r.relpath for r, _ in runs] == ["fedavg/seed0", "central/seed0", "fedavg/seed1",
                                          "central/seed1"]
  fed, central = runs[0][1], runs[1][1]
  S, H, R, B = len(fed.fed.sites), fed.fed.local_steps, fed.fed.rounds, fed.data.batch_size
  assert (S, H, R, B) == (4, 2, 2, 8)
  # the federated run: S x H x R local steps of B rows; the centralized one: H x R of S x B
  assert central.train.steps * central.data.batch_size == S * H * R * B
  assert (central.train.steps, central.data.batch_size) == (4, 32)
  assert central.fed.sites == () and central.optim.name == "adamw"
  assert central.optim.lr == pytest.approx(3e-3)  # fed.client_lr
  assert central.train.eval_every == 2 and central.fed.local_steps == 2
  assert fed.study.target == 55.0 and central.study.target == 55.0
  assert fed.fed.sites and fed.train.steps == base_config().train.steps


class FakeTrainer:
  """Same signature as `jmtl.study.mtl.default_train`: writes config.json and eval.json."""

  def __init__(self):
    self.calls = []

  def __call__(self, cfg, run_dir):
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    self.calls.append((cfg.study.arm, cfg.seed, bool(cfg.fed.sites)))
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    (run_dir / "eval.json").write_text(json.dumps({"sst2/accuracy": 50.0}))
    return {}


def test_study_resumes_and_ignores_a_changed_target(tmp_path, capsys):
  over = ["--config.data.tokenizer=unused-vocab.txt"]
  study, arms = _tiny(over)
  trainer = FakeTrainer()
  result = study_lib.run_study(study, arms, tmp_path / "w", train_fn=trainer)
  assert trainer.calls == [("fedavg", 0, True), ("central", 0, False), ("fedavg", 1, True),
                           ("central", 1, False)]
  assert result["target"] == 50.0
  assert result["arms"]["central"]["centralized"] is True
  assert result["arms"]["fedavg"]["parts"] == ["central", "aggregation"]
  again = FakeTrainer()
  study2, arms2 = _tiny(over + ["--config.study.target=60"])  # a report-only key
  study_lib.run_study(study2, arms2, tmp_path / "w", train_fn=again)
  assert again.calls == []
  assert capsys.readouterr().out.count("done before, skipped") == 4
  study2b, arms2b = _tiny(over + ["--config.study.target_metric=sst2/accuracy"])
  study_lib.run_study(study2b, arms2b, tmp_path / "w", train_fn=again)  # report-only too
  assert again.calls == []
  study3, arms3 = _tiny(over + ["--config.fed.rounds=3"])
  with pytest.raises(ValueError, match="different config .*'fed.rounds'"):
    study_lib.run_study(study3, arms3, tmp_path / "w", train_fn=FakeTrainer())


_error_line = faults.cli_error_line


def test_cli_mistakes_are_one_line(capsys, tmp_path, fake_study):
  assert "jmtl report federated needs --runs" in _error_line(
      capsys, ["report", "federated", "--out", "x"])
  assert "not a directory" in _error_line(
      capsys, ["report", "federated", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path)])
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "no run of a study arm found" in _error_line(
      capsys, ["report", "federated", "--runs", str(empty), "--out", str(tmp_path / "o")])
  assert "flag --workdir does not apply to jmtl report federated" in _error_line(
      capsys, ["report", "federated", "--runs", str(empty), "--workdir", "x"])
  bad = fake_study / "fedavg" / "seed0" / "rounds.jsonl"
  bad.write_text("{\n")
  line = _error_line(capsys, ["report", "federated", "--runs", str(fake_study), "--out",
                              str(tmp_path / "o")])
  assert f"{bad}:1: not valid JSON" in line
  (fake_study / "int8" / "seed0" / "eval.json").write_text("[")
  assert "cannot read" in _error_line(
      capsys, ["report", "federated", "--runs", str(fake_study), "--out", str(tmp_path / "o")])
  assert "jmtl study needs one of: mtl, federated" in _error_line(
      capsys, ["study", "--workdir", "x"])
  arm = tmp_path / "arm.py"
  arm.write_text("from jmtl.defaults import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.study.arm = 'x'\n  return c\n")
  study = tmp_path / "study.py"
  study.write_text("from jmtl.defaults import base_config\n"
                   "def get_config():\n  c = base_config()\n  c.study.arms = ('arm.py',)\n"
                   "  return c\n")
  assert "'fed.sites' is empty in" in _error_line(
      capsys, ["study", "federated", "--config", str(study), "--workdir", str(tmp_path / "w")])
  study.write_text("from jmtl.defaults import base_config\n"
                   "def get_config():\n  c = base_config()\n"
                   f"  c.study.arms = ({str(REPO / 'tests' / 'configs' / 'tiny_fed_study_central.py')!r},)\n"
                   "  return c\n")
  assert "'study.target' = -1.0 must be >= 0" in _error_line(
      capsys, ["study", "federated", "--config", str(study), "--workdir", str(tmp_path / "w"),
               "--config.study.target=-1"])
  assert "'study.target_metric' = 'sst2' must be '' or 'task/metric'" in _error_line(
      capsys, ["study", "federated", "--config", str(study), "--workdir", str(tmp_path / "w"),
               "--config.study.target_metric=sst2"])


@pytest.mark.slow
def test_tiny_study_resume_and_report_through_the_cli(data_dir, tmp_path, capsys):
  """2 arms (FedAvg over 4 sites; its centralized baseline) x 2 seeds, 2 rounds of 2 local
  steps on real SST-2 rows; a second invocation trains nothing; the report's numbers equal
  those computed here from the files it read."""
  work, out = tmp_path / "w", tmp_path / "report"
  argv = ["jmtl", "study", "federated", "--config", str(TINY), "--workdir", str(work),
          f"--config.data.dir={data_dir}"]
  assert cli.run(argv) == 0
  assert "study done: 4 of 4 run(s) finished" in capsys.readouterr().out
  assert cli.run(argv) == 0
  text = capsys.readouterr().out
  assert text.count("done before, skipped") == 4 and ": training" not in text
  central = json.loads((work / "central" / "seed0" / "config.json").read_text())
  assert central["fed"]["sites"] == [] and central["train"]["steps"] == 4
  assert central["data"]["batch_size"] == 32
  assert cli.run(["jmtl", "report", "federated", "--runs", str(work), "--out", str(out)]) == 0
  rep = json.loads((out / "report.json").read_text())
  target = rep["target"]
  assert target == 50.0

  def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

  finals, reached, clocks = [], [], []
  for s in (0, 1):
    run = work / "fedavg" / f"seed{s}"
    lines = rows(run / "rounds.jsonl")
    assert [x["round"] for x in lines] == [0, 1, 2]
    finals.append(json.loads((run / "eval.json").read_text())["sst2/accuracy"])
    first = next((x["round"] for x in lines if x["round"] > 0
                  and x["sst2/accuracy"] >= target), None)
    reached.append(first)
    clocks.append(sum(x["sim_seconds"] for x in lines[1:first + 1]) if first else None)
  f = rep["table"]["fedavg"]
  assert f["final"]["values"] == pytest.approx(finals)
  assert f["final"]["mean"] == pytest.approx(sum(finals) / 2)
  assert f["final"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
  assert f["rounds_to_target"] == reached
  assert f["sim_s_to_target"]["values"] == pytest.approx([c for c in clocks if c is not None])
  c_finals, c_reached = [], []
  for s in (0, 1):
    run = work / "central" / f"seed{s}"
    evals = [x for x in rows(run / "metrics.jsonl") if x.get("split") == "eval"]
    assert [x["step"] for x in evals] == [2, 4]  # every H = 2 steps: one round's work
    c_finals.append(json.loads((run / "eval.json").read_text())["sst2/accuracy"])
    c_reached.append(next((x["step"] // 2 for x in evals if x["sst2/accuracy"] >= target),
                          None))
  c = rep["table"]["central"]
  assert c["final"]["values"] == pytest.approx(c_finals)
  assert c["rounds_to_target"] == c_reached
  assert c["paired"]["per_seed"] == pytest.approx(
      {"0": c_finals[0] - finals[0], "1": c_finals[1] - finals[1]})
  assert (out / "federated.csv").is_file() and (out / "dev_vs_sim_seconds.png").is_file()


def test_study_config_plans_every_arm_and_passes_preflight(data_dir):
  """configs/fed_study.py: 16 arms x 3 seeds = 48 runs; every arm's run config passes the
  checks of the command that trains it (`jmtl federated`, or `jmtl train` for the centralized
  arm: data files, the mesh of 4 sites against this process's devices)."""
  from jmtl import preflight
  path = REPO / "configs" / "fed_study.py"
  study = config_lib.validate(config_lib.load_config_file(path), check_files=False)
  arms = study_lib.load_arms(study, path, [f"--config.data.dir={data_dir}"],
                             cli.apply_overrides, kind="federated")
  parts = {p: [a.name for a in arms if p in a.config.study.parts] for p in fed_report.PARTS}
  assert parts == {
      "central": ["fedavg", "central"], "noniid": ["fedavg", "iid", "alpha1", "alpha01"],
      "aggregation": ["fedavg", "dynamic", "gradient", "fedadam", "diloco", "fedbuff"],
      "compression": ["fedavg", "int8", "q4", "topk"], "dp": ["fedavg", "dp_z1", "dp_z01"],
      "clouds": ["fedavg", "fedbuff", "deadline"]}
  assert all(a.reference == "fedavg" for a in arms[1:]) and arms[0].reference == ""
  runs = study_lib.plan(study, arms)
  assert len(runs) == 48 and {cfg.study.target for _, cfg in runs} == {70.0}
  assert {cfg.study.target_metric for _, cfg in runs} == {"sst2/accuracy"}
  checked = set()
  for run, cfg in runs:
    if run.arm == "central":  # 4 sites x 10 local steps x 60 rounds of 16 rows
      assert (cfg.train.steps, cfg.data.batch_size) == (600, 64) and cfg.optim.lr == 2e-3
    elif run.arm == "fedbuff":  # 120 server steps of K = 2 site jobs = 60 rounds x 4 sites
      assert (cfg.fed.rounds, cfg.fed.buffer_size) == (120, 2)
    else:
      assert (cfg.fed.rounds, cfg.fed.local_steps, len(cfg.fed.sites)) == (60, 10, 4)
    if run.arm not in checked:
      checked.add(run.arm)
      preflight.run(cfg, "federated" if cfg.fed.sites else "train", None)
