"""`jmtl report federated`: the tables and plots of the federated study (issue 15, parts (a)-(f)).

Input: run directories under the `--runs` folders whose config.json sets `study.arm` (found by
`jmtl.study.mtl_report.find_runs`, the multi-task report's); `jmtl study federated` writes them.
Each arm shows in the parts its `study.parts` names: central (a: federated vs centralized at
equal total compute), noniid (b: Dirichlet alpha), aggregation (c: FedAvg, dynamic weighted,
gradient-based, FedAdam, DiLoCo, FedBuff), compression (d: bytes vs accuracy), dp (e: epsilon vs
accuracy), clouds (f: simulated time and cost per cloud; synchronous, deadline, asynchronous).

Per run (definitions; every value is read, not re-estimated):

* dev score = the metric `study.target_metric` names (e.g. `sst2/accuracy`) when the study sets
  one, else the mean over the run's tasks of each task's first metric
  (`jmtl.eval.metrics.primary_metric_keys`; percent); `final` from eval.json; the curve from
  the evaluated lines of rounds.jsonl (a federated run: x = `round`, round 0 = the initial
  model) or of metrics.jsonl (a centralized run: x = ceil(step / fed.local_steps), the round
  whose work the step falls in, since that run takes H = fed.local_steps steps per round of
  work; `jmtl.study.mtl.centralized_config`);
* simulated clock at round r = the sum of `sim_seconds` of rounds.jsonl lines 1..r (a
  synchronous round's length; for `fed.mode = async` the seconds since the previous server
  step, so the sum is the server's clock); a centralized run has none;
* rounds to target = the first evaluated round r >= 1 (round 0, the untrained model, does not
  count; a centralized run has no such evaluation) whose dev score >= `study.target` (from the
  runs' config.json: the study config's, set before any result;
  `jmtl.study.report.steps_to_target`), and the clock and the uplink bytes (sum of
  `bytes_up.total` over rounds 1..r) at that round; None when never reached;
* bytes up = the sum of `bytes_up.total` over all rounds; epsilon = the last line's
  `dp_epsilon_rdp` / `dp_epsilon_pld` (at fed.dp.delta; None = infinite or no DP);
* cost = the last line's cumulative `sim_cost` per cloud and `sim_cost_total` (dollars); per
  cloud also its site-rounds: (site, round) pairs in which one of its sites took part, and
  those in which one was sampled but dropped (deadline). rounds.jsonl holds no per-site
  seconds, so time per cloud is not shown; the run's simulated seconds are.

Per arm and part: mean ± sample std (ddof=1) over seeds; rounds and seconds to target: the
seeds that reached it (k/n) and their mean; paired by seed against `study.reference` (FedAvg):
Δ final score and Δ rounds to target (seeds where both reached it; only between arms whose
round means the same: not for an asynchronous arm, whose round is one server step of
fed.buffer_size site jobs) with mean ± std, the 95 %
confidence interval mean ± t(0.975, n-1) · std / sqrt(n) (Student's t, n >= 2) and the seeds
ahead (`jmtl.study.report.paired_differences`). Curves are means over seeds at the rounds
every seed evaluated (`jmtl.study.report.mean_curve`).

Writes into `out_dir`: `federated.md` (the tables per part, the exact commands, figures),
`federated.csv` (one row per part and arm), `clouds.csv` (one row per arm and cloud),
`report.json`, and PNGs `dev_vs_round.png`, `dev_vs_sim_seconds.png` (one panel per part),
`bytes_vs_score.png` (part d) and `epsilon_vs_score.png` (part e).
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jmtl.eval import metrics as metrics_lib
from jmtl.eval import predictions as predictions_lib
from jmtl.study import mtl_report
from jmtl.study import report as report_lib
from jmtl.study import runs as runs_lib
from jmtl.study import sweep as sweep_lib

ROUNDS_FILE = "rounds.jsonl"  # jmtl.federated.loop.ROUNDS_FILE (that module imports jax)
PARTS = {
    "central": "(a) Federated vs centralized at equal total compute",
    "noniid": "(b) Non-IID label skew: Dirichlet alpha",
    "aggregation": "(c) Aggregation rules",
    "compression": "(d) Uplink compression: bytes vs accuracy",
    "dp": "(e) Client-level differential privacy: epsilon vs accuracy",
    "clouds": "(f) Heterogeneous clouds: synchronous vs deadline vs asynchronous",
}
CSV_FIELDS = ("part", "arm", "setting", "n", "score_mean", "score_std", "score_values",
              "reference", "delta_n", "delta_mean", "delta_std", "ci95_low", "ci95_high", "ahead",
              "target", "reached", "rounds_to_target_mean", "rounds_to_target_values",
              "sim_s_to_target_mean", "delta_rounds_n", "delta_rounds_mean",
              "delta_rounds_ci95_low", "delta_rounds_ci95_high", "bytes_up_mean",
              "bytes_up_to_target_mean", "epsilon_rdp_mean", "epsilon_pld_mean",
              "sim_seconds_mean", "cost_total_mean")
CLOUD_FIELDS = ("arm", "cloud", "n", "cost_mean", "site_rounds_in_mean",
                "site_rounds_dropped_mean")


def score(metrics: Mapping[str, Any], keys: Sequence[str]) -> float | None:
  """Mean of `metrics[k]` over `keys`; None unless every one is a finite number."""
  vals = [metrics.get(k) for k in keys]
  if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v) for v in vals):
    return None
  return float(sum(vals) / len(vals))


def run_summary(run: Mapping[str, Any], target: float | None, metric: str = "") -> dict:
  """The per-run values of the module docstring from a `find_runs` record (its directory's
  rounds.jsonl is read here; ValueError naming file and line when a line is bad). `metric`:
  `study.target_metric` ('' = the mean of each task's first metric)."""
  cfg = run["config"]
  keys = [metric] if metric else metrics_lib.primary_metric_keys(run["tasks"])
  fed, study = cfg.get("fed", {}), cfg.get("study", {})
  H = max(int(fed.get("local_steps", 1)), 1)
  centralized = bool(study.get("centralized"))
  clock, up, curve = {0: 0.0}, {0: 0}, []
  eps_rdp = eps_pld = None
  cost, cost_total, clouds = {}, None, {}
  if centralized:
    for r in run["rows"]:
      if r.get("split") == "eval" and score(r, keys) is not None:
        curve.append((math.ceil(int(r["step"]) / H), score(r, keys)))
  else:
    cloud_of = {s["name"]: s.get("cloud") or s["name"] for s in fed.get("sites", ())}
    rows = sorted(report_lib.read_metrics(pathlib.Path(run["dir"]), ROUNDS_FILE),
                  key=lambda x: int(x["round"]))
    total_s, total_up = 0.0, 0
    for r in rows:
      k = int(r["round"])
      if k > 0:
        total_s += float(r.get("sim_seconds") or 0.0)
        total_up += int((r.get("bytes_up") or {}).get("total", 0))
        clock[k], up[k] = total_s, total_up
        for name in r.get("sites", ()):
          c = clouds.setdefault(cloud_of.get(name, name), {"in": 0, "dropped": 0})
          c["in"] += 1
        for name in r.get("dropped", ()):
          c = clouds.setdefault(cloud_of.get(name, name), {"in": 0, "dropped": 0})
          c["dropped"] += 1
        if "dp_epsilon_rdp" in r:
          eps_rdp, eps_pld = r["dp_epsilon_rdp"], r.get("dp_epsilon_pld")
        if "sim_cost" in r:
          cost, cost_total = dict(r["sim_cost"]), r.get("sim_cost_total")
      if score(r, keys) is not None:
        curve.append((k, score(r, keys)))
  # Round 0 (the untrained model) does not count: a centralized run has no such evaluation.
  reached = report_lib.steps_to_target([p for p in curve if p[0] > 0], target) if target else None
  return {
      "seed": run["seed"], "dir": run["dir"], "centralized": centralized,
      "final": score(run["metrics"], keys), "curve": curve,
      "clock": [(k, v) for k, v in sorted(clock.items())] if not centralized else [],
      "rounds_to_target": reached,
      "sim_s_to_target": clock.get(reached) if reached is not None and not centralized else None,
      "bytes_up_to_target": up.get(reached) if reached is not None and not centralized else None,
      "bytes_up": None if centralized else up[max(up)],
      "sim_seconds": None if centralized else clock[max(clock)],
      "epsilon_rdp": eps_rdp, "epsilon_pld": eps_pld,
      "cost": cost, "cost_total": cost_total, "clouds": clouds,
  }


def _stat(values: Sequence[float | None]) -> dict:
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  mean, std = sweep_lib.mean_std(vals)
  return {"mean": mean, "std": std, "values": vals, "n": len(vals)}


def setting(cfg: Mapping[str, Any], part: str) -> str:
  """What an arm's config sets for `part`, in words (from its config.json)."""
  fed, study = cfg.get("fed", {}), cfg.get("study", {})
  if study.get("centralized"):
    return (f"centralized: {cfg['train']['steps']} steps of {cfg['data']['batch_size']} rows, "
            f"{cfg['optim']['name']} lr {cfg['optim']['lr']:g}")
  if part == "noniid":
    return "IID" if fed.get("partition") == "iid" else (
        f"Dirichlet alpha {fed.get('alpha'):g}" if fed.get("partition") == "dirichlet"
        else str(fed.get("partition")))
  mode = (f"async FedBuff K={fed.get('buffer_size')}" if fed.get("mode") == "async"
          else "sync")
  if fed.get("deadline_s"):
    mode += f", deadline {fed['deadline_s']:g} s"
  if part == "aggregation":
    return (f"{fed.get('aggregator')}, server {fed.get('server_optimizer')} lr "
            f"{fed.get('server_lr'):g}, {mode}")
  if part == "compression":
    return fed.get("compress") or "float32"
  if part == "dp":
    dp = fed.get("dp", {})
    return (f"z {dp.get('noise_multiplier'):g}, C {dp.get('clip_norm'):g}"
            if dp.get("clip_norm") else "off")
  if part == "clouds":
    return mode
  return f"federated: {len(fed.get('sites', ()))} sites x {fed.get('local_steps')} local steps"


def report_federated(run_dirs: Sequence[str | os.PathLike[str]],
                     out_dir: str | os.PathLike[str]) -> dict:
  """Writes the federated study report of the runs under `run_dirs` into `out_dir`; returns
  report.json's content. FileNotFoundError for a missing folder; ValueError when no arm run is
  found, an arm names no part, the runs disagree on `study.target`, or a run file is bad."""
  runs, ignored = mtl_report.find_runs(run_dirs)
  if not runs:
    raise ValueError(f"--runs {' '.join(map(str, run_dirs))}: no run of a study arm found (a "
                     "run directory's config.json must set study.arm; train the arms with "
                     "jmtl study federated)")
  targets = sorted({float(r["config"].get("study", {}).get("target", 0.0)) for r in runs})
  if len(targets) > 1:
    raise ValueError(f"--runs: the runs were trained for different study.target values "
                     f"{targets}; report one study at a time")
  target = targets[0] or None
  metrics = sorted({str(r["config"].get("study", {}).get("target_metric", "")) for r in runs})
  if len(metrics) > 1:
    raise ValueError(f"--runs: the runs were trained for different study.target_metric values "
                     f"{metrics}; report one study at a time")
  metric = metrics[0]
  for r in runs:
    if metric and metric.split("/")[0] not in r["tasks"]:
      raise ValueError(f"{r['dir']}: study.target_metric {metric!r} names a task the run did "
                       f"not train (tasks: {', '.join(r['tasks'])})")
  arms = _arm_order(runs, run_dirs)
  cfg_of = {a: next(r["config"] for r in runs if r["arm"] == a) for a in arms}
  for a in arms:
    if not cfg_of[a].get("study", {}).get("parts"):
      raise ValueError(f"arm {a!r} ({next(r['dir'] for r in runs if r['arm'] == a)}): its "
                       "config.json sets no study.parts, so it belongs to no part of the "
                       "federated report")
  summaries: dict[str, list[dict]] = {a: [] for a in arms}
  status = {a: {"finished": 0, "diverged": [], "unfinished": []} for a in arms}
  for r in runs:
    if r["status"] == "ok":
      if any(s["seed"] == r["seed"] for s in summaries[r["arm"]]):
        raise ValueError(f"two runs of arm {r['arm']!r}, seed {r['seed']}: "
                         f"{next(s['dir'] for s in summaries[r['arm']] if s['seed'] == r['seed'])}"
                         f" and {r['dir']}; pass only one to --runs")
      summaries[r["arm"]].append(run_summary(r, target, metric))
      status[r["arm"]]["finished"] += 1
    else:
      status[r["arm"]][r["status"]].append(r["dir"])
  for a in arms:
    summaries[a].sort(key=lambda s: s["seed"])

  def records(arm, key):
    return [{"seed": s["seed"], "score": s[key], "metrics": {}} for s in summaries[arm]]

  table: dict[str, dict] = {}
  for a in arms:
    ss = summaries[a]
    stt = [s["rounds_to_target"] for s in ss]
    ref = cfg_of[a].get("study", {}).get("reference", "") or ""
    cell = {
        "seeds": [s["seed"] for s in ss], "final": _stat([s["final"] for s in ss]),
        "reached": sum(x is not None for x in stt), "rounds_to_target": stt,
        "rounds_to_target_mean": (float(np.mean([x for x in stt if x is not None]))
                                  if any(x is not None for x in stt) else None),
        "sim_s_to_target": _stat([s["sim_s_to_target"] for s in ss]),
        "bytes_up": _stat([s["bytes_up"] for s in ss]),
        "bytes_up_to_target": _stat([s["bytes_up_to_target"] for s in ss]),
        "epsilon_rdp": _stat([s["epsilon_rdp"] for s in ss]),
        "epsilon_pld": _stat([s["epsilon_pld"] for s in ss]),
        "sim_seconds": _stat([s["sim_seconds"] for s in ss]),
        "cost_total": _stat([s["cost_total"] for s in ss]),
        "cost": {c: _stat([s["cost"].get(c) for s in ss])
                 for c in sorted({c for s in ss for c in s["cost"]})},
        "clouds": {c: {"in": _stat([s["clouds"].get(c, {}).get("in", 0) for s in ss]),
                       "dropped": _stat([s["clouds"].get(c, {}).get("dropped", 0) for s in ss])}
                   for c in sorted({c for s in ss for c in s["clouds"]})},
        "reference": ref, "centralized": bool(cfg_of[a].get("study", {}).get("centralized")),
        "parts": list(cfg_of[a]["study"]["parts"]),
    }
    if ref and ref in summaries and ref != a:
      cell["paired"] = report_lib.paired_differences(records(a, "final"), records(ref, "final"),
                                                     report_lib.SCORE, [])
      if _round_unit(cfg_of[a]) == _round_unit(cfg_of[ref]):  # else rounds are not comparable
        cell["paired_rounds"] = report_lib.paired_differences(
            records(a, "rounds_to_target"), records(ref, "rounds_to_target"),
            report_lib.SCORE, [])
    table[a] = cell

  parts = {p: [a for a in arms if p in table[a]["parts"]] for p in PARTS}
  parts = {p: v for p, v in parts.items() if v}
  settings = {p: {a: setting(cfg_of[a], p) for a in v} for p, v in parts.items()}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  curves = {a: {"score": report_lib.mean_curve([s["curve"] for s in summaries[a]]),
                "clock": report_lib.mean_curve([s["clock"] for s in summaries[a]])
                if not table[a]["centralized"] else []} for a in arms}
  files = _plots(parts, table, curves, out)
  report = {"target": target, "target_metric": metric, "arms": status, "parts": parts,
            "settings": settings,
            "table": table, "curves": curves, "ignored": ignored,
            "per_run": {a: [{k: v for k, v in s.items() if k not in ("curve", "clock")}
                            for s in summaries[a]] for a in arms},
            "files": ["federated.md", "federated.csv", "clouds.csv", "report.json"] + files}
  (out / "federated.md").write_text(_markdown(report, run_dirs, out))
  (out / "federated.csv").write_text(_csv(report))
  (out / "clouds.csv").write_text(_clouds_csv(report))
  predictions_lib.write_json_atomic(out / "report.json", report)
  return report


def _round_unit(cfg: Mapping[str, Any]) -> tuple:
  """What one `round` of a run is: a synchronous round of all sampled sites, or (fed.mode =
  async) one server step of fed.buffer_size site jobs."""
  fed = cfg.get("fed", {})
  return ("async", fed.get("buffer_size")) if fed.get("mode") == "async" else ("sync",)


def _arm_order(runs: Sequence[dict], run_dirs: Sequence[Any]) -> list[str]:
  """Arms without a `study.reference` (the reference, FedAvg) first, then the others; each
  group in the order of the studies' study.json (the study config's `study.arms`), then in
  the order found."""
  listed = []
  for d in run_dirs:
    path = pathlib.Path(d) / "study.json"
    if path.is_file():
      listed += list(runs_lib.read_json(path).get("arms", {}))
  found = mtl_report._order(listed + [r["arm"] for r in runs])  # noqa: SLF001
  present = {r["arm"] for r in runs}
  refs = {r["arm"]: bool(r["reference"]) for r in runs}
  return sorted((a for a in found if a in present), key=lambda a: refs[a])


def _num(x) -> str:
  return "" if x is None else repr(float(x))


def _csv(report: dict) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  for part, arms in report["parts"].items():
    for a in arms:
      c = report["table"][a]
      p, pr = c.get("paired") or {}, c.get("paired_rounds") or {}
      ci, cir = p.get("ci95") or (None, None), pr.get("ci95") or (None, None)
      w.writerow([part, a, report["settings"][part][a], c["final"]["n"], _num(c["final"]["mean"]),
                  _num(c["final"]["std"]), " ".join(repr(v) for v in c["final"]["values"]),
                  c["reference"] if p else "", p.get("n", ""), _num(p.get("mean")),
                  _num(p.get("std")), _num(ci[0]), _num(ci[1]), p.get("ahead", ""),
                  _num(report["target"]), c["reached"], _num(c["rounds_to_target_mean"]),
                  " ".join("" if x is None else str(x) for x in c["rounds_to_target"]),
                  _num(c["sim_s_to_target"]["mean"]), pr.get("n", ""), _num(pr.get("mean")),
                  _num(cir[0]), _num(cir[1]), _num(c["bytes_up"]["mean"]),
                  _num(c["bytes_up_to_target"]["mean"]), _num(c["epsilon_rdp"]["mean"]),
                  _num(c["epsilon_pld"]["mean"]), _num(c["sim_seconds"]["mean"]),
                  _num(c["cost_total"]["mean"])])
  return buf.getvalue()


def _clouds_csv(report: dict) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CLOUD_FIELDS)
  for a, c in report["table"].items():
    for cloud in sorted(set(c["cost"]) | set(c["clouds"])):
      cost = c["cost"].get(cloud, {"n": 0, "mean": None})
      part = c["clouds"].get(cloud, {"in": {"mean": None}, "dropped": {"mean": None}})
      w.writerow([a, cloud, cost["n"], _num(cost["mean"]), _num(part["in"]["mean"]),
                  _num(part["dropped"]["mean"])])
  return buf.getvalue()


def _delta(p: dict | None, digits: int = 2) -> str:
  if not p or p["mean"] is None:
    return "—"
  text = report_lib.signed_pm(p['mean'], p['std'], digits)
  if p["ci95"] is not None:
    text += (f" [{report_lib.signed(p['ci95'][0], digits)}, "
             f"{report_lib.signed(p['ci95'][1], digits)}]")
  return text + f" ({p['ahead']}/{p['n']})"


def _mb(s: dict) -> str:
  return "—" if s["mean"] is None else f"{s['mean'] / 1e6:.1f}"


def _markdown(report: dict, run_dirs: Sequence[Any], out: pathlib.Path) -> str:
  t = report["target"]
  lines = ["# Federated study", "",
           "Made by `jmtl report federated --runs "
           + " ".join(str(d) for d in run_dirs) + f" --out {out}` from the runs of "
           "`jmtl study federated`. Dev score = "
           + (f"{report['target_metric']} (study.target_metric, percent); "
              if report.get("target_metric") else
              "mean over tasks of each task's first metric (percent); ")
           + "values are mean ± sample std (ddof=1) over seeds. "
           + (f"Target dev score: {t:g} (study.target, fixed before the runs). " if t else
              "No study.target: no rounds to target. ")
           + "Rounds / simulated seconds to target: mean over the seeds that reached it (k/n). "
           "Δ vs reference: per seed, the arm minus its reference arm (study.reference), mean ± "
           "std [95 % CI, Student's t over seeds] (seeds where the arm is higher / paired); for "
           "rounds to target, lower is faster (seeds where both reached it; not given for an "
           "asynchronous arm, whose round is one server step of fed.buffer_size site jobs: "
           "compare it in simulated seconds).", "", "Arms:", ""]
  for a, s in report["arms"].items():
    note = f"{s['finished']} finished run(s)"
    if s["diverged"]:
      note += f", {len(s['diverged'])} diverged"
    if s["unfinished"]:
      note += f", {len(s['unfinished'])} unfinished"
    lines.append(f"- `{a}`: {note}; parts {', '.join(report['table'][a]['parts'])}")
  for part, arms in report["parts"].items():
    lines += ["", f"## {PARTS[part]}", "",
              "| arm | setting | n | final dev score | Δ score vs ref | rounds to target | "
              "Δ rounds vs ref | sim s to target | MB up | MB up to target | ε (RDP) | "
              "sim s total | cost $ |", "|---" * 13 + "|"]
    for a in arms:
      c = report["table"][a]
      f = c["final"]
      stt = (f"{c['rounds_to_target_mean']:.1f} ({c['reached']}/{len(c['seeds'])})"
             if c["rounds_to_target_mean"] is not None else f"— (0/{len(c['seeds'])})")
      sim, eps = c["sim_s_to_target"]["mean"], c["epsilon_rdp"]["mean"]
      sim = "—" if sim is None else f"{sim:.0f}"
      eps = "—" if eps is None else f"{eps:.2f}"
      lines.append(
          f"| {a} | {report['settings'][part][a]} | {f['n']} | "
          f"{report_lib.fmt(f['mean'], f['std'])} | {_delta(c.get('paired'))} | {stt} | "
          f"{_delta(c.get('paired_rounds'), 1)} | {sim} | "
          f"{_mb(c['bytes_up'])} | {_mb(c['bytes_up_to_target'])} | {eps} | "
          f"{report_lib.fmt(c['sim_seconds']['mean'], c['sim_seconds']['std'], 0)} | "
          f"{report_lib.fmt(c['cost_total']['mean'], c['cost_total']['std'], 3)} |")
    if part == "clouds":
      clouds = sorted({k for a in arms for k in report["table"][a]["cost"]})
      lines += ["", "Per cloud: simulated cost in dollars (device-hours held + egress), mean over "
                "seeds; site-rounds its sites took part in / were dropped from (deadline).", "",
                "| arm | " + " | ".join(clouds) + " |", "|---" * (len(clouds) + 1) + "|"]
      for a in arms:
        c = report["table"][a]
        cells = []
        for k in clouds:
          cost, part_ = c["cost"].get(k), c["clouds"].get(k)
          cell = "—" if not cost or cost["mean"] is None else f"${cost['mean']:.3f}"
          if part_:
            cell += f" ({part_['in']['mean']:.0f} in / {part_['dropped']['mean']:.0f} dropped)"
          cells.append(cell)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
  lines += ["", "## Figures", ""]
  lines += [f"![{f[:-4]}]({f})" for f in report["files"] if f.endswith(".png")]
  return "\n".join(lines) + "\n"


def _plots(parts: Mapping[str, list[str]], table: Mapping[str, dict],
           curves: Mapping[str, dict], out: pathlib.Path) -> list[str]:
  """Writes the PNGs; returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  arms = list(table)
  colours = plt.get_cmap("tab10")
  style = {a: {"color": colours(i % 10), "ls": "-" if i < 10 else "--", "lw": 1.5}
           for i, a in enumerate(arms)}
  files = []

  def panels(name, xlabel, x_of):
    n = len(parts)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), dpi=110,
                             squeeze=False)
    for ax, (part, members) in zip(axes.flat, parts.items()):
      for a in members:
        xy = x_of(a)
        if xy:
          xs, ys = zip(*xy)
          ax.plot(xs, ys, marker="o", ms=2.5, label=a, **style[a])
      ax.set_title(PARTS[part], fontsize=8)
      ax.set_xlabel(xlabel, fontsize=8)
      ax.set_ylabel("dev score (mean over seeds)", fontsize=8)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(parts):]:
      ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    files.append(name)

  panels("dev_vs_round.png", "round", lambda a: curves[a]["score"])

  def by_clock(a):
    clock = dict(curves[a]["clock"])
    return [(clock[r], v) for r, v in curves[a]["score"] if r in clock]

  panels("dev_vs_sim_seconds.png", "simulated seconds (mean over seeds)", by_clock)

  for name, part, key, xlabel, scale in (
      ("bytes_vs_score.png", "compression", "bytes_up", "uplink bytes, all rounds", "log"),
      ("epsilon_vs_score.png", "dp", "epsilon_rdp", "epsilon (RDP) at fed.dp.delta", "linear")):
    if part not in parts:
      continue
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for a in parts[part]:
      c = table[a]
      y = c["final"]
      if y["mean"] is None:
        continue
      if c[key]["mean"] is None:  # no DP (epsilon infinite): a horizontal reference line
        ax.axhline(y["mean"], label=f"{a} (no {'DP' if part == 'dp' else 'bytes'})",
                   **style[a])
        continue
      ax.errorbar([c[key]["mean"]], [y["mean"]], yerr=[y["std"] or 0.0], fmt="o", capsize=3,
                  label=a, color=style[a]["color"])
    ax.set_xscale(scale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final dev score (mean ± std over seeds)")
    ax.set_title(PARTS[part], fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    files.append(name)
  return files
