"""`jmtl report optim`: tables and curves from a finished `jmtl sweep` directory.

Everything is measured at each optimizer's best learning rate (from `sweep.json`) over all seeds:

* final dev metrics as mean ± sample std (ddof=1) over seeds, one table per metric;
* steps-to-target: target = `sweep.target_fraction` × the highest mean final selection score of
  any optimizer; per seed, the first eval step whose selection score is >= target; the mean is
  over the seeds that reached it (`k/n` shows how many), the ratio divides by the reference
  optimizer's mean (`sweep.reference`, tuned AdamW by default) and is given only when every seed
  of both reached the target;
* paired by seed against the reference: per seed (same head initialisation and batch order),
  the optimizer's selection score minus the reference's; mean ± sample std of the differences,
  their 95 % confidence interval (Student's t: mean ± t(0.975, n-1) · std / sqrt(n), n >= 2)
  and the number of seeds where the optimizer is ahead;
* the ablation of `jmtl_adaptive`'s switches against the full configuration (same lr, seeds);
* with `sweep.confirm_seeds`: each optimizer's score at its best lr on those fresh seeds (mean
  ± std, paired differences against the reference with their 95 % CI, steps to the same
  target), free of the optimism of selecting the lr on the seeds that score it;
* PNG curves: train loss vs step (one panel per task when there are several:
  `task_loss_curves`), dev selection score vs step (mean over seeds), dev score vs lr.

Writes `comparison.md`, `report.json`, `sweep.json` (a copy) and the PNGs into `out_dir`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

from jmtl.eval import predictions as predictions_lib
from jmtl.study import sweep as sweep_lib

# The metrics reported by the optimizer paper (arXiv 2412.04718), shown first when present.
PAPER_METRICS = ("sst2/accuracy", "mrpc/f1", "mrpc/accuracy", "squad/exact_match", "squad/f1")
SCORE = "score"  # the selection score's key in the tables
LOSS_SMOOTH = 5  # train-loss curves: trailing mean over this many logged points
FILES = ("comparison.md", "report.json", "sweep.json", "loss_curves.png", "dev_curves.png",
         "lr_sensitivity.png")


def load_sweep(sweep_dir: str | os.PathLike[str]) -> dict:
  """Reads `<sweep_dir>/sweep.json`; a clear error when it is missing or malformed."""
  path = pathlib.Path(sweep_dir) / "sweep.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: run `jmtl sweep` with --workdir {sweep_dir} first")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  for key in ("runs", "best", "select_keys", "sweep"):
    if key not in data:
      raise ValueError(f"{path}: missing key {key!r}")
  return data


def read_metrics(run_dir: pathlib.Path, name: str = "metrics.jsonl") -> list[dict]:
  """The rows of `<run_dir>/<name>` (a JSON-lines file: metrics.jsonl, a federated run's
  rounds.jsonl); [] when it is absent; ValueError naming the file and line when one is bad."""
  path = run_dir / name
  if not path.is_file():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
  return rows


def steps_to_target(points: Sequence[tuple[int, float]], target: float) -> int | None:
  """First step (in step order) whose value is >= target; None when none reaches it."""
  for step, value in sorted(points):
    if value is not None and math.isfinite(value) and value >= target:
      return int(step)
  return None


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
  """Mean over curves at the steps every curve has (non-finite points dropped first)."""
  maps = [{int(s): float(v) for s, v in c if v is not None and math.isfinite(v)} for c in curves]
  if not maps:
    return []
  common = sorted(set.intersection(*(set(m) for m in maps)))
  return [(s, float(np.mean([m[s] for m in maps]))) for s in common]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
  """y_i = mean(values[max(0, i - window + 1) : i + 1])."""
  out = []
  for i in range(len(values)):
    out.append(float(np.mean(values[max(0, i - window + 1):i + 1])))
  return out


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
  """'mean ± std' with `digits` decimals; the mean alone when std is None (one seed: no
  spread to show); '—' when there is no value."""
  if mean is None:
    return "—"
  return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def signed(x: float, digits: int = 2) -> str:
  """`x` with its sign to `digits` decimals; a value that rounds to zero prints as +0.00."""
  return f"{round(x, digits) + 0.0:+.{digits}f}"


def signed_pm(mean: float, std: float | None, digits: int = 2) -> str:
  """A difference: `signed(mean)` and ' ± std' unless std is None (one seed)."""
  return signed(mean, digits) + ("" if std is None else f" ± {std:.{digits}f}")


def _best_runs(data: dict, optimizer: str, variant: str = "") -> list[dict]:
  """Finished runs of (optimizer, variant) at the best lr (an ablation's: jmtl_adaptive's)."""
  ablation = variant and variant != sweep_lib.CONFIRM
  best = data["best"][sweep_lib.ABLATION_OPTIMIZER if ablation else optimizer]["lr"]
  return [r for r in data["runs"]
          if r["optimizer"] == optimizer and r["variant"] == variant and r["lr"] == best
          and r["status"] == "ok"]


def _metric_keys(data: dict) -> list[str]:
  present = set()
  for r in data["runs"]:
    present.update(k for k, v in r["metrics"].items() if k != "step" and "/" in k
                   and isinstance(v, (int, float)))
  paper = [k for k in PAPER_METRICS if k in present]
  return [SCORE] + paper + sorted(present - set(paper))


def _value(run: dict, key: str, select_keys: Sequence[str]) -> float | None:
  if key == SCORE:
    return run["score"]
  v = run["metrics"].get(key)
  return float(v) if v is not None else None


def _stats(runs: Sequence[dict], key: str, select_keys: Sequence[str]) -> dict:
  values = [_value(r, key, select_keys) for r in runs]
  values = [v for v in values if v is not None and math.isfinite(v)]
  mean, std = sweep_lib.mean_std(values)
  return {"mean": mean, "std": std, "values": values, "n": len(values)}


def paired_differences(runs: Sequence[dict], ref_runs: Sequence[dict], key: str,
                       select_keys: Sequence[str]) -> dict:
  """Per seed present in both: value(run) - value(ref run); mean ± sample std of those
  differences, `ci95` = mean ± t(0.975, n-1) · std / sqrt(n) (None below 2 seeds), and
  `ahead` = how many are > 0 (of `n`)."""
  ref = {r["seed"]: _value(r, key, select_keys) for r in ref_runs}
  diffs = {}
  for r in runs:
    a, b = _value(r, key, select_keys), ref.get(r["seed"])
    if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
      diffs[r["seed"]] = a - b
  mean, std = sweep_lib.mean_std(list(diffs.values()))
  ci95 = None
  if len(diffs) >= 2:
    half = float(scipy.stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    ci95 = [mean - half, mean + half]
  return {"per_seed": {str(k): v for k, v in sorted(diffs.items())}, "mean": mean, "std": std,
          "ci95": ci95, "ahead": sum(1 for v in diffs.values() if v > 0), "n": len(diffs)}


def _score_curve(rows: Sequence[dict], keys: Sequence[str]) -> list[tuple[int, float]]:
  return [(r["step"], sweep_lib.score(r, keys)) for r in rows if r.get("split") == "eval"]


def _loss_curve(rows: Sequence[dict]) -> list[tuple[int, float]]:
  return [(r["step"], r["train/loss"]) for r in rows
          if r.get("split") == "train" and r.get("train/loss") is not None]


def task_loss_curves(runs_rows: Sequence[Sequence[dict]]) -> dict[str, list[tuple[int, float]]]:
  """Per task, the mean of every logged `train/<task>/loss` of the runs (seeds) in each
  interval between dev evaluations, (e_{i-1}, e_i], plotted at e_i.

  With one task per batch a train line holds only the tasks its window trained, at steps that
  differ between seeds; pooling the lines of all seeds per evaluation interval gives each task
  a curve on a common step grid.
  """
  evals = sorted({int(r["step"]) for rows in runs_rows for r in rows if r.get("split") == "eval"})
  pooled: dict[str, dict[int, list[float]]] = {}
  for rows in runs_rows:
    for r in rows:
      if r.get("split") != "train":
        continue
      end = next((e for e in evals if e >= int(r["step"])), None)
      for k, v in r.items():
        parts = k.split("/")
        if end is None or len(parts) != 3 or parts[0] != "train" or parts[2] != "loss":
          continue
        if v is not None and math.isfinite(v):
          pooled.setdefault(parts[1], {}).setdefault(end, []).append(float(v))
  return {task: [(e, float(np.mean(vs))) for e, vs in sorted(bins.items())]
          for task, bins in sorted(pooled.items())}


def _group_label(optimizer: str, variant: str) -> str:
  return f"{optimizer} {variant}" if variant else optimizer


def report_optim(sweep_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None) -> dict:
  """Writes the study report for `sweep_dir` into `out_dir` (default `<sweep_dir>/report`)."""
  sweep_dir = pathlib.Path(sweep_dir)
  out = pathlib.Path(out_dir) if out_dir else sweep_dir / "report"
  out.mkdir(parents=True, exist_ok=True)
  data = load_sweep(sweep_dir)
  keys = data["select_keys"]
  s = data["sweep"]
  optimizers = list(s["optimizers"])
  metric_keys = _metric_keys(data)

  groups = [(name, "") for name in optimizers]
  variants = {r["variant"] for r in data["runs"]}
  groups += [(sweep_lib.ABLATION_OPTIMIZER, f"{how}_{sw}") for sw in s.get("ablation", ())
             for how in ("no", "with") if f"{how}_{sw}" in variants]
  runs = {g: _best_runs(data, *g) for g in groups}
  curves = {}
  for g, rs in runs.items():
    rows = [read_metrics(sweep_dir / r["dir"]) for r in rs]
    curves[g] = {"loss": mean_curve([_loss_curve(x) for x in rows]),
                 "task_loss": task_loss_curves(rows),
                 "score": mean_curve([_score_curve(x, keys) for x in rows]),
                 "score_per_seed": [_score_curve(x, keys) for x in rows]}

  metrics = {k: {_group_label(*g): {"lr": runs[g][0]["lr"] if runs[g] else None,
                                    **_stats(runs[g], k, keys)} for g in groups}
             for k in metric_keys}

  finals = [metrics[SCORE][name]["mean"] for name in optimizers
            if metrics[SCORE][name]["mean"] is not None]
  target = float(s["target_fraction"]) * max(finals) if finals else None
  stt = {_group_label(*g): _stt_summary(
      [steps_to_target(c, target) for c in curves[g]["score_per_seed"]] if finals else [])
         for g in groups}
  _add_ratios(stt, s["reference"])

  ref_group = (s["reference"], "")
  paired = {_group_label(*g): paired_differences(runs[g], runs.get(ref_group, []), SCORE, keys)
            for g in groups} if ref_group in runs else {}

  ablation = None
  if len(groups) > len(optimizers):
    full = metrics[SCORE][sweep_lib.ABLATION_OPTIMIZER]["mean"]
    ablation = {}
    for g in [(sweep_lib.ABLATION_OPTIMIZER, "")] + groups[len(optimizers):]:
      label = _group_label(*g)
      m = metrics[SCORE][label]["mean"]
      ablation[label] = {"score": metrics[SCORE][label],
                         "delta_vs_full": (m - full) if m is not None and full is not None else None}

  confirmation = _confirmation(data, sweep_dir, optimizers, keys, target, s["reference"])
  files = _plots(data, optimizers, curves, out)
  report = {
      "select_keys": keys, "target_fraction": s["target_fraction"], "target": target,
      "reference": s["reference"], "best": data["best"], "metrics": metrics,
      "steps_to_target": stt, "paired_vs_reference": paired, "ablation": ablation,
      "confirmation": confirmation,
      "curves": {_group_label(*g): {"loss": c["loss"], "task_loss": c["task_loss"],
                                    "score": c["score"]} for g, c in curves.items()},
      "files": ["comparison.md", "report.json", "sweep.json"] + files,
  }
  (out / "comparison.md").write_text(_markdown(data, report, optimizers, metric_keys))
  predictions_lib.write_json_atomic(out / "report.json", report)
  if (sweep_dir / "sweep.json").resolve() != (out / "sweep.json").resolve():
    shutil.copyfile(sweep_dir / "sweep.json", out / "sweep.json")
  return report


def _confirmation(data: dict, sweep_dir: pathlib.Path, optimizers: Sequence[str],
                  keys: Sequence[str], target: float | None, reference: str) -> dict:
  """Per optimizer with confirmation runs at its best lr: their scores, paired differences
  against the reference's confirmation runs, and steps to the (selection seeds') target."""
  runs = {name: _best_runs(data, name, sweep_lib.CONFIRM) for name in optimizers}
  runs = {name: rs for name, rs in runs.items() if rs}
  out, stt = {}, {}
  for name, rs in runs.items():
    stt[name] = _stt_summary(
        [steps_to_target(_score_curve(read_metrics(sweep_dir / r["dir"]), keys), target)
         for r in rs] if target is not None else [])
    out[name] = {"lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs],
                 "score": _stats(rs, SCORE, keys),
                 "paired_vs_reference": (paired_differences(rs, runs[reference], SCORE, keys)
                                         if reference in runs else None),
                 "steps_to_target": stt[name]}
  _add_ratios(stt, reference)
  return out


def _stt_summary(per_seed: list[int | None]) -> dict:
  """Steps to target of one group: per seed, how many reached it, mean over those that did."""
  reached = [x for x in per_seed if x is not None]
  return {"per_seed": per_seed, "reached": len(reached), "n": len(per_seed),
          "mean": float(np.mean(reached)) if reached else None}


def _add_ratios(stt: dict[str, dict], reference: str) -> None:
  """Sets each group's `ratio_to_reference` = mean / the reference's mean, only when every seed
  of both reached the target (else None)."""
  ref = stt.get(reference)
  for v in stt.values():
    ok = (ref and v["n"] and v["reached"] == v["n"] and ref["n"] and ref["reached"] == ref["n"]
          and ref["mean"])
    v["ratio_to_reference"] = v["mean"] / ref["mean"] if ok else None


def _markdown(data: dict, report: dict, optimizers: list[str], metric_keys: list[str]) -> str:
  s = data["sweep"]
  keys = report["select_keys"]
  score_name = keys[0] if len(keys) == 1 else "mean of " + ", ".join(keys)
  lines = [
      "# Optimizer study",
      "",
      f"Tasks: {', '.join(data.get('tasks', []))}; {data.get('steps')} steps, evaluation every "
      f"{data.get('eval_every')} steps on the `{data.get('eval_split')}` split; seeds "
      f"{', '.join(str(x) for x in s['seeds'])}; {s['lr_points']} learning rates per optimizer "
      f"(ratio {s['lr_ratio']}). Selection score (dev): {score_name}. Each optimizer is shown at "
      "the learning rate with the best mean selection score over seeds; values are mean ± sample "
      "std (ddof=1) over seeds, in percent.",
      "",
      "## Learning-rate grid and selection",
      "",
      "| optimizer | grid | best lr | selection score at best lr | note |",
      "|---|---|---|---|---|",
  ]
  for name in optimizers:
    b = data["best"][name]
    grid = data["grids"][name] if "grids" in data else []
    note = ""
    if b["lr"] is None:
      note = "every lr diverged on some seed" if b["by_lr"] else "no finished runs"
    elif grid and b["lr"] in (grid[0], grid[-1]):
      note = "best lr at the edge of the grid"
    diverged = sum(v["diverged"] for v in b["by_lr"].values())
    if diverged:
      note = (note + "; " if note else "") + f"{diverged} diverged run(s)"
    lr = sweep_lib.format_lr(b["lr"]) if b["lr"] is not None else "—"
    lines.append(f"| {name} | {', '.join(sweep_lib.format_lr(x) for x in grid)} | {lr} | "
                 f"{fmt(b['score_mean'], b['score_std'])} | {note} |")

  for k in metric_keys:
    title = f"selection score ({score_name})" if k == SCORE else k
    lines += ["", f"## {title}", "", "| optimizer | lr | mean ± std | per seed |", "|---|---|---|---|"]
    for name in optimizers:
      m = report["metrics"][k][name]
      lr = sweep_lib.format_lr(m["lr"]) if m["lr"] is not None else "—"
      seeds = ", ".join(f"{v:.2f}" for v in m["values"])
      lines.append(f"| {name} | {lr} | {fmt(m['mean'], m['std'])} | {seeds} |")

  t = report["target"]
  lines += ["", "## Steps to target", "",
            f"Target: {s['target_fraction']} × best mean final selection score = "
            f"{t:.2f}." if t is not None else "No finished run: no target.",
            f"Ratio = mean steps / mean steps of `{report['reference']}` (lower is faster; "
            "given only when every seed of both reached the target).", "",
            "| optimizer | reached | mean steps | ratio to " + report["reference"] + " | per seed |",
            "|---|---|---|---|---|"]
  for label, v in report["steps_to_target"].items():
    if label not in optimizers:
      continue
    lines.append(_stt_row(label, v))

  if report["paired_vs_reference"]:
    ref = report["reference"]
    lines += ["", f"## Paired by seed against {ref}", "",
              f"Per seed (same head initialisation and batch order): selection score minus "
              f"`{ref}`'s; mean ± sample std of the differences, their 95 % confidence "
              "interval (Student's t over seeds); ahead = seeds where it is higher.",
              "", "| optimizer | Δ score | 95 % CI | ahead | per seed |", "|---|---|---|---|---|"]
    for label, v in report["paired_vs_reference"].items():
      if label == ref:
        continue
      seeds = ", ".join(signed(x) for x in v["per_seed"].values())
      delta = "—" if v["mean"] is None else signed_pm(v['mean'], v['std'])
      ci = "—" if v.get("ci95") is None else f"[{signed(v['ci95'][0])}, {signed(v['ci95'][1])}]"
      lines.append(f"| {label} | {delta} | {ci} | {v['ahead']}/{v['n']} | {seeds} |")

  if report["ablation"]:
    lines += ["", f"## Ablation of {sweep_lib.ABLATION_OPTIMIZER}", "",
              "Each switch toggled alone from the full configuration (no_X: turned off, "
              "with_X: turned on), at the full configuration's best learning rate, same seeds.",
              "",
              "| variant | selection score | Δ vs full | "
              + " | ".join(k for k in metric_keys if k != SCORE) + " | steps to target |",
              "|---|---|---|" + "---|" * (len(metric_keys) - 1) + "---|"]
    for label, a in report["ablation"].items():
      d = a["delta_vs_full"]
      cells = [fmt(report["metrics"][k][label]["mean"], report["metrics"][k][label]["std"])
               for k in metric_keys if k != SCORE]
      v = report["steps_to_target"][label]
      st = f"{v['mean']:.1f} ({v['reached']}/{v['n']})" if v["mean"] is not None else \
          f"— (0/{v['n']})"
      name = "full" if label == sweep_lib.ABLATION_OPTIMIZER else label.split(" ", 1)[1]
      lines.append(f"| {name} | {fmt(a['score']['mean'], a['score']['std'])} | "
                   f"{'—' if d is None else signed(d)} | " + " | ".join(cells) + f" | {st} |")

  if report["confirmation"]:
    ref = report["reference"]
    lines += ["", "## Confirmation on fresh seeds", "",
              "Each optimizer again at its best learning rate, with seeds that took no part in "
              "choosing it (`sweep.confirm_seeds`): selection score (mean ± sample std), paired "
              f"by seed against `{ref}` (Δ, 95 % CI, seeds ahead), steps to the same target "
              f"and their ratio to `{ref}`'s.", "",
              "| optimizer | lr | seeds | selection score | per seed | Δ vs " + ref
              + " | 95 % CI | ahead | steps to target | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in report["confirmation"].items():
      sc, p, st = v["score"], v["paired_vs_reference"], v["steps_to_target"]
      delta = ci = ahead = "—"
      if p and name != ref and p["mean"] is not None:
        delta, ahead = signed_pm(p['mean'], p['std']), f"{p['ahead']}/{p['n']}"
        if p["ci95"] is not None:
          ci = f"[{signed(p['ci95'][0])}, {signed(p['ci95'][1])}]"
      steps = (f"{st['mean']:.1f} ({st['reached']}/{st['n']})" if st["mean"] is not None
               else f"— (0/{st['n']})")
      ratio = f"{st['ratio_to_reference']:.2f}" if st["ratio_to_reference"] is not None else "—"
      lines.append(f"| {name} | {sweep_lib.format_lr(v['lr'])} | "
                   f"{', '.join(str(x) for x in v['seeds'])} | {fmt(sc['mean'], sc['std'])} | "
                   f"{', '.join(f'{x:.2f}' for x in sc['values'])} | {delta} | {ci} | {ahead} | "
                   f"{steps} | {ratio} |")

  lines += ["", "## Figures", ""]
  for f in report["files"]:
    if f.endswith(".png"):
      lines.append(f"![{f[:-4]}]({f})")
  return "\n".join(lines) + "\n"


def _stt_row(label: str, v: dict) -> str:
  mean = f"{v['mean']:.1f}" if v["mean"] is not None else "—"
  ratio = f"{v['ratio_to_reference']:.2f}" if v["ratio_to_reference"] is not None else "—"
  seeds = ", ".join("—" if x is None else str(x) for x in v["per_seed"])
  return f"| {label} | {v['reached']}/{v['n']} | {mean} | {ratio} | {seeds} |"


def _plots(data: dict, optimizers: list[str], curves: Mapping[tuple[str, str], dict],
           out: pathlib.Path) -> list[str]:
  """Writes the PNGs; returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  colours = plt.get_cmap("tab10")
  style = {name: {"color": colours(i % 10), "lw": 2.4 if name in ("paper_adaptive", "jmtl_adaptive")
                  else 1.4, "ls": "-" if i < 10 else "--"} for i, name in enumerate(optimizers)}
  keys = data["select_keys"]
  score_name = keys[0] if len(keys) == 1 else "mean(" + ", ".join(keys) + ")"

  def label(name):
    lr = data["best"][name]["lr"]
    return f"{name} (lr {sweep_lib.format_lr(lr)})" if lr is not None else name

  files = []
  tasks = sorted({t for name in optimizers for t in curves[(name, "")]["task_loss"]})
  if len(tasks) > 1:  # one panel per task: a task's loss is not comparable with another's
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.6), dpi=110,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
      for name in optimizers:
        c = curves[(name, "")]["task_loss"].get(task)
        if c:
          steps, vals = zip(*c)
          ax.plot(steps, vals, marker="o", ms=3, label=label(name), **style[name])
      ax.set_title(f"{task}")
      ax.set_xlabel("step (end of each interval between evaluations)")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train loss (mean of the logged values per interval, all seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Train loss per task at each optimizer's best learning rate")
  else:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name in optimizers:
      c = curves[(name, "")]["loss"]
      if c:
        steps, vals = zip(*c)
        ax.plot(steps, trailing_mean(vals, LOSS_SMOOTH), label=label(name), **style[name])
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (mean over seeds, trailing mean of {LOSS_SMOOTH} logs)")
    ax.set_title("Train loss at each optimizer's best learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "loss_curves.png")
  plt.close(fig)
  files.append("loss_curves.png")

  fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
  for name in optimizers:
    c = curves[(name, "")]["score"]
    if c:
      steps, vals = zip(*c)
      ax.plot(steps, vals, marker="o", ms=3, label=label(name), **style[name])
  ax.set_xlabel("step")
  ax.set_ylabel("dev selection score (mean over seeds)")
  ax.set_title(f"Dev {score_name} at each optimizer's best learning rate", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "dev_curves.png")
  plt.close(fig)
  files.append("dev_curves.png")

  fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
  for name in optimizers:
    table = data["best"][name]["by_lr"]
    pts = [(float(lr), v["mean"]) for lr, v in table.items() if v["mean"] is not None]
    if pts:
      pts.sort()
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker="o", label=name, **style[name])
      bad = [(float(lr), v["mean"]) for lr, v in table.items()
             if v["mean"] is not None and v["diverged"]]
      if bad:
        ax.scatter(*zip(*bad), marker="x", s=120, color="black", zorder=5)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("final dev selection score (mean over finished seeds)")
  ax.set_title(f"Learning-rate sensitivity; score = {score_name}; x = some seed diverged",
               fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "lr_sensitivity.png")
  plt.close(fig)
  files.append("lr_sensitivity.png")
  return files
