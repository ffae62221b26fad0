"""`jmtl report mtl`: the task x arm table, paired differences and curves of a multi-task study.

Input: run directories (any folder under the `--runs` folders holding a `config.json` whose
`study.arm` is set: `jmtl study mtl` writes them, and so does `jmtl train` with an arm config).
A run is identified by its config.json: arm (`study.arm`), seed, tasks, `study.single_task`
and `study.reference`; its final metrics are `eval.json` (a run without one, or diverged per
`run_info.json`, counts as missing). The runs of one (arm, seed) together give that arm's
metrics at that seed: one run for a multi-task arm, one per task for a single-task arm.

Statistics (per task metric `<task>/<metric>`, in the units of eval.json, percent):

* mean ± sample std (ddof=1) over the seeds that have the value, with n;
* `mean of tasks`: per (arm, seed), the mean over tasks of each task's first metric
  (`jmtl.eval.metrics.primary_metric_keys`), only for seeds with every task of the table;
* paired by seed against the arm's `study.reference` (its single-task counterpart): per seed
  present in both, value(arm) - value(reference); mean ± sample std of the differences, their
  95 % confidence interval mean ± t(0.975, n-1) · std / sqrt(n) (Student's t, n >= 2) and the
  seeds where the arm is ahead (`jmtl.study.report.paired_differences`, the optimizer study's).

Writes into `out_dir`: `mtl_table.md` (tables and figures), `mtl_table.csv` (one row per task
metric and arm: n, mean, std, per-seed values, reference, paired Δ mean and std, CI, ahead),
`report.json`, and PNGs: `train_loss.png` (per task `train/<task>/loss` vs step, mean over
seeds, trailing mean of 5 logs), `dev_curves.png` (per task its first metric on the dev split
vs step, mean over seeds), `task_weights.png` (per multi-task arm `train/<task>/weight` vs
step, mean over seeds).
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jmtl.eval import metrics as metrics_lib
from jmtl.eval import predictions as predictions_lib
from jmtl.study import report as report_lib
from jmtl.study import runs as runs_lib
from jmtl.study import sweep as sweep_lib

MEAN = "mean of tasks"  # the row of the mean over tasks of each task's first metric
SCORE = report_lib.SCORE
LOSS_SMOOTH = report_lib.LOSS_SMOOTH
CSV_FIELDS = ("task", "metric", "arm", "n", "mean", "std", "values", "reference", "delta_n",
              "delta_mean", "delta_std", "ci95_low", "ci95_high", "ahead")


def find_runs(dirs: Sequence[str | os.PathLike[str]]) -> tuple[list[dict], list[str]]:
  """The run directories under `dirs` (each a run or a folder of runs): (runs, ignored), where
  `ignored` lists folders with a config.json that names no arm. Each run is `{"dir", "arm",
  "seed", "tasks", "single_task", "reference", "status" ("ok", "diverged", "unfinished"),
  "metrics", "rows", "config" (config.json)}`. FileNotFoundError for a missing folder;
  ValueError naming the file for
  an unreadable config.json, eval.json or metrics.jsonl."""
  found, ignored, seen = [], [], set()
  for d in dirs:
    root = pathlib.Path(d)
    if not root.is_dir():
      raise FileNotFoundError(f"--runs {d}: not a directory")
    paths = [root / "config.json"] if (root / "config.json").is_file() else []
    paths += sorted(p for p in root.rglob("config.json")
                    if p.parent != root and "checkpoints" not in p.relative_to(root).parts)
    for path in paths:
      run_dir = path.parent.resolve()
      if run_dir in seen:
        continue
      seen.add(run_dir)
      cfg = runs_lib.read_json(path)
      study = cfg.get("study") or {}
      if not isinstance(study, Mapping) or not study.get("arm"):
        ignored.append(str(path.parent))
        continue
      info_path = path.parent / runs_lib.RUN_INFO
      info = runs_lib.read_json(info_path) if info_path.is_file() else {}
      eval_path = path.parent / "eval.json"
      if info.get("status") == "diverged":
        status, metrics = "diverged", {}
      elif eval_path.is_file():
        status, metrics = "ok", runs_lib.read_json(eval_path)
      else:
        status, metrics = "unfinished", {}
      found.append({"dir": str(path.parent), "arm": study["arm"], "seed": int(cfg.get("seed", 0)),
                    "tasks": list(cfg.get("tasks", ())),
                    "single_task": bool(study.get("single_task", False)),
                    "reference": study.get("reference", "") or "", "status": status,
                    "metrics": metrics, "rows": report_lib.read_metrics(path.parent),
                    "config": cfg})
  return found, ignored


def _order(values: Sequence[str]) -> list[str]:
  out = []
  for v in values:
    if v not in out:
      out.append(v)
  return out


def group(runs: Sequence[dict]) -> dict[str, dict[int, dict]]:
  """arm -> seed -> `{"seed", "metrics" (every finished run's eval.json values, merged),
  "tasks" (tasks with results), "runs" (task -> run dict)}`. ValueError when two finished runs
  give one (arm, seed, task), naming both directories."""
  out: dict[str, dict[int, dict]] = {}
  for r in runs:
    slot = out.setdefault(r["arm"], {}).setdefault(
        r["seed"], {"seed": r["seed"], "metrics": {}, "tasks": [], "runs": {}})
    if r["status"] != "ok":
      continue
    for t in r["tasks"]:
      if t in slot["runs"]:
        raise ValueError(f"two runs of arm {r['arm']!r}, seed {r['seed']}, task {t!r}: "
                         f"{slot['runs'][t]['dir']} and {r['dir']}; pass only one to --runs")
      slot["runs"][t] = r
      slot["tasks"].append(t)
      slot["metrics"].update({k: v for k, v in r["metrics"].items()
                              if k.startswith(f"{t}/") and isinstance(v, (int, float))
                              and not isinstance(v, bool)})
  return out


def _seed_runs(seeds: Mapping[int, dict], tasks: Sequence[str]) -> list[dict]:
  """The (arm, seed) slots as run records for `paired_differences`, with `score` = mean of the
  tasks' first metrics (None unless every task has it)."""
  keys = metrics_lib.primary_metric_keys(tasks)
  out = []
  for seed, slot in sorted(seeds.items()):
    vals = [slot["metrics"].get(k) for k in keys]
    ok = all(v is not None and math.isfinite(float(v)) for v in vals)
    out.append({"seed": seed, "metrics": slot["metrics"],
                "score": float(sum(vals) / len(vals)) if ok and vals else None})
  return out


def _metric_keys(grouped: Mapping[str, Mapping[int, dict]], tasks: Sequence[str]) -> list[tuple[str, str]]:
  """(task, key) pairs: each task's first metric, then its other metrics (sorted)."""
  present = {k for seeds in grouped.values() for slot in seeds.values() for k in slot["metrics"]}
  out = []
  for t, first in zip(tasks, metrics_lib.primary_metric_keys(tasks)):
    out.append((t, first))
    out += [(t, k) for k in sorted(present) if k.startswith(f"{t}/") and k != first]
  return out


def report_mtl(run_dirs: Sequence[str | os.PathLike[str]],
               out_dir: str | os.PathLike[str]) -> dict:
  """Writes the multi-task study report of the runs under `run_dirs` into `out_dir`; returns
  report.json's content. ValueError when no run of an arm is found."""
  runs, ignored = find_runs(run_dirs)
  if not runs:
    raise ValueError(f"--runs {' '.join(map(str, run_dirs))}: no run of a study arm found (a "
                     "run directory's config.json must set study.arm; train the arms with "
                     "jmtl study mtl)")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  arms = _order([r["arm"] for r in runs])
  arms = [a for a in arms if not _is_single(runs, a)] + [a for a in arms if _is_single(runs, a)]
  tasks = _order([t for r in runs if not r["single_task"] for t in r["tasks"]]
                 + [t for r in runs for t in r["tasks"]])
  refs = {a: next((r["reference"] for r in runs if r["arm"] == a), "") for a in arms}
  grouped = group(runs)
  seed_runs = {a: _seed_runs(grouped[a], tasks) for a in arms}
  keys = _metric_keys(grouped, tasks)

  table: dict[str, dict[str, dict[str, Any]]] = {}
  for t, k in keys + [(MEAN, SCORE)]:
    label = k if k != SCORE else MEAN
    table[label] = {}
    for a in arms:
      vals = [r["score"] if k == SCORE else r["metrics"].get(k) for r in seed_runs[a]]
      pairs = [(r["seed"], float(v)) for r, v in zip(seed_runs[a], vals)
               if v is not None and math.isfinite(float(v))]
      mean, std = sweep_lib.mean_std([v for _, v in pairs])
      cell: dict[str, Any] = {"task": t, "n": len(pairs), "mean": mean, "std": std,
                              "per_seed": {str(s): v for s, v in pairs}}
      ref = refs[a]
      if ref and ref in seed_runs:
        cell["reference"] = ref
        cell["paired"] = report_lib.paired_differences(seed_runs[a], seed_runs[ref], k, [])
      table[label][a] = cell

  status = {a: {"finished": sum(1 for r in runs if r["arm"] == a and r["status"] == "ok"),
                "diverged": [r["dir"] for r in runs if r["arm"] == a and r["status"] == "diverged"],
                "unfinished": [r["dir"] for r in runs
                               if r["arm"] == a and r["status"] == "unfinished"],
                "seeds": sorted(grouped[a]), "single_task": _is_single(runs, a),
                "reference": refs[a]} for a in arms}
  files = _plots(runs, arms, tasks, out)
  report = {"arms": status, "tasks": tasks, "primary": metrics_lib.primary_metric_keys(tasks),
            "table": table, "ignored": ignored,
            "files": ["mtl_table.md", "mtl_table.csv", "report.json"] + files}
  (out / "mtl_table.md").write_text(_markdown(report, arms, keys))
  (out / "mtl_table.csv").write_text(_csv(report, arms))
  predictions_lib.write_json_atomic(out / "report.json", report)
  return report


def _is_single(runs: Sequence[dict], arm: str) -> bool:
  return any(r["single_task"] for r in runs if r["arm"] == arm)


def _csv(report: dict, arms: Sequence[str]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  num = lambda x: "" if x is None else repr(float(x))
  for label, cells in report["table"].items():
    for a in arms:
      c = cells[a]
      p = c.get("paired") or {}
      ci = p.get("ci95") or (None, None)
      w.writerow([c["task"], label, a, c["n"], num(c["mean"]), num(c["std"]),
                  " ".join(repr(v) for v in c["per_seed"].values()), c.get("reference", ""),
                  p.get("n", ""), num(p.get("mean")), num(p.get("std")), num(ci[0]), num(ci[1]),
                  p.get("ahead", "")])
  return buf.getvalue()


def _delta_cell(p: dict | None) -> str:
  if not p or p["mean"] is None:
    return "—"
  text = report_lib.signed_pm(p['mean'], p['std'])
  if p["ci95"] is not None:
    text += f" [{report_lib.signed(p['ci95'][0])}, {report_lib.signed(p['ci95'][1])}]"
  return text + f" ({p['ahead']}/{p['n']})"


def _markdown(report: dict, arms: Sequence[str], keys: Sequence[tuple[str, str]]) -> str:
  st = report["arms"]
  primary = set(report["primary"])
  lines = ["# Multi-task study", "",
           "Arms (runs found; seeds; paired against):", ""]
  for a in arms:
    s = st[a]
    kind = "single-task models, one per task" if s["single_task"] else "one multi-task model"
    note = f"{s['finished']} finished run(s), seeds {', '.join(map(str, s['seeds']))}"
    if s["diverged"]:
      note += f", {len(s['diverged'])} diverged"
    if s["unfinished"]:
      note += f", {len(s['unfinished'])} unfinished"
    ref = f"; paired against `{s['reference']}`" if s["reference"] else ""
    if s["reference"] and s["reference"] not in st:
      ref += " (no runs of it found: not paired)"
    lines.append(f"- `{a}`: {kind}; {note}{ref}")
  lines += ["", "Values are percent (as in eval.json), mean ± sample std (ddof=1) over seeds "
            "(n = seeds with the value). `mean of tasks`: per seed, the mean of each task's first "
            "metric (seeds with every task only).", "",
            "## Dev metrics, task x arm", "",
            "| task metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
  rows = [k for _, k in keys if k in primary] + [MEAN]
  for label in rows:
    cells = report["table"][label]
    lines.append(f"| {label} | " + " | ".join(
        f"{report_lib.fmt(cells[a]['mean'], cells[a]['std'])} (n={cells[a]['n']})"
        for a in arms) + " |")
  paired = [a for a in arms if st[a]["reference"] in st]
  if paired:
    lines += ["", "## Paired by seed against the single-task arm", "",
              "Per seed: the arm's value minus its reference arm's (same seed); mean ± sample "
              "std of the differences, [95 % confidence interval, Student's t over seeds], "
              "(seeds where the arm is ahead / seeds paired).", "",
              "| task metric | " + " | ".join(f"{a} − {st[a]['reference']}" for a in paired)
              + " |", "|---|" + "---|" * len(paired)]
    for label in rows:
      cells = report["table"][label]
      lines.append(f"| {label} | " + " | ".join(_delta_cell(cells[a].get("paired"))
                                               for a in paired) + " |")
  others = [k for _, k in keys if k not in primary]
  if others:
    lines += ["", "## Other metrics", "", "| task metric | " + " | ".join(arms) + " |",
              "|---|" + "---|" * len(arms)]
    for label in others:
      cells = report["table"][label]
      lines.append(f"| {label} | " + " | ".join(
          report_lib.fmt(cells[a]["mean"], cells[a]["std"]) for a in arms) + " |")
  lines += ["", "## Figures", ""]
  lines += [f"![{f[:-4]}]({f})" for f in report["files"] if f.endswith(".png")]
  return "\n".join(lines) + "\n"


def _curves(runs: Sequence[dict], arm: str, key_of, split: str) -> list[list[tuple[int, float]]]:
  """Per finished run of `arm`: [(step, row[key])] of its `split` rows, key = key_of(run)."""
  out = []
  for r in runs:
    if r["arm"] != arm or r["status"] != "ok":
      continue
    for key in key_of(r):
      c = [(int(x["step"]), float(x[key])) for x in r["rows"]
           if x.get("split") == split and isinstance(x.get(key), (int, float))]
      if c:
        out.append((key, c))
  return out


def _mean_by_key(pairs) -> dict[str, list[tuple[int, float]]]:
  by: dict[str, list] = {}
  for key, c in pairs:
    by.setdefault(key, []).append(c)
  return {k: report_lib.mean_curve(cs) for k, cs in by.items()}


def _plots(runs: Sequence[dict], arms: Sequence[str], tasks: Sequence[str],
           out: pathlib.Path) -> list[str]:
  """Writes the PNGs; returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  colours = plt.get_cmap("tab10")
  style = {a: {"color": colours(i % 10), "ls": "-" if i < 10 else "--", "lw": 1.5}
           for i, a in enumerate(arms)}
  primary = dict(zip(tasks, metrics_lib.primary_metric_keys(tasks)))
  files = []

  def panels(n):
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110,
                             squeeze=False)
    flat_axes = [ax for row in axes for ax in row]
    for ax in flat_axes[n:]:
      ax.set_visible(False)
    return fig, flat_axes

  for name, split, key_of, ylabel, smooth in (
      ("train_loss.png", "train", lambda t: f"train/{t}/loss",
       f"train loss (mean over seeds, trailing mean of {LOSS_SMOOTH} logs)", True),
      ("dev_curves.png", "eval", lambda t: primary[t], "dev metric (mean over seeds)", False)):
    fig, axes = panels(len(tasks))
    for ax, t in zip(axes, tasks):
      for a in arms:
        c = _mean_by_key(_curves(runs, a, lambda r, t=t: [key_of(t)] if t in r["tasks"] else [],
                                 split)).get(key_of(t))
        if c:
          steps, vals = zip(*c)
          vals = report_lib.trailing_mean(vals, LOSS_SMOOTH) if smooth else vals
          ax.plot(steps, vals, marker=None if smooth else "o", ms=3, label=a, **style[a])
      ax.set_title(t if split == "train" else primary[t], fontsize=9)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    files.append(name)

  weighted = [a for a in arms if not _is_single(runs, a)]
  if weighted:
    fig, axes = panels(len(weighted))
    task_colour = {t: colours(i % 10) for i, t in enumerate(tasks)}
    for ax, a in zip(axes, weighted):
      curves = _mean_by_key(_curves(runs, a, lambda r: [f"train/{t}/weight" for t in r["tasks"]],
                                    "train"))
      for t in tasks:
        c = curves.get(f"train/{t}/weight")
        if c:
          steps, vals = zip(*c)
          ax.plot(steps, vals, label=t, color=task_colour[t], lw=1.4)
      ax.set_title(a, fontsize=9)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if curves:
        ax.legend(fontsize=7)
    axes[0].set_ylabel("task weight w_t (train/<task>/weight, mean over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "task_weights.png")
    plt.close(fig)
    files.append("task_weights.png")
  return files
