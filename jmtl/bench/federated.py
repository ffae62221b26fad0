"""`jmtl bench federated`: the cost of a federated round against centralised training.

Two modes (`bench.federated.mode`): "round" (below: a round's seconds against H centralised
steps) and "bytes_to_target" (`bytes_to_target`: uplink bytes DiLoCo arms need to reach
synchronous data-parallel training's dev score, issue 15 requirement 6).

One round of S sites x H local steps (`jmtl.federated.algorithm.make_round` with the config's
sites, optimizers, aggregator and backend, every site taking part) against H steps of the
trainer's own step (`jmtl.train.step.make_train_step`, the client optimizer) over a global batch
of S x one site's batch, on the same devices: the site mesh (site, data, fsdp, tensor) for the
round, and for the centralised steps a (data = S x data, fsdp, tensor) mesh over the same devices
in the same order. Both process the same rows with the same model, so

  ratio = median round seconds / (H x median centralised step seconds)

is what federating the run costs in wall time on this mesh (broadcast, the scan of local steps,
pseudo-gradient aggregation and the server step, minus the per-step gradient all-reduce the
centralised run pays). Batches are synthetic (`jmtl.bench.step.synthetic_batch`, every task of
the config in every batch as in a federated round); the two measurements are interleaved (one
round, then H centralised steps, repeated) so that a drifting host load hits both alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import jax
import numpy as np

from jmtl.bench import common
from jmtl.bench import step as bench_step
from jmtl.config import ConfigError
from jmtl.federated import algorithm
from jmtl.federated import loop as fed_loop
from jmtl.federated import sites as sites_lib
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.tasks import get_task
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

TARGET_RATIO = 1.10  # issue requirement: a round costs at most 1.10x its centralised steps


def _site_batch(config: Any, tasks: list, shards: int) -> dict[str, dict[str, np.ndarray]]:
  """One site's local batch: every task with data.batch_size // tasks rows (a multiple of the
  site's batch shards)."""
  cfg = copy.deepcopy(config)
  cfg.data.mixing = "mixed"
  return bench_step._batches(cfg, tasks, int(config.data.vocab_size), shards)[0]  # noqa: SLF001


def bench_federated(config: Any, *, warmup: int = 2, iters: int = 5) -> dict[str, Any]:
  """Median round time, median centralised step time and their ratio (module docstring).

  `config` is a federated config (`fed.sites`); returns a JSON-serialisable dict. Raises
  ValueError when `iters` < 1 or `warmup` < 0, or as `make_round` / the meshes do.
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
  fed = config.fed
  unsupported = [k for k, on in (
      ("fed.compress", bool(fed.compress)), ("fed.dp.clip_norm", fed.dp.clip_norm > 0),
      ("fed.secure_aggregation", bool(fed.secure_aggregation)),
      ("fed.mode", fed.mode != "sync"), ("fed.backend", fed.backend == "flower"),
      ("fed.faults.byzantine", bool(fed.faults.byzantine or fed.faults.byzantine_fraction)))
      if on]
  if unsupported:
    raise ConfigError(f"jmtl bench federated times the plain synchronous round; config keys "
                      f"{', '.join(unsupported)} are set (unset them to benchmark)")
  sites = sites_lib.sites_from_config(config)
  S, H = len(sites), int(fed.local_steps)
  tasks = [get_task(name) for name in config.tasks]
  names = [t.name for t in tasks]
  kinds = {t.name: t.kind for t in tasks}
  heads = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  vocab = int(config.data.vocab_size)
  rules = tuple(tuple(r) for r in config.mesh.rules)

  # Federated round on the site mesh.
  site_mesh = fed_loop.build_mesh(config, sites)
  client_tx, server_tx = fed_loop.build_optimizers(config)
  state, graphdef, shardings = state_lib.create_train_state(config, heads, vocab, client_tx,
                                                            site_mesh)
  server, clients = algorithm.init(state.params, server_tx, client_tx, site_mesh,
                                   param_shardings=shardings.params)
  groups = fed_loop.param_groups(server.params, names)
  holds = np.array([[1.0] + [float(t in s.tasks) for t in names] for s in sites], np.float32)
  round_fn = algorithm.make_round(
      fed_loop.make_loss_fn(config, graphdef, state.rest, kinds), client_tx, server_tx,
      site_mesh, local_steps=H, groups=groups, aggregator=fed.aggregator,
      temperature=float(fed.temperature), reset_client_state=fed.client_state == "reset",
      seed=int(config.seed), prox_mu=float(fed.prox_mu), trim=float(fed.trim),
      byzantine_f=int(fed.byzantine_f), krum_m=int(fed.krum_m), backend=fed.backend)
  site_batch = _site_batch(config, tasks, sharding_lib.batch_shards(site_mesh, rules))
  site_batches = jax.tree.map(lambda b: np.broadcast_to(b, (S, H) + b.shape).copy(), site_batch)
  examples = np.ones(S, np.float32)
  mask = np.ones(S, np.float32)
  del state

  # Centralised steps over the same devices: the site axis becomes data parallelism.
  d, f, t = (site_mesh.shape[a] for a in ("data", "fsdp", "tensor"))
  central_cfg = copy.deepcopy(config)
  central_cfg.mesh.data, central_cfg.mesh.fsdp, central_cfg.mesh.tensor = S * d, f, t
  central_cfg.mesh.dcn_data = 1
  central_cfg.optim = fed_loop.client_optim_config(config)
  central_mesh = mesh_lib.make_mesh(central_cfg.mesh, list(site_mesh.devices.reshape(-1)))
  tx = client_tx
  cstate, cgraph, csh = state_lib.create_train_state(central_cfg, heads, vocab, tx, central_mesh)
  step_fn = step_lib.make_train_step(cgraph, tx, kinds, central_cfg, csh, central_mesh)
  central_batch = jax.device_put(
      {n: {k: np.concatenate([v] * S) for k, v in b.items()} for n, b in site_batch.items()},
      sharding_lib.batch_sharding(central_mesh, rules))

  holder = {"server": server, "clients": clients, "state": cstate}

  def one_round():
    holder["server"], holder["clients"], m = round_fn(
        holder["server"], holder["clients"], site_batches, examples, mask, holds)
    jax.block_until_ready((holder["server"], m))

  def h_steps():
    for _ in range(H):
      holder["state"], m = step_fn(holder["state"], central_batch, 0.0, 0)
    jax.block_until_ready((holder["state"], m))

  t0 = time.perf_counter()
  one_round()
  round_compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  h_steps()
  central_compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    one_round()
    h_steps()
  rounds, centrals = [], []
  for _ in range(iters):
    t0 = time.perf_counter()
    one_round()
    rounds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    h_steps()
    centrals.append(time.perf_counter() - t0)
  round_s, central_h_s = statistics.median(rounds), statistics.median(centrals)
  ratio = round_s / central_h_s
  rows = sum(int(b["input_ids"].shape[0]) for b in site_batch.values())
  seq = int(config.data.max_len)
  return {
      **common.device_info(),
      "device_count": int(site_mesh.devices.size),
      "site_mesh": "x".join(str(site_mesh.shape[a]) for a in site_mesh.axis_names),
      "central_mesh": "x".join(str(central_mesh.shape[a]) for a in central_mesh.axis_names),
      "backend": str(fed.backend), "aggregator": str(fed.aggregator),
      "client_optimizer": str(fed.client_optimizer),
      "server_optimizer": str(fed.server_optimizer),
      "sites": S, "local_steps": H, "tasks": ",".join(names),
      "layers": int(config.model.layers), "d_model": int(config.model.d_model),
      "rows_per_site_step": rows, "seq_len": seq,
      "tokens_per_round": S * H * rows * seq,
      "warmup": warmup, "iters": iters,
      "round_compile_s": round(round_compile_s, 3),
      "central_compile_s": round(central_compile_s, 3),
      "round_s": round_s, "round_min_s": min(rounds), "round_max_s": max(rounds),
      "central_step_s": central_h_s / H, "central_h_steps_s": central_h_s,
      "central_h_steps_min_s": min(centrals), "central_h_steps_max_s": max(centrals),
      "ratio": ratio, "target_ratio": TARGET_RATIO, "meets_target": bool(ratio <= TARGET_RATIO),
      "round_compilations": round_fn.trace_count(),
  }


# --------------------------------------------------------------- bytes to target
# `bench.federated.mode = "bytes_to_target"`: uplink bytes to synchronous training's dev score.

REFERENCE = "best"  # the synchronous arm's best dev score over its evaluations (not its final)
TARGET_FACTOR = 100.0  # issue requirement: >= 100x fewer uplink bytes ...
TARGET_POINTS = 1.0  # ... at <= 1 point lower dev score


def first_reaching(curve: list[tuple[int, int, float | None]], target: float
                   ) -> tuple[int, int, float] | None:
  """The first (step, cumulative uplink bytes, score) of `curve` (in step order) whose score
  is >= `target` (percent points); None when no evaluation reaches it (a None score, e.g. a
  non-finite metric, never does)."""
  for step, sent, s in curve:
    if s is not None and s >= target:
      return int(step), int(sent), float(s)
  return None


def sync_curve(rows: list[dict], keys: list[str], bytes_per_step: int
               ) -> list[tuple[int, int, float | None]]:
  """(step, cumulative uplink bytes, dev score) of the synchronous run's eval lines of
  metrics.jsonl: after step s every site has uploaded s full float32 gradients, so the bytes
  are s x `bytes_per_step` (= S x 4 x the values each site trains)."""
  from jmtl.study import fed_report  # noqa: PLC0415
  out = [(int(r["step"]), int(r["step"]) * int(bytes_per_step), fed_report.score(r, keys))
         for r in rows if r.get("split") == "eval"]
  return sorted(out)


def federated_curve(rows: list[dict], keys: list[str], local_steps: int
                    ) -> list[tuple[int, int, float | None]]:
  """(step = round x H, cumulative uplink bytes, dev score) at each evaluated round >= 1 of a
  federated run's rounds.jsonl; the bytes are the sum of the rounds' own `bytes_up.total`
  (`jmtl.federated.loop`'s exact accounting of what the sites sent). The round-0 evaluation
  (the untrained model) is left out: the synchronous arm has none, and a target it met would
  count as reached with 0 bytes."""
  from jmtl.study import fed_report  # noqa: PLC0415
  out, sent = [], 0
  for r in sorted(rows, key=lambda x: int(x["round"])):
    if int(r["round"]) > 0:
      sent += int((r.get("bytes_up") or {}).get("total", 0))
    s = fed_report.score(r, keys)
    if int(r["round"]) > 0 and (s is not None or any(k in r for k in keys)):
      out.append((int(r["round"]) * int(local_steps), sent, s))
  return out


def _check_bytes_config(config: Any) -> None:
  """ConfigError (one line naming the keys) for settings that would make the synchronous arm
  not the federated arms' same-data, same-batch counterpart."""
  fed = config.fed
  bad = [k for k, on in (
      ("fed.partition (must be iid)", fed.partition != "iid"),
      ("fed.participation (must be 1)", float(fed.participation) != 1.0),
      ("fed.faults.dropout", float(fed.faults.dropout) > 0),
      ("fed.deadline_s", float(fed.deadline_s) > 0),
      ("fed.mode (must be sync)", fed.mode != "sync"),
      ("fed.backend (flower)", fed.backend == "flower"),
      ("fed.dp.clip_norm", float(fed.dp.clip_norm) > 0),
      ("fed.secure_aggregation", bool(fed.secure_aggregation)),
      ("fed.faults.byzantine", bool(fed.faults.byzantine or fed.faults.byzantine_fraction)))
      if on]
  if bad:
    raise ConfigError(f"jmtl bench federated (bench.federated.mode = bytes_to_target) compares "
                      f"IID sites that all take part every round; config keys "
                      f"{', '.join(bad)} are set")


def bytes_to_target(config: Any, *, workdir: str | None = None, out: str | None = None,
                    echo: Any = None, train_fn: Any = None) -> dict[str, Any]:
  """Uplink bytes each DiLoCo arm needs to reach synchronous data-parallel training's dev score.

  Arms (each a real run on the config's data; S = number of `fed.sites`, B = `data.batch_size`,
  T = `bench.federated.steps`, k = `bench.federated.eval_every`):
  - sync: synchronous data-parallel training, `jmtl.study.mtl.centralized_config` of the config
    (one model, T steps of the global batch S x B, optimizer `fed.client_optimizer` at
    `fed.client_lr`, evaluation every k steps): each step every site uploads its full float32
    gradient, S x 4 x n bytes per step (n = the values each site trains, counted by the
    federated loop as the float32 parameters it downloads, `bytes_down`; a ring all-reduce
    moves 2(S-1)/S of that per site, so the naive count here favours sync by < 2x);
  - diloco H spec, for each H of `bench.federated.local_steps` and spec of
    `bench.federated.compress`: `jmtl federated` with fed.local_steps = H, T / H rounds,
    fed.compress = spec, evaluation every k / H rounds; the server and client optimizers are
    the config's (DiLoCo: client AdamW, server Nesterov; Douillard et al. 2023, arXiv
    2311.08105, Algorithm 1); cumulative uplink bytes = the sum of its rounds' `bytes_up.total`.
  Every arm processes the same T x S x B training rows. The reference score is the sync arm's
  best dev score (`REFERENCE`; percent, mean over tasks of each task's first metric, as
  `jmtl report federated`); an arm reaches the target at its first evaluation whose score is
  >= reference - `bench.federated.tolerance`; ratio = sync bytes to target (the sync arm's own
  first reaching evaluation) / the arm's bytes to target (None when not reached).

  Runs go to `workdir` (default: a temporary directory, removed afterwards). With `out`, the
  JSON is rewritten after each arm ("complete": false until the last); `echo` gets one line
  per arm. `train_fn(config, run_dir)` defaults to `jmtl.study.mtl.default_train`. Returns a
  JSON-ready dict ("rows": one per arm). Raises ConfigError for a config that is not IID with
  full participation (`_check_bytes_config`) or as the runs do (data files, keys).
  """
  import json  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  from jmtl import config as config_lib  # noqa: PLC0415
  from jmtl.eval import metrics as metrics_lib  # noqa: PLC0415
  from jmtl.study import mtl as study_mtl  # noqa: PLC0415
  from jmtl.study import report as report_lib  # noqa: PLC0415
  from jmtl.study import runs as runs_lib  # noqa: PLC0415

  _check_bytes_config(config)
  b = config.bench.federated
  T, k, tol = int(b.steps), int(b.eval_every), float(b.tolerance)
  Hs, specs = [int(h) for h in b.local_steps], [str(s) for s in b.compress]
  S = len(config.fed.sites)
  keys = metrics_lib.primary_metric_keys(list(config.tasks))
  echo = echo or (lambda s: None)
  train_fn = train_fn or study_mtl.default_train

  def arm_config(H: int, spec: str) -> Any:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.fed.local_steps, c.fed.rounds, c.fed.compress = H, T // H, spec
      c.fed.eval_every, c.fed.checkpoint_every = k // H, T // H
      c.bench.federated.mode = "round"  # the run itself is no benchmark
    return c

  sync_cfg = study_mtl.centralized_config(arm_config(1, ""))
  with sync_cfg.unlocked():
    sync_cfg.train.log_every = k
  configs = [("sync", 1, "", config_lib.validate(sync_cfg, check_files=False))]
  configs += [("diloco", H, s, config_lib.validate(arm_config(H, s), check_files=False))
              for H in Hs for s in specs]  # every config checked before the first run

  tmp = workdir is None
  root = pathlib.Path(tempfile.mkdtemp(prefix="jmtl-bench-") if tmp else workdir)
  root.mkdir(parents=True, exist_ok=True)
  result: dict[str, Any] = {
      **common.device_info(), "mode": "bytes_to_target", "tasks": ",".join(config.tasks),
      "sites": S, "steps": T, "eval_every": k, "global_batch": S * int(config.data.batch_size),
      "client_optimizer": str(config.fed.client_optimizer),
      "client_lr": float(config.fed.client_lr),
      "server_optimizer": str(config.fed.server_optimizer),
      "server_lr": float(config.fed.server_lr),
      "server_momentum": float(config.fed.server_momentum),
      "layers": int(config.model.layers), "d_model": int(config.model.d_model),
      "reference": REFERENCE, "tolerance": tol, "reference_score": None, "target_score": None,
      "sync_bytes_per_step": None, "values_per_site": None, "sync_bytes_to_target": None,
      "rows": [], "complete": False, "target_factor": TARGET_FACTOR,
      "target_points": TARGET_POINTS, "meets_target": None}

  def write() -> None:
    if out:
      pathlib.Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

  def row_of(arm: str, H: int, spec: str, curve: list, seconds: float) -> dict:
    hit = first_reaching(curve, result["target_score"])
    scores = [s for _, _, s in curve if s is not None]
    sent = int(hit[1]) if hit else None
    sync_sent = result["sync_bytes_to_target"]
    return {"arm": arm, "local_steps": H, "compress": spec or "none",
            "evals": [[int(st), int(by), s] for st, by, s in curve],
            "best_score": max(scores) if scores else None,
            "final_score": curve[-1][2] if curve else None,
            "total_bytes_up": int(curve[-1][1]) if curve else 0,
            "reached": hit is not None, "step_to_target": hit[0] if hit else None,
            "score_at_target": hit[2] if hit else None, "bytes_to_target": sent,
            "ratio": (sync_sent / sent if hit and sent else None) if sync_sent else None,
            "seconds": round(seconds, 1)}

  def line(r: dict) -> str:
    name = "sync" if r["arm"] == "sync" else f"diloco H={r['local_steps']} {r['compress']}"
    if not r["reached"]:
      return (f"{name:<28} not reached: best {r['best_score']:.2f} < target "
              f"{result['target_score']:.2f} ({r['total_bytes_up']:,} bytes up in all)")
    ratio = ("" if r["ratio"] is None or r["arm"] == "sync"
             else f", {r['ratio']:.1f}x fewer than sync")
    return (f"{name:<28} {r['score_at_target']:.2f} >= {result['target_score']:.2f} at step "
            f"{r['step_to_target']}: {r['bytes_to_target']:,} bytes up{ratio}")

  try:
    if not config.data.tokenizer:  # one tokenizer for every arm: same ids, trained once
      tok = runs_lib.shared_tokenizer(config, root)
      configs = [(a, H, s, _with_tokenizer(c, tok)) for a, H, s, c in configs]
    sync_rows, sync_s = None, 0.0
    for arm, H, spec, cfg in configs:
      run_dir = root / (arm if arm == "sync" else f"diloco_H{H}_{spec or 'none'}".replace(
          ":", "").replace("+", "_"))
      t0 = time.perf_counter()
      train_fn(cfg, run_dir)
      took = time.perf_counter() - t0
      if arm == "sync":
        sync_rows, sync_s = report_lib.read_metrics(run_dir), took
        scores = [s for _, _, s in sync_curve(sync_rows, keys, 0) if s is not None]
        if not scores:
          raise ValueError(f"{run_dir / 'metrics.jsonl'}: the synchronous run has no dev score")
        result["reference_score"] = max(scores)
        result["target_score"] = max(scores) - tol
        continue
      rows = report_lib.read_metrics(run_dir, fed_loop.ROUNDS_FILE)
      if result["sync_bytes_per_step"] is None:  # S x the float32 bytes each site trains
        first = next(r for r in rows if int(r["round"]) == 1)
        result["sync_bytes_per_step"] = int(first["bytes_down"]["total"])
        result["values_per_site"] = int(first["bytes_down"]["total"]) // (4 * S)
        curve = sync_curve(sync_rows, keys, result["sync_bytes_per_step"])
        hit = first_reaching(curve, result["target_score"])
        result["sync_bytes_to_target"] = hit[1]
        r0 = row_of("sync", 1, "", curve, sync_s)
        result["rows"].append(r0)
        echo(line(r0))
      r = row_of(arm, H, spec, federated_curve(rows, keys, H), took)
      result["rows"].append(r)
      echo(line(r))
      write()
  finally:
    if tmp:
      shutil.rmtree(root, ignore_errors=True)
  good = [r for r in result["rows"] if r["arm"] != "sync" and r["reached"]
          and r["ratio"] is not None and r["ratio"] >= TARGET_FACTOR and tol <= TARGET_POINTS]
  result["meets_target"] = bool(good)
  result["meeting_arms"] = [f"H={r['local_steps']} {r['compress']}" for r in good]
  result["complete"] = True
  write()
  return result


def _with_tokenizer(cfg: Any, path: str) -> Any:
  with cfg.unlocked():
    cfg.data.tokenizer = str(path)
  return cfg
