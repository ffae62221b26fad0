"""The optimizer sweep and its report, driven by a synthetic trainer with known optima.

The fake trainer's final SST-2 accuracy is `peak[opt] - 5 * |log_3(lr / best[opt])| + 2 * seed`
(plus a fixed change per switch toggled from its default), MRPC F1 = accuracy - 10, so every
expected number below is worked out by hand from those formulas.
"""

import json
import math
import pathlib

import pytest

from jmtl import config as config_lib
from jmtl.defaults import base_config
from jmtl.eval import metrics as metrics_lib
from jmtl.study import report as report_lib
from jmtl.study import sweep as sweep_lib
from jmtl.train import NonFiniteError

PEAK = {"sgd": 70.0, "adamw": 80.0, "jmtl_adaptive": 84.0}
BEST = {"sgd": 0.3, "adamw": 0.003, "jmtl_adaptive": 0.001}
REACH = {"sgd": 90, "adamw": 50, "jmtl_adaptive": 30}  # step where the dev curve saturates
# accuracy change when a switch differs from its default (belief off, the others on)
ABLATION_EFFECT = {"belief": -1.0, "cautious": -2.0, "block_nu": -0.5, "metric_schedule": -3.0}
DEFAULTS = base_config().optim
STEPS, EVAL_EVERY = 100, 2


class FakeTrainer:
  """Same signature as `jmtl.train.loop.train`; writes metrics.jsonl and eval.json."""

  def __init__(self):
    self.calls = []

  def __call__(self, cfg, run_dir):
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    o = cfg.optim
    self.calls.append((o.name, o.lr, cfg.seed))
    if o.name == "sgd" and math.isclose(o.lr, 0.3) and cfg.seed == 1:
      raise NonFiniteError("non-finite loss at step 7")
    acc = PEAK[o.name] - 5 * abs(round(math.log(o.lr / BEST[o.name], 3))) + 2 * cfg.seed
    if o.name == "jmtl_adaptive":
      acc += sum(d for sw, d in ABLATION_EFFECT.items() if o[sw] != DEFAULTS[sw])
    rows = []
    for step in range(1, cfg.train.steps + 1):
      if step % cfg.train.log_every == 0:
        rows.append({"step": step, "split": "train",
                     "train/loss": 2 * math.exp(-step / REACH[o.name]) + 0.1 * cfg.seed})
      if step % cfg.train.eval_every == 0:
        frac = min(1.0, step / REACH[o.name])
        rows.append({"step": step, "split": "eval", "sst2/accuracy": acc * frac,
                     "mrpc/f1": (acc - 10) * frac, "mrpc/accuracy": (acc - 5) * frac})
    with (run_dir / "metrics.jsonl").open("a") as f:  # appends, as the real trainer does
      f.write("".join(json.dumps(r) + "\n" for r in rows))
    final = {"step": cfg.train.steps, "sst2/accuracy": acc, "mrpc/f1": acc - 10,
             "mrpc/accuracy": acc - 5}
    (run_dir / "eval.json").write_text(json.dumps(final))
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    return final


def study_config():
  c = base_config()
  c.tasks = ("sst2", "mrpc")
  c.train.steps = STEPS
  c.train.eval_every = EVAL_EVERY
  c.train.log_every = 2
  c.sweep.optimizers = ("sgd", "adamw", "jmtl_adaptive")
  c.sweep.target_fraction = 0.9
  return c


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  trainer = FakeTrainer()
  result = sweep_lib.run_sweep(study_config(), workdir, train_fn=trainer, share_tokenizer=False,
                               check_files=False)
  return workdir, trainer, result


def test_lr_grid_is_log_spaced_around_the_centre():
  assert sweep_lib.lr_grid(1e-3, 4, 3.0) == [0.000333, 0.001, 0.003, 0.009]
  assert sweep_lib.lr_grid(0.01, 5, 10.0) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
  with pytest.raises(ValueError, match="centre"):
    sweep_lib.lr_grid(0.0, 4, 3.0)


def test_run_config_sets_optimizer_lr_seed_overrides_and_ablation():
  c = study_config()
  c.sweep.overrides = (("adamw", "optim.schedule", "constant"), ("adamw", "optim.lr", 5.0))
  cfg = sweep_lib.run_config(c, sweep_lib.Run("adamw", 0.003, 2))
  assert (cfg.optim.name, cfg.optim.lr, cfg.seed, cfg.optim.schedule) == (
      "adamw", 0.003, 2, "constant")
  other = sweep_lib.run_config(c, sweep_lib.Run("sgd", 0.1, 0))
  assert other.optim.schedule == "linear"  # overrides are per optimizer
  assert c.optim.name == "adamw" and c.seed == 0  # the study config is not mutated
  ab = sweep_lib.run_config(c, sweep_lib.Run("jmtl_adaptive", 1e-3, 0, "no_cautious"))
  assert ab.optim.cautious is False and ab.optim.belief is False
  ab = sweep_lib.run_config(c, sweep_lib.Run("jmtl_adaptive", 1e-3, 0, "with_belief"))
  assert ab.optim.belief is True and ab.optim.cautious is True
  assert [sweep_lib.ablation_variant(c, sw) for sw in ("belief", "cautious", "trust_ratio")] == [
      "with_belief", "no_cautious", "with_trust_ratio"]
  c.optim.update_clip = 1.0
  ab = sweep_lib.run_config(c, sweep_lib.Run("jmtl_adaptive", 1e-3, 0, "no_update_clip"))
  assert ab.optim.update_clip == 0.0
  assert sweep_lib.Run("jmtl_adaptive", 1e-3, 1, "no_belief").relpath == \
      "ablation/no_belief/lr0.001/seed1"


@pytest.mark.parametrize("key,value,match", [
    ("lr_points", 3, "sweep.lr_points"),
    ("seeds", (0, 1), "sweep.seeds"),
    ("seeds", (0, 0, 1), "sweep.seeds"),
    ("optimizers", ("adamw", "nosuch"), "unknown optimizer 'nosuch'"),
    ("lr_centres", (("adamw", 1e-3),), "no centre for 'sgd'"),
    ("ablation", ("update_clip",), "no value to turn on"),
    ("ablation", ("wings",), "unknown switch"),
    ("reference", "adam", "sweep.reference"),
    ("select_metric", "cola/mcc", "sweep.select_metric"),
    ("overrides", (("adamw", "optim.nosuch", 1),), "unknown key 'optim.nosuch'"),
    ("overrides", (("adamw", "optim.schedule", 3),), "optim.schedule"),
    ("overrides", (("adamx", "optim.schedule", "constant"),), "known optimizer"),
    ("confirm_seeds", (5,), "sweep.confirm_seeds.*>= 2 distinct"),
    ("confirm_seeds", (5, 5), "sweep.confirm_seeds.*>= 2 distinct"),
    ("confirm_seeds", (2, 5), "sweep.confirm_seeds.*must be fresh"),
])
def test_bad_sweep_config_names_the_key(key, value, match):
  c = study_config()
  c.sweep[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    sweep_lib.check_sweep_config(c)
    sweep_lib.run_config(c, sweep_lib.Run("adamw", 1e-3, 0))


def test_overrides_may_name_an_optimizer_outside_the_sweep():
  c = study_config()
  c.sweep.optimizers, c.sweep.ablation = ("sgd", "adamw"), ()
  c.sweep.overrides = (("jmtl_adaptive", "optim.schedule", "constant"),)
  sweep_lib.check_sweep_config(c)  # a subset of a study's optimizers keeps the study's overrides
  assert sweep_lib.run_config(c, sweep_lib.Run("sgd", 0.1, 0)).optim.schedule == "linear"


def test_ablation_needs_jmtl_adaptive():
  c = study_config()
  c.sweep.optimizers = ("sgd", "adamw")
  with pytest.raises(config_lib.ConfigError, match="jmtl_adaptive"):
    sweep_lib.check_sweep_config(c)


def test_select_best_hand_example():
  rec = lambda lr, s: {"optimizer": "adam", "variant": "", "lr": lr, "score": s}
  records = [rec(0.1, 50.0), rec(0.1, 60.0), rec(0.1, 70.0),  # mean 60, std 10
             rec(0.3, 90.0), rec(0.3, None), rec(0.3, 95.0),  # diverged seed: not eligible
             rec(0.01, 62.0), rec(0.01, 58.0), rec(0.01, 60.0),  # mean 60 too: tie -> smaller lr
             rec(0.03, 59.0), rec(0.03, 59.0), rec(0.03, 59.0)]
  best = sweep_lib.select_best(records, "adam")
  assert best["lr"] == 0.01
  assert best["score_mean"] == pytest.approx(60.0)
  assert best["score_std"] == pytest.approx(2.0)  # sqrt(((2)^2 + (-2)^2 + 0) / 2)
  assert best["by_lr"]["0.1"]["std"] == pytest.approx(10.0)
  assert best["by_lr"]["0.3"] == {"mean": 92.5, "std": pytest.approx(math.sqrt(12.5)), "n": 3,
                                  "diverged": 1}
  assert sweep_lib.select_best([rec(0.1, None)] * 3, "adam")["lr"] is None


def test_score_is_mean_of_keys_and_nan_when_missing():
  assert sweep_lib.score({"a/x": 80.0, "b/y": 70.0}, ["a/x", "b/y"]) == 75.0
  assert math.isnan(sweep_lib.score({"a/x": 80.0, "b/y": None}, ["a/x", "b/y"]))
  assert math.isnan(sweep_lib.score({"a/x": 80.0}, ["a/x", "b/y"]))
  assert metrics_lib.primary_metric_keys(["sst2", "mrpc", "squad"]) == [
      "sst2/accuracy", "mrpc/f1", "squad/exact_match"]


def test_sweep_runs_grid_then_ablation_and_selects_best(swept):
  workdir, trainer, result = swept
  # 3 optimizers x 4 lrs x 3 seeds + 4 switches x 3 seeds.
  assert len(trainer.calls) == 36 + 12
  assert trainer.calls[-12:] == [("jmtl_adaptive", 0.001, s) for s in (0, 1, 2)] * 4
  best = result["best"]
  assert best["adamw"]["lr"] == 0.003 and best["jmtl_adaptive"]["lr"] == 0.001
  # sgd's 0.3 diverged on seed 1; 0.1 and 0.9 tie at 65 -> the smaller.
  assert best["sgd"]["lr"] == 0.1
  # adamw at 0.003: accuracies 80, 82, 84 -> score (acc + acc - 10) / 2 = 75, 77, 79.
  assert best["adamw"]["score_mean"] == pytest.approx(77.0)
  assert best["adamw"]["score_std"] == pytest.approx(2.0)
  saved = json.loads((workdir / "sweep.json").read_text())
  assert saved["select_keys"] == ["sst2/accuracy", "mrpc/f1"]
  assert len(saved["runs"]) == 48
  diverged = [r for r in saved["runs"] if r["status"] == "diverged"]
  assert [(r["optimizer"], r["lr"], r["seed"]) for r in diverged] == [("sgd", 0.3, 1)]
  run = next(r for r in saved["runs"] if r["dir"] == "adamw/lr0.009/seed2")
  assert run["metrics"]["sst2/accuracy"] == pytest.approx(80 - 5 * 1 + 4)
  assert (workdir / "ablation/no_metric_schedule/lr0.001/seed2/eval.json").is_file()
  assert (workdir / "ablation/with_belief/lr0.001/seed0/eval.json").is_file()
  assert (workdir / "ablation/no_block_nu/lr0.001/seed1/eval.json").is_file()


def test_sweep_resumes_without_retraining(swept, tmp_path):
  workdir, _, first = swept
  import shutil
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  (copy / "adamw/lr0.001/seed1/eval.json").unlink()  # as if killed before finishing
  stale = copy / "adamw/lr0.001/seed1/metrics.jsonl"
  stale.write_text(stale.read_text() + json.dumps({"step": 999, "split": "train"}) + "\n")
  trainer = FakeTrainer()
  again = sweep_lib.run_sweep(study_config(), copy, train_fn=trainer, share_tokenizer=False,
                              check_files=False)
  assert trainer.calls == [("adamw", 0.001, 1)]  # diverged runs are not retried either
  assert again["best"] == first["best"]
  assert '"step": 999' not in stale.read_text()  # restarted from scratch: stale lines dropped
  assert again["reused_other_code"] == [] and again["assumed_defaults"] == {}


def test_reused_runs_of_other_code_are_named(swept, tmp_path, capsys):
  """run_info.json records the code digest; a run trained by other code is reused but named
  on the console and in sweep.json (runs from before the stamp have none and are not named)."""
  workdir, _, first = swept
  import shutil
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  digest = sweep_lib.code_digest()
  assert len(digest) == 12 and int(digest, 16) >= 0
  info_path = copy / "adamw/lr0.001/seed2/run_info.json"
  info = json.loads(info_path.read_text())
  assert info["code"] == digest  # written by the first sweep
  info["code"] = "0123456789ab"
  info_path.write_text(json.dumps(info))
  unstamped = copy / "sgd/lr0.1/seed0/run_info.json"
  old = json.loads(unstamped.read_text())
  del old["code"]
  unstamped.write_text(json.dumps(old))
  trainer = FakeTrainer()
  again = sweep_lib.run_sweep(study_config(), copy, train_fn=trainer, share_tokenizer=False,
                              check_files=False)
  assert trainer.calls == [] and again["best"] == first["best"]
  assert again["reused_other_code"] == ["adamw/lr0.001/seed2"]
  out = capsys.readouterr().out
  assert "adamw/lr0.001/seed2: done before, skipped (trained by other jmtl code: 0123456789ab" in out
  assert "1 reused run(s) were trained by other jmtl code" in out
  assert json.loads((copy / "sweep.json").read_text())["reused_other_code"] == [
      "adamw/lr0.001/seed2"]


def test_resume_refuses_results_of_another_config(swept, tmp_path, capsys):
  workdir, _, _ = swept
  import shutil
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  c = study_config()
  c.model.layers = 3
  with pytest.raises(ValueError, match="different config.*model.layers"):
    sweep_lib.run_sweep(c, copy, train_fn=FakeTrainer(), share_tokenizer=False, check_files=False)
  c = study_config()
  c.sweep.target_fraction = 0.5  # the sweep section does not change a run: results are reused
  trainer = FakeTrainer()
  sweep_lib.run_sweep(c, copy, train_fn=trainer, share_tokenizer=False, check_files=False)
  assert trainer.calls == []
  # A run written before a key existed: the key counts at its default, and only at it. The
  # reuse names the key (console, sweep.json) unless the run's optimizer does not read it.
  saved = copy / "sgd/lr0.1/seed0/config.json"
  cfg = json.loads(saved.read_text())
  del cfg["optim"]["belief_eps"], cfg["train"]["on_nonfinite"]
  saved.write_text(json.dumps(cfg))
  capsys.readouterr()
  result = sweep_lib.run_sweep(study_config(), copy, train_fn=trainer, share_tokenizer=False,
                               check_files=False)
  assert trainer.calls == []
  assert result["assumed_defaults"] == {"sgd/lr0.1/seed0": ["train.on_nonfinite"]}
  assert ("sgd/lr0.1/seed0: done before, skipped (its config.json lacks train.on_nonfinite: "
          "taken at the default") in capsys.readouterr().out
  # optim keys only jmtl_adaptive reads do not change the other optimizers' runs ...
  c = study_config()
  c.sweep.optimizers, c.sweep.ablation = ("sgd", "adamw"), ()
  c.optim.belief_eps, c.optim.cautious = 1e-8, False
  c.train.val_metric, c.optim.plateau_patience = "sst2/accuracy", 7  # metric-driven ones only
  sweep_lib.run_sweep(c, copy, train_fn=trainer, share_tokenizer=False, check_files=False)
  assert trainer.calls == []
  # ... but they do change jmtl_adaptive's.
  c = study_config()
  c.optim.belief_eps = 1e-8
  with pytest.raises(ValueError, match="jmtl_adaptive.*different config.*optim.belief_eps"):
    sweep_lib.run_sweep(c, copy, train_fn=FakeTrainer(), share_tokenizer=False, check_files=False)


def test_report_tables_steps_to_target_and_pngs(swept, tmp_path):
  workdir, _, _ = swept
  out = tmp_path / "report"
  rep = report_lib.report_optim(workdir, out)
  # jmtl_adaptive final scores 79, 81, 83 -> highest mean 81; target = 0.9 * 81 = 72.9.
  assert rep["target"] == pytest.approx(72.9)
  stt = rep["steps_to_target"]
  # adamw score(step) = final * step / 50 on even steps: 75 -> 50, 77 -> 48, 79 -> 48.
  assert stt["adamw"]["per_seed"] == [50, 48, 48]
  assert stt["adamw"]["mean"] == pytest.approx(146 / 3)
  # jmtl_adaptive (reach 30): 79 -> 28, 81 -> 28 (27.0 is odd), 83 -> 28.
  assert stt["jmtl_adaptive"]["per_seed"] == [28, 28, 28]
  assert stt["jmtl_adaptive"]["ratio_to_reference"] == pytest.approx(28 / (146 / 3))
  # sgd at 0.1: scores 60, 62, 64 never reach 72.9.
  assert stt["sgd"]["reached"] == 0 and stt["sgd"]["ratio_to_reference"] is None
  m = rep["metrics"]["mrpc/f1"]["adamw"]
  assert (m["mean"], m["std"], m["values"]) == (72.0, 2.0, [70.0, 72.0, 74.0])
  # Paired by seed: scores acc - 5 with acc = peak + 2 seed at the best lr, so jmtl_adaptive is
  # 84 - 80 = 4 ahead of adamw on every seed and sgd (0.1: 70 - 5) 15 behind.
  paired = rep["paired_vs_reference"]
  assert paired["jmtl_adaptive"]["per_seed"] == {"0": pytest.approx(4.0), "1": pytest.approx(4.0),
                                                 "2": pytest.approx(4.0)}
  assert (paired["jmtl_adaptive"]["ahead"], paired["jmtl_adaptive"]["n"]) == (3, 3)
  assert paired["sgd"]["mean"] == pytest.approx(-15.0) and paired["sgd"]["ahead"] == 0
  assert paired["jmtl_adaptive no_cautious"]["mean"] == pytest.approx(2.0)
  ab = rep["ablation"]
  assert ab["jmtl_adaptive with_belief"]["delta_vs_full"] == pytest.approx(-1.0)
  assert ab["jmtl_adaptive no_metric_schedule"]["delta_vs_full"] == pytest.approx(-3.0)

  md = (out / "comparison.md").read_text()
  assert "| adamw | 0.003 | 72.00 ± 2.00 | 70.00, 72.00, 74.00 |" in md
  assert "## sst2/accuracy" in md and "## mrpc/accuracy" in md
  assert "| jmtl_adaptive | 3/3 | 28.0 | 0.58 |" in md
  assert "| no_cautious | 79.00 ± 2.00 | -2.00 |" in md
  assert "| jmtl_adaptive | +4.00 ± 0.00 | [+4.00, +4.00] | 3/3 | +4.00, +4.00, +4.00 |" in md
  assert "| sgd | 0.0333, 0.1, 0.3, 0.9 | 0.1 | 62.00 ± 2.00 | 1 diverged run(s) |" in md
  assert "edge of the grid" not in md  # every best lr is inside its grid here
  for name in ("loss_curves.png", "dev_curves.png", "lr_sensitivity.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  saved = json.loads((out / "report.json").read_text())
  assert saved["steps_to_target"]["adamw"]["per_seed"] == [50, 48, 48]
  assert (out / "sweep.json").is_file()
  # Mean loss curve at step 2 for adamw: 2 exp(-2/50) + 0.1 * mean(seed) = 2 exp(-0.04) + 0.1.
  step2 = dict(map(tuple, saved["curves"]["adamw"]["loss"]))[2]
  assert step2 == pytest.approx(2 * math.exp(-0.04) + 0.1)


def test_confirmation_on_fresh_seeds_at_the_best_lr(tmp_path):
  """confirm_seeds: every optimizer again at its best lr with new seeds, after the grid; the
  selection ignores them; the report scores them against the grid's target."""
  c = study_config()
  c.sweep.ablation = ()
  c.sweep.confirm_seeds = (5, 7)
  trainer = FakeTrainer()
  result = sweep_lib.run_sweep(c, tmp_path, train_fn=trainer, share_tokenizer=False,
                               check_files=False)
  assert len(trainer.calls) == 36 + 6
  assert trainer.calls[-6:] == [("sgd", 0.1, 5), ("sgd", 0.1, 7), ("adamw", 0.003, 5),
                                ("adamw", 0.003, 7), ("jmtl_adaptive", 0.001, 5),
                                ("jmtl_adaptive", 0.001, 7)]
  assert (tmp_path / "confirm/adamw/lr0.003/seed7/eval.json").is_file()
  # The confirmation runs score higher (2 * seed) but do not enter the selection.
  assert result["best"]["adamw"]["score_mean"] == pytest.approx(77.0)
  again = FakeTrainer()
  sweep_lib.run_sweep(c, tmp_path, train_fn=again, share_tokenizer=False, check_files=False)
  assert again.calls == []

  rep = report_lib.report_optim(tmp_path, tmp_path / "report")
  conf = rep["confirmation"]
  # Scores (acc + acc - 10) / 2 = acc - 5, acc = peak + 2 seed: adamw 85, 89; jmtl 89, 93.
  assert conf["adamw"]["score"]["values"] == [85.0, 89.0]
  assert conf["jmtl_adaptive"]["seeds"] == [5, 7]
  p = conf["jmtl_adaptive"]["paired_vs_reference"]
  assert p["per_seed"] == {"5": 4.0, "7": 4.0} and p["ci95"] == [4.0, 4.0]
  # Target from the grid seeds: 0.9 * 81 = 72.9. score(step) = final * step / reach on even
  # steps: adamw 85 * s / 50 >= 72.9 at s = 44, 89 -> 42; jmtl_adaptive (reach 30) 89 -> 26,
  # 93 -> 24.
  assert conf["adamw"]["steps_to_target"]["per_seed"] == [44, 42]
  assert conf["jmtl_adaptive"]["steps_to_target"]["per_seed"] == [26, 24]
  assert conf["jmtl_adaptive"]["steps_to_target"]["ratio_to_reference"] == pytest.approx(25 / 43)
  md = (tmp_path / "report/comparison.md").read_text()
  assert "## Confirmation on fresh seeds" in md
  assert ("| jmtl_adaptive | 0.001 | 5, 7 | 91.00 ± 2.83 | 89.00, 93.00 | +4.00 ± 0.00 | "
          "[+4.00, +4.00] | 2/2 | 25.0 (2/2) | 0.58 |") in md


def test_report_helpers_hand_examples():
  pts = [(10, 50.0), (20, 71.0), (30, 69.0), (40, 80.0)]
  assert report_lib.steps_to_target(pts, 70.0) == 20
  assert report_lib.steps_to_target(pts, 80.0) == 40
  assert report_lib.steps_to_target(pts, 80.5) is None
  assert report_lib.steps_to_target([(20, 75.0), (10, float("nan"))], 70.0) == 20
  assert report_lib.mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0), (2, 5.0), (3, 9.0)]]) == [
      (1, 2.0), (2, 4.0)]
  assert report_lib.trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
  assert report_lib.fmt(82.0, 2.0) == "82.00 ± 2.00"
  # Only seeds present in both count: seed 1 (70 - 72) and seed 2 (75 - 71).
  runs = [{"seed": s, "score": v} for s, v in ((0, 60.0), (1, 70.0), (2, 75.0))]
  ref = [{"seed": s, "score": v} for s, v in ((1, 72.0), (2, 71.0), (3, 99.0))]
  p = report_lib.paired_differences(runs, ref, report_lib.SCORE, [])
  assert p["per_seed"] == {"1": -2.0, "2": 4.0} and (p["ahead"], p["n"]) == (1, 2)
  assert p["mean"] == pytest.approx(1.0) and p["std"] == pytest.approx(math.sqrt(18.0))
  # 95 % CI: mean ± t(0.975, df) * std / sqrt(n); t from a printed table: 12.706 (df 1).
  assert p["ci95"] == pytest.approx([1.0 - 12.706 * 3.0, 1.0 + 12.706 * 3.0], abs=2e-3)
  # Three seeds, differences 1, 2, 6: mean 3, std sqrt(7), t(0.975, 2) = 4.303.
  p3 = report_lib.paired_differences(
      [{"seed": s, "score": v} for s, v in enumerate((11.0, 12.0, 16.0))],
      [{"seed": s, "score": 10.0} for s in range(3)], report_lib.SCORE, [])
  half = 4.303 * math.sqrt(7.0) / math.sqrt(3.0)
  assert p3["ci95"] == pytest.approx([3.0 - half, 3.0 + half], abs=2e-3)
  one = report_lib.paired_differences(runs[:2], ref, report_lib.SCORE, [])
  assert one["n"] == 1 and one["ci95"] is None
  assert report_lib.fmt(None, None) == "—"
  assert [report_lib.signed(x) for x in (-0.004, 0.0, -0.006, 1.234)] == [
      "+0.00", "+0.00", "-0.01", "+1.23"]


def test_report_without_sweep_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="sweep.json"):
    report_lib.report_optim(tmp_path, tmp_path / "out")


def test_task_loss_curves_pool_seeds_per_evaluation_interval():
  seed0 = [{"step": 2, "split": "train", "train/a/loss": 4.0},
           {"step": 4, "split": "train", "train/b/loss": 1.0},
           {"step": 4, "split": "eval"},
           {"step": 6, "split": "train", "train/a/loss": 2.0, "train/b/loss": None},
           {"step": 8, "split": "eval"}]
  seed1 = [{"step": 2, "split": "train", "train/a/loss": 6.0, "train/loss": 9.0},
           {"step": 4, "split": "eval"},
           {"step": 8, "split": "train", "train/b/loss": 3.0, "train/a/loss": float("nan")},
           {"step": 8, "split": "eval"}]
  assert report_lib.task_loss_curves([seed0, seed1]) == {
      "a": [(4, 5.0), (8, 2.0)],  # (4 + 6) / 2; the NaN is left out
      "b": [(4, 1.0), (8, 3.0)],
  }
