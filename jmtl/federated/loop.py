"""`jmtl federated`: the federated job, read top to bottom like `jmtl.train.loop`.

lock the workdir -> check an existing checkpoint's fingerprint -> sites, `site` mesh, tasks,
tokenizer -> server + per-site client state (created sharded) -> partition each task's train
split over its sites, one grain iterator per (site, task) -> resume -> for each round: sample
participants, read H local batches per site, one jitted round (`jmtl.federated.algorithm`),
log, checkpoint, evaluate -> final outputs.

Reused from the trainer, not copied: the multi-task loss (`jmtl.train.step.task_losses`), train
state creation and sharding rules (`jmtl.train.state`), the grain pipeline
(`jmtl.data.pipeline.TrainIterator` over a site's records), the Orbax checkpointer, the metric
writer and progress display, evaluation (`jmtl.train.loop._eval_sets` / `_run_eval`), the
workdir lock and fingerprint, `jmtl.optim.build` for both optimizers.

Batches: every local step of every site holds every task of the config with the rows
`rows_per_task(mixture_rates(data.*, global train sizes), data.batch_size)` (data.batch_size is
one site's batch per local step); a site that does not hold a task, or does not take part in
the round, gets that task's rows with example_weight 0 (no loss, no gradient), so every round
has one shape: a new participation pattern never recompiles. Data iterators of a site that does
not take part do not advance.
With fed.partition = "own" (cross-silo: each site's own files, `own_records`) a site's rows per
task come from its own sizes (`own_rows`), as on Flower, and its batch of a task is padded to
the largest site's rows with zero-weight copies of its first row (`pad_rows`).

Faults (`jmtl.federated.faults`, keys `fed.faults.*`): after sampling and the deadline, each
remaining site drops out with probability `fed.faults.dropout` (seeded by (seed, round), so a
resumed run drops the same ones); Byzantine sites (fixed for the run) send a corrupted delta,
applied inside the round from a per-site mode input.

Files: `config.json`, `rounds.jsonl` (one line per round: `round`, `sites` (participants'
names), `dropped` (sampled but not taking part), `dropout` (lost to random dropout),
`byzantine` (Byzantine participants), `applied` (0: a skipped round), `loss` (example-weighted
mean over participants of L_k), `site_loss`, `weights`, `bytes_up` / `bytes_down` per site and
`total`, `sim_seconds`, `sim_cost` per cloud and `sim_cost_total` (cumulative), `stragglers`
(participants slowed by `fed.faults.stragglers`), `dp_epsilon_rdp` / `dp_epsilon_pld` (with
`fed.dp.clip_norm` > 0: epsilon at `fed.dp.delta` after this many rounds; null when infinite),
plus `<task>/<metric>` and `site/<name>/<task>/<metric>` when evaluated; with `fed.eval_every`
> 0 a first line `round` 0 holds the initial model's evaluation only; with `fed.mode = "async"`
one line per server step whose `sites` are the buffer's deliverers, with `staleness` per
deliverer, `sim_clock` (the simulated time of the step) and `sim_seconds` (since the previous
step)), `metrics.jsonl` (train lines at `fed.log_every` rounds, eval lines), `eval.json`
(final: global validation + each site's held-out slice), `predictions/`, `tb/`, `tokenizer.json`,
`checkpoints/` (server state, every site's client optimizer state, start parameters (async) and
compression residual, every site's data position, the pending round line and cumulative cost):
a run killed with SIGKILL and started again logs
exactly the rounds an uninterrupted run logs (with `fed.step_time_s` > 0; a measured step time
makes `sim_seconds` differ between runs).

Bytes (exact): a participant receives the float32 parameters it trains (trunk + the heads of
the tasks it holds) and sends a float32 delta of the same leaves: 4 x that many values each way;
with `fed.compress` it sends those leaves' encodings instead, and `bytes_up` counts their exact
bytes (`jmtl.federated.compression.leaf_bytes`: values, indices, scales); with
`fed.secure_aggregation` it sends the masked uint32 payload of the same leaves
(`secagg.payload_bytes`): again 4 bytes per value.
Simulated time (plain Python beside the compiled round; issue requirement 8): site k's round
takes latency + bytes_down x 8 / down_mbps + H x step_time / speed + bytes_up x 8 / up_mbps +
latency seconds (latency both ways); a synchronous round lasts as long as its slowest
participant; with `fed.deadline_s` > 0 a sampled site whose time exceeds it is dropped before
the round (mask 0; a round with none left is skipped and logged). Cost per cloud: device-hours
(devices x round seconds / 3600: a site is held for the whole synchronous round) x
price_device_hour + bytes_up / 1e9 x price_egress_gb.
Asynchronous runs (`fed.mode = "async"`, FedBuff; the rules in `jmtl.federated.asynchronous`):
every site trains concurrently; a site's job lasts its round seconds above; the server steps when
`fed.buffer_size` jobs have delivered, and those sites restart from the new model. The event
queue is part of the checkpoint's meta, so a resumed run replays the same steps. A deliverer is
billed devices x (server step time - its job's start) / 3600 x price_device_hour + egress.
Stragglers (`fed.faults.stragglers`, seeded per round) multiply their compute seconds by
`fed.faults.straggler_slowdown`: a synchronous round waits for them (or drops them past
`fed.deadline_s`); an asynchronous job delivers later.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from jmtl import config as config_lib
from jmtl import optim
from jmtl import tasks as task_registry
from jmtl.data import pipeline
from jmtl.data import sources
from jmtl.federated import algorithm
from jmtl.federated import asynchronous
from jmtl.federated import compression
from jmtl.federated import faults as faults_lib
from jmtl.federated import partition as partition_lib
from jmtl.federated import privacy
from jmtl.federated import secagg
from jmtl.federated import sites as sites_lib
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import distributed
from jmtl.parallel import mesh as mesh_lib
from jmtl.train import CheckpointError
from jmtl.train import NonFiniteError
from jmtl.train import checkpoint as checkpoint_lib
from jmtl.train import evaluate as evaluate_lib
from jmtl.train import loop as train_loop
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib
from jmtl.train import workdir as workdir_lib
from jmtl.train import writers

ROUNDS_FILE = "rounds.jsonl"


def client_optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`optim.*` with name = fed.client_optimizer and lr = fed.client_lr (schedule, warmup, decay,
  clipping as in optim.*; its steps are rounds x local_steps)."""
  cfg = copy.deepcopy(config.optim)
  cfg.name, cfg.lr = config.fed.client_optimizer, float(config.fed.client_lr)
  return cfg


def server_optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`optim.*` with name = fed.server_optimizer, lr = fed.server_lr, momentum =
  fed.server_momentum, a constant schedule, no warmup, clipping or weight decay."""
  cfg = copy.deepcopy(config.optim)
  cfg.name, cfg.lr = config.fed.server_optimizer, float(config.fed.server_lr)
  cfg.momentum = float(config.fed.server_momentum)
  cfg.schedule, cfg.warmup_steps, cfg.grad_clip, cfg.weight_decay = "constant", 0, 0.0, 0.0
  return cfg


def build_optimizers(config: ml_collections.ConfigDict):
  """(client_tx, server_tx) from `jmtl.optim.build`."""
  rounds, steps = int(config.fed.rounds), int(config.fed.local_steps)
  return (optim.build(client_optim_config(config), rounds * steps),
          optim.build(server_optim_config(config), rounds))


def secure_fixed_point(config: ml_collections.ConfigDict) -> secagg.FixedPoint | None:
  """The fixed point of `fed.secagg.*` when `fed.secure_aggregation` is on, else None."""
  if not config.fed.secure_aggregation:
    return None
  return secagg.FixedPoint(float(config.fed.secagg.clipping_range),
                           int(config.fed.secagg.quantization_range))


def build_mesh(config: ml_collections.ConfigDict, sites: list[sites_lib.Site]):
  return mesh_lib.make_site_mesh(config.mesh, len(sites), sites[0].devices)


def server_eval_mesh():
  """The mesh `jmtl eval` evaluates a Flower server checkpoint on: one site of every device
  this process has, all on the data axis (data = D, fsdp = tensor = 1; D = jax.device_count()).
  A Flower checkpoint holds the server state only (`flower_checkpoint_tree`), so it needs
  none of the sites' devices (the SuperLink host may have one device for S sites)."""
  n = jax.device_count()
  return mesh_lib.make_site_mesh(ml_collections.ConfigDict({"data": n, "fsdp": 1, "tensor": 1}),
                                 1, n)


def local_sites(mesh) -> set[int]:
  """Indices of the sites with a device on this process (all of them with one process)."""
  me = jax.process_index()
  return {k for k in range(mesh.devices.shape[0])
          if any(d.process_index == me for d in mesh.devices[k].reshape(-1))}


def _site_global(x: np.ndarray, mesh, local: set[int]) -> jax.Array:
  """A global [S, H, ...] array from this process's full-shape host array, of which only the
  blocks of `local` sites are real (the others are never read: their devices are elsewhere)."""
  sharding = algorithm.site_batch_sharding(mesh, x)

  def piece(index):
    assert all(k in local for k in range(*index[0].indices(x.shape[0])))
    return x[index]
  return jax.make_array_from_callback(x.shape, sharding, piece)


def make_loss_fn(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                 kinds: dict[str, str]):
  """One site's loss on one local batch, `loss_fn(params, batch, key) -> scalar`: the sum over
  the batch's tasks of the trainer's task losses (`jmtl.train.step.task_losses`; dropout from
  `key`, label smoothing from `model.decoder.label_smoothing`), under `mesh.rules`."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  smoothing = float(config.model.decoder.label_smoothing)
  loss_of = step_lib._default_task_loss()  # noqa: SLF001

  def loss_fn(params, batch, key):
    with nnx.logical_axis_rules(rules):
      per_task, _ = step_lib.task_losses(graphdef, params, rest, batch, kinds, smoothing,
                                         nnx.Rngs(dropout=key), loss_of)
    return sum(per_task.values())
  return loss_fn


def param_groups(params: Any, task_names: list[str]) -> Any:
  """Per parameter leaf: 0 for the trunk, 1 + index of its task for a leaf under heads/<task>."""
  def group(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "heads" in names:
      i = names.index("heads")
      if i + 1 < len(names) and names[i + 1] in task_names:
        return 1 + task_names.index(names[i + 1])
    return 0
  return jax.tree_util.tree_map_with_path(group, params)


def site_seconds(sites: list[sites_lib.Site], site_bytes: list[int], local_steps: int,
                 step_time: float, slow: Any = None, up_bytes: list[int] | None = None
                 ) -> np.ndarray:
  """Simulated seconds of one round per site: 2 x latency + bytes x 8 / down_mbps (download) +
  H x step_time / speed x slow_k + up bytes x 8 / up_mbps (upload; `up_bytes` defaults to
  `site_bytes`); Mbit/s = 1e6 bits per second; `slow` [S]: straggler compute factors
  (`asynchronous.slowdown`; None = 1)."""
  slow = np.ones(len(sites)) if slow is None else np.asarray(slow, np.float64)
  up_bytes = site_bytes if up_bytes is None else up_bytes
  return np.array([2 * s.latency_ms / 1e3 + b * 8 / (s.down_mbps * 1e6)
                   + local_steps * step_time / s.speed * f + u * 8 / (s.up_mbps * 1e6)
                   for s, b, f, u in zip(sites, site_bytes, slow, up_bytes)])


def deadline_mask(sampled: np.ndarray, seconds: np.ndarray, deadline_s: float) -> np.ndarray:
  """The sampled sites whose simulated seconds are <= deadline_s (deadline 0 = no deadline)."""
  mask = np.asarray(sampled, np.float32).copy()
  if deadline_s > 0:
    mask[seconds > deadline_s] = 0
  return mask


def sample_participants(seed: int, round_index: int, n_sites: int, fraction: float
                        ) -> np.ndarray:
  """0/1 mask of max(1, round(fraction x S)) sites drawn without replacement, seeded by (seed,
  round); all ones when fraction = 1."""
  m = max(1, int(round(fraction * n_sites)))
  mask = np.zeros(n_sites, np.float32)
  if m >= n_sites:
    mask[:] = 1
    return mask
  rng = np.random.default_rng([int(seed), int(round_index), 0xFED])
  mask[rng.choice(n_sites, size=m, replace=False)] = 1
  return mask


def partition_records(config, tasks, sites, records):
  """({site: {task: train records}}, {site: {task: held-out records}}) by `fed.partition`."""
  train = {s.name: {} for s in sites}
  held = {s.name: {} for s in sites}
  fed = config.fed
  for task in tasks:
    recs = records[task.name]
    holders = [s for s in sites if task.name in s.tasks]
    labels = ([int(r["label"]) for r in recs] if task.kind == "classification" else None)
    shares = [s.share for s in holders] if any(s.share > 0 for s in holders) else None
    examples = [s.examples for s in holders] if any(s.examples > 0 for s in holders) else None
    try:
      kept, out = partition_lib.partition_task(
          len(recs), labels, method=fed.partition, n_sites=len(holders), shares=shares,
          examples=examples, alpha=fed.alpha, power=fed.power, minimum=fed.min_per_site,
          holdout_fraction=fed.holdout, seed=int(config.seed), task=task.name)
    except ValueError as e:
      raise config_lib.ConfigError(f"config keys 'fed.*': task {task.name!r}: {e}") from e
    for s, k, h in zip(holders, kept, out):
      if not len(k):
        raise config_lib.ConfigError(
            f"config keys 'fed.*': site {s.name!r} gets no training rows of task {task.name!r} "
            f"(raise fed.min_per_site or change the partition)")
      train[s.name][task.name] = [recs[i] for i in k]
      held[s.name][task.name] = [recs[i] for i in h]
  return train, held


def site_data_config(config, site: sites_lib.Site, data_dir: str = "") -> Any:
  """The `data` section site `site` reads its training rows with under fed.partition = "own":
  `config.data` with `dir` = `data_dir` (on Flower: the SuperNode's node config data-dir), else
  the site's `data_dir` field, else unchanged (data.dir / $JMTL_DATA_DIR of this process)."""
  cfg = copy.deepcopy(config.data)
  root = data_dir or site.data_dir
  if root:
    cfg.dir = root
  return cfg


def _own_where(site: sites_lib.Site, data_dir: str) -> str:
  return ("node config data-dir" if data_dir else
          "field 'data_dir'" if site.data_dir else "data.dir / $JMTL_DATA_DIR")


def check_own_files(config, site: sites_lib.Site, tasks, data_dir: str = "") -> None:
  """fed.partition = "own": ConfigError naming the site, the task and the path when the site's
  data root (`site_data_config`) lacks the training file of a task it holds."""
  data_cfg = site_data_config(config, site, data_dir)
  for t in tasks:
    if t.name not in site.tasks:
      continue
    missing = sources.check_task_files(t, data_cfg, ["train"])
    if missing:
      raise config_lib.ConfigError(
          f"site {site.name!r} (fed.partition = 'own', its data root from "
          f"{_own_where(site, data_dir)}): task {t.name!r} training file not found: "
          f"{missing[0]}")


def own_records(config, tasks, site: sites_lib.Site, data_dir: str = "") -> dict[str, list]:
  """fed.partition = "own": {task: records} of the whole training split of each task `site`
  holds, read from the site's own data root (`site_data_config`; `data.max_train_examples`
  applies to each site's file). ConfigError (`check_own_files`) for a missing file, for a
  file without rows, and for a malformed or unreadable file (the reader's `file:line: ...`
  prefixed with the site, its root and where the root came from)."""
  check_own_files(config, site, tasks, data_dir)
  data_cfg = site_data_config(config, site, data_dir)
  out = {}
  for t in tasks:
    if t.name in site.tasks:
      # Every site's file has the same relative name (glue/SST-2/train.tsv:7): a malformed one
      # is named by its site and root too, or the line would not say whose file it is.
      try:
        with train_loop._user_data_errors():  # noqa: SLF001
          out[t.name] = sources.load_records(t, "train", data_cfg)
      except (config_lib.ConfigError, OSError) as e:
        raise config_lib.ConfigError(
            f"site {site.name!r} (fed.partition = 'own', its data root "
            f"{sources.data_root(data_cfg)} from {_own_where(site, data_dir)}): task "
            f"{t.name!r} training file: {e}") from e
      if not out[t.name]:
        raise config_lib.ConfigError(
            f"site {site.name!r} (fed.partition = 'own'): task {t.name!r}: its training "
            f"file under {sources.data_root(data_cfg)} has no rows")
  return out


def own_split(config, site: sites_lib.Site, records: dict[str, list]
              ) -> tuple[dict[str, list], dict[str, list]]:
  """fed.partition = "own": (train, held-out) records per task of one site's own `records`:
  `partition.holdout` with fed.holdout, seeded by (`partition.task_seed(seed, task)`,
  crc32(site name)), so each site holds out from its own rows alone, the same in every process
  that reads them (a Flower SuperNode and the simulation)."""
  train, held = {}, {}
  for task, recs in records.items():
    rng = np.random.default_rng(partition_lib.task_seed(int(config.seed), task)
                                + [zlib.crc32(site.name.encode())])
    kept, out = partition_lib.holdout([np.arange(len(recs))], float(config.fed.holdout), rng)
    train[task] = [recs[i] for i in kept[0]]
    held[task] = [recs[i] for i in out[0]]
  return train, held


def own_partition(config, tasks, sites) -> tuple[dict, dict]:
  """fed.partition = "own" in one process that reads every site's root (the mesh simulation,
  `jmtl data`): ({site: {task: train records}}, {site: {task: held-out records}}) from
  `own_records` and `own_split`."""
  train, held = {}, {}
  for s in sites:
    train[s.name], held[s.name] = own_split(config, s, own_records(config, tasks, s))
  return train, held


def own_rows(config, names: list[str], sizes: dict[str, int]) -> dict[str, int]:
  """fed.partition = "own": one site's rows per task of a local batch from ITS OWN training
  sizes `sizes` {task it holds: rows}: `pipeline.rows_per_task(mixture_rates(data.*, sizes,
  total_steps = fed.rounds x fed.local_steps), data.batch_size)` over the tasks it holds (one
  task: all data.batch_size rows). Tasks it does not hold get no rows."""
  held = [t for t in names if t in sizes]
  if len(held) == 1:
    return {held[0]: int(config.data.batch_size)}
  rates = pipeline.mixture_rates(config.data, {t: sizes[t] for t in held},
                                 total_steps=int(config.fed.rounds) * int(config.fed.local_steps))
  return pipeline.rows_per_task(rates, int(config.data.batch_size))


def pad_rows(batch: dict, rows: int) -> dict:
  """One task's batch (arrays with a leading row axis) grown to `rows` rows by copies of its
  first row with example_weight 0 (no loss, no gradient: the task losses are example-weighted
  means, `jmtl.model.losses`); the mesh simulation's one batch shape for sites whose own rows
  per task differ (fed.partition = "own")."""
  n = len(batch["example_weight"])
  if n >= rows:
    return batch
  out = {k: np.concatenate([v, np.repeat(v[:1], rows - n, axis=0)]) for k, v in batch.items()}
  out["example_weight"][n:] = 0
  return out


def partition_table(config) -> str:
  """The per-site table of `jmtl data` for a config with `fed.sites`: rows per task (train /
  held-out) and, for classification tasks, train rows per label."""
  sites = sites_lib.sites_from_config(config)
  tasks = [task_registry.get_task(n) for n in config.tasks]
  if config.fed.partition == "own":  # each site's rows from its own data root
    train, held = own_partition(config, tasks, sites)
  else:
    with train_loop._user_data_errors():  # noqa: SLF001
      records = {t.name: sources.load_records(t, "train", config.data) for t in tasks}
    train, held = partition_records(config, tasks, sites, records)
  lines = [f"partition {config.fed.partition} (seed {config.seed}) over {len(sites)} sites:"]
  for s in sites:
    parts = []
    for t in tasks:
      if t.name not in train[s.name]:
        continue
      rows = train[s.name][t.name]
      text = f"{t.name} {len(rows)} (+{len(held[s.name][t.name])} held out)"
      if t.kind == "classification":
        counts = np.bincount([int(r["label"]) for r in rows], minlength=t.num_labels)
        names = t.label_names or tuple(str(i) for i in range(t.num_labels))
        text += " [" + ", ".join(f"{n} {c}" for n, c in zip(names, counts)) + "]"
      parts.append(text)
    root = (f" from {sources.data_root(site_data_config(config, s))}"
            if config.fed.partition == "own" else "")
    lines.append(f"  {s.name} ({s.cloud or '-'}){root}: " + "; ".join(parts))
  return "\n".join(lines)


def checkpoint_tree(server: algorithm.ServerState, clients: algorithm.ClientState) -> dict:
  """The state a checkpoint holds: server, and every site's client state (its compression
  residual only when error feedback is on)."""
  c = {k: v for k, v in clients._asdict().items() if v is not None}
  return {"server": server._asdict(), "clients": c}


def flower_checkpoint_tree(params: Any, opt_state: Any) -> dict:
  """The tree a Flower server checkpoint holds (`jmtl.federated.flower`): {"server": {"params",
  "opt_state"}}, the `server` part of `checkpoint_tree` (the sites' client states live on the
  SuperNodes, not in the server's checkpoint)."""
  return {"server": {"params": params, "opt_state": opt_state}}


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _append_line(p: epath.Path, row: dict) -> None:
  line = json.dumps(row, allow_nan=False, default=_json_default)
  if workdir_lib.is_local(p):
    try:
      with open(p, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    except OSError as e:
      raise OSError(e.errno, e.strerror, str(p)) from e
  else:
    old = p.read_text() if p.exists() else ""
    workdir_lib.write_text_atomic(p, old + line + "\n")


def _json_default(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  raise TypeError(f"not JSON: {type(v).__name__}")


def _clean(v: float) -> float | None:
  return float(v) if math.isfinite(float(v)) else None


def _truncate_rounds(p: epath.Path, last: int) -> None:
  """Keeps the lines of rounds <= `last` (a torn last line is dropped)."""
  if not p.exists():
    return
  kept = []
  for line in p.read_text().splitlines():
    try:
      if int(json.loads(line)["round"]) <= last:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      print(f"jmtl: warning: {p}: a torn line dropped", file=sys.stderr, flush=True)
  workdir_lib.write_text_atomic(p, "".join(line + "\n" for line in kept))


def federated(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
              ) -> dict[str, float]:
  """Runs `config`'s federated job in `workdir`, resuming from its latest checkpoint; returns
  the final evaluation (global + per-site held-out metrics).

  Call `jmtl.preflight.run(config, "federated", workdir)` first (the CLI does). Raises
  ConfigError (bad data, a partition leaving a site empty, a checkpoint of another run, the
  workdir in use), CheckpointError, SystemExit(128 + signal) after saving on SIGTERM/SIGINT.
  """
  wd = train_loop._workdir(workdir)  # noqa: SLF001  (one path on every process)
  with (train_loop._lock(wd, "federated"), workdir_lib.background_errors_to_log(wd),  # noqa: SLF001
        train_loop.StopRequest() as stop):
    return train_loop.run_closing(_federated, config, wd, stop)


def _federated(config, wd, stop, ckpt, closers) -> dict[str, float]:
  found = ckpt.read_latest_meta()
  # Refuse another run's checkpoint before any work or any write, decided by all processes.
  distributed.decide_together(
      lambda: found is not None and workdir_lib.check_config(found[1], config, workdir=wd,
                                                             step=found[0]),
      config_lib.ConfigError)

  fed = config.fed
  sites = sites_lib.sites_from_config(config)
  S, H, R = len(sites), int(fed.local_steps), int(fed.rounds)
  mesh = build_mesh(config, sites)
  # Several processes (multi-host): each reads and featurizes the data of its own sites only
  # (the sites with a device on this process); process 0 writes the run's files.
  multi, primary = distributed.multi_process(), distributed.is_primary()
  local = local_sites(mesh)
  tasks = [task_registry.get_task(name) for name in config.tasks]
  names = [t.name for t in tasks]
  kinds = {t.name: t.kind for t in tasks}
  tokenizer = train_loop._tokenizer(config, tasks, wd)  # noqa: SLF001
  client_tx, server_tx = build_optimizers(config)
  codec = compression.parse(fed.compress, fed.compress_block)
  dp = privacy.from_config(  # q = the fraction of sites sample_participants draws per round
      fed, float(sample_participants(0, 1, len(sites), float(fed.participation)).mean()))
  head_specs = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  state, graphdef, shardings = state_lib.create_train_state(
      config, head_specs, tokenizer.vocab_size, client_tx, mesh)
  is_async = fed.mode == "async"
  server, clients = algorithm.init(state.params, server_tx, client_tx, mesh,
                                   param_shardings=shardings.params, site_starts=is_async,
                                   error_feedback=codec.error_feedback)
  rest = state.rest
  groups = param_groups(server.params, names)
  holds = np.array([[1.0] + [float(t in s.tasks) for t in names] for s in sites], np.float32)

  # Bytes each way per participant: the float32 leaves it trains (trunk + its heads).
  # Up: each leaf's encoding under fed.compress (float32 when off).
  leaf_bytes = np.zeros(1 + len(names))
  leaf_up = np.zeros(1 + len(names))
  for g, x in zip(jax.tree.leaves(groups), jax.tree.leaves(server.params)):
    leaf_bytes[g] += x.size * 4  # received as float32
    leaf_up[g] += compression.leaf_bytes(codec, x.size)
  site_bytes = [int(leaf_bytes @ holds[k]) for k in range(S)]
  up_bytes = [int(leaf_up @ holds[k]) for k in range(S)]

  loss_fn = make_loss_fn(config, graphdef, rest, kinds)
  faults = faults_lib.from_config(config, [s.name for s in sites])
  round_fn = algorithm.make_round(
      loss_fn, client_tx, server_tx, mesh, local_steps=H, groups=groups,
      aggregator=fed.aggregator, temperature=float(fed.temperature),
      reset_client_state=fed.client_state == "reset", seed=int(config.seed),
      prox_mu=float(fed.prox_mu), trim=float(fed.trim), byzantine_f=int(fed.byzantine_f),
      krum_m=int(fed.krum_m), byzantine=bool(faults.byzantine),
      byzantine_scale=float(fed.faults.scale), backend=fed.backend,
      secure=secure_fixed_point(config), codec=codec, dp=dp)
  modes = faults.modes(S)

  # Data: each task's train split partitioned over the sites that hold it, or (fed.partition
  # = "own") each site's own files, its rows per task from its own sizes (`own_rows`; the
  # batches of sites with fewer rows are padded with zero-weight rows, `pad_rows`).
  own = fed.partition == "own"
  if own:
    site_train, site_held = own_partition(config, tasks, sites)
    fp = workdir_lib.fingerprint(
        config, data={f"{s.name}/{t}": workdir_lib.digest_records(r + site_held[s.name][t])
                      for s in sites for t, r in site_train[s.name].items()},
        tokenizer=workdir_lib.digest_text(tokenizer.backend.to_str()))
    site_rows = {s.name: own_rows(config, names, {t: len(r) + len(site_held[s.name][t])
                                                  for t, r in site_train[s.name].items()})
                 for s in sites}
    rows = {t: max(v[t] for v in site_rows.values() if t in v) for t in names}
  else:
    with train_loop._user_data_errors():  # noqa: SLF001
      records = {t.name: sources.load_records(t, "train", config.data) for t in tasks}
    fp = workdir_lib.fingerprint(
        config, data={n: workdir_lib.digest_records(r) for n, r in records.items()},
        tokenizer=workdir_lib.digest_text(tokenizer.backend.to_str()))
    site_train, site_held = partition_records(config, tasks, sites, records)
    sizes = {t: len(r) for t, r in records.items()}
    rates = pipeline.mixture_rates(config.data, sizes, total_steps=R * H)
    rows = (pipeline.rows_per_task(rates, config.data.batch_size) if len(names) > 1
            else {names[0]: int(config.data.batch_size)})
    site_rows = {s.name: rows for s in sites}
    del records
  iters: dict[str, dict[str, pipeline.TrainIterator]] = {}
  with train_loop._user_data_errors():  # noqa: SLF001
    def site_iterator(t, recs, n_rows=None):
      cfg = copy.deepcopy(config)
      cfg.data.batch_size, cfg.data.mixing, cfg.data.mixture = n_rows or rows[t.name], \
          "task_per_batch", "proportional"
      return pipeline.TrainIterator(cfg, [t], tokenizer, records={t.name: recs},
                                    fixed_length=multi)

    for k, s in enumerate(sites):
      iters[s.name] = {}
      for t in tasks:
        if t.name in site_train[s.name] and k in local:
          iters[s.name][t.name] = site_iterator(t, site_train[s.name][t.name],
                                                site_rows[s.name][t.name])
    # A task's zero-weight batch (same shape as its real ones): for sites without it or idle
    # (from a local site's stream, else from a few rows of a holder's, shapes being fixed).
    blank = {}
    for t in tasks:
      holder = next((s.name for s in sites if t.name in iters[s.name]), None)
      if holder is not None:
        stream = iters[holder][t.name]
      else:
        recs = next(site_train[s.name][t.name] for s in sites if t.name in site_train[s.name])
        stream = site_iterator(t, recs[:rows[t.name]])
      b = pad_rows(dict(stream.streams[t.name][0]), rows[t.name])
      b["example_weight"] = np.zeros_like(b["example_weight"])
      blank[t.name] = b
  examples = np.array([sum(len(v) for v in site_train[s.name].values()) for s in sites],
                      np.float32)

  global_sets = train_loop._eval_sets(config, tasks, tokenizer)  # noqa: SLF001
  held_sets: dict[str, list] = {}
  with train_loop._user_data_errors():  # noqa: SLF001
    for s in sites:
      held_sets[s.name] = []
      for t in tasks:
        recs = site_held[s.name].get(t.name) or []
        if recs:
          batches, meta_ = pipeline.eval_batches(t, recs, tokenizer, config)
          held_sets[s.name].append(evaluate_lib.EvalSet(t, recs, batches, meta_))
  predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)

  def check(step, meta):
    workdir_lib.check_config(meta, config, workdir=wd, step=step)
    workdir_lib.check_fingerprint(meta, fp, workdir=wd, step=step)

  meta: dict[str, Any] = {"val_metric": 0.0, "val_count": 0, "row": None,
                          "cost": {}, "step_time": 0.0}
  tree = checkpoint_tree(server, clients)
  tree_sh = jax.tree.map(lambda x: x.sharding, tree)
  restored = ckpt.restore_latest(checkpoint_lib.abstract_like(tree, tree_sh), check=check)
  start = 0
  if restored is not None:
    start, tree, data_state, saved = restored
    server = algorithm.ServerState(**tree["server"])
    clients = algorithm.ClientState(**tree["clients"])
    for s in sites:  # every site's position is saved; each process sets its own sites'
      for t, it in iters[s.name].items():
        it.set_state(data_state[s.name][t])
    if primary:
      workdir_lib.resume_warnings(saved, config, workdir=wd, step=start)
    saved.pop("fingerprint", None)
    meta.update(saved)
    if primary:
      print(f"resumed from checkpoint at round {start}", flush=True)
  del tree

  if primary:  # the workdir is this run's now; process 0 writes its files
    ckpt.remove_incomplete()
    workdir_lib.write_text_atomic(wd / "config.json", config_lib.to_json(config) + "\n")
    if not (wd / "tokenizer.json").exists():
      workdir_lib.write_text_atomic(wd / "tokenizer.json", tokenizer.backend.to_str())
  distributed.barrier("jmtl_federated_workdir_ready")
  ckpt.reload()
  # Resumed: TensorBoard hides the interrupted run's events after the checkpoint, as
  # `truncate_after` below drops its metrics.jsonl lines (the trainer does the same).
  writer = (writers.MetricWriter(wd, purge_step=start + 1 if start else None) if primary
            else writers.NullWriter())
  closers.append(writer.close)
  append_line = _append_line if primary else (lambda p, row: None)

  def is_eval(r: int) -> bool:
    return bool(fed.eval_every and r % fed.eval_every == 0) or r == R

  results_path = wd / train_loop.outputs_names(config.data.eval_split)[0]
  finished = _finished(wd / ROUNDS_FILE, results_path, start, R)
  # A checkpoint taken at an evaluation round holds that round's line (`row`), written only
  # after the evaluation: the resumed run evaluates it again (still an evaluation round) or
  # writes it as it is (not one under the resumed config, e.g. more fed.rounds).
  pending = bool(start) and meta.get("row") is not None and finished is None
  eval_again = pending and is_eval(start)
  # Round 0 (the initial model, as Flower's server evaluates it) is evaluated when periodic
  # evaluation is on and the run starts from scratch; a restart from scratch drops its lines.
  eval_zero = bool(fed.eval_every) and not start
  writer.truncate_after(start, eval_before=start if eval_again or eval_zero else None)
  if primary and finished is None:
    _truncate_rounds(wd / ROUNDS_FILE, start - 1 if pending or eval_zero else start)
  final: dict[str, float] = {}

  def data_state() -> dict:
    """Every site's data positions (gathered from the processes that hold them)."""
    mine = {s.name: {t: it.get_state() for t, it in iters[s.name].items()} for s in sites}
    if not multi:
      return mine
    out: dict[str, dict] = {s.name: {} for s in sites}
    for text in distributed.gather_text(json.dumps(mine)):
      for name, states in json.loads(text).items():
        out[name].update(states)
    return out

  def signal_agreed() -> int | None:
    """The stop signal: the local flag, or (several processes) its maximum over processes, a
    collective every process reaches at the same point, so all stop at the same round."""
    if multi:
      agreed[0] = max(agreed[0], distributed.agree_max(distributed.stop_code(stop.signal)))
      return (distributed.stop_origin(agreed[0]) or (None,))[0]
    return stop.signal

  agreed = [0]  # multi: the agreed `distributed.stop_code` (which process got which signal)

  def announce(signum: int, rest: str) -> None:
    distributed.announce_stop(agreed[0] if multi else distributed.stop_code(signum, 0),
                              stop.signal, rest)

  def save(r: int, row: dict | None) -> None:
    try:
      ckpt.save(r, checkpoint_tree(server, clients), data_state(),
                {**meta, "row": row, "fingerprint": fp})
    except CheckpointError:
      raise
    except OSError as e:
      raise CheckpointError(f"checkpoint save at round {r} failed: {e} ({ckpt.directory})") from e

  def evaluate(r: int, row: dict) -> None:
    nonlocal final
    view = state_lib.TrainState(step=jnp.int32(r), params=server.params, rest=rest,
                                opt_state=server.opt_state, rng=state.rng)
    out = train_loop._run_eval(config, global_sets, view, graphdef, predict, tokenizer, mesh,  # noqa: SLF001
                               should_stop=lambda: signal_agreed() is not None)
    if out is None:
      stop_now(r, signal_agreed())
    metrics, pred_rows = out
    for s in sites:
      site_out = train_loop._run_eval(config, held_sets[s.name], view, graphdef, predict,  # noqa: SLF001
                                      tokenizer, mesh)
      metrics.update({f"site/{s.name}/{k}": v for k, v in site_out[0].items()})
    writer.write(r, "eval", metrics)
    row.update({k: _clean(v) for k, v in metrics.items()})
    val = train_loop._val_metric(config, tasks, metrics)  # noqa: SLF001
    if math.isfinite(val):
      meta["val_metric"] = val
      meta["val_count"] += 1
    if r == R:
      final = metrics
      if primary:
        train_loop._write_outputs(wd, config.data.eval_split, metrics, pred_rows, r)  # noqa: SLF001

  def stop_now(r: int, signum: int) -> None:
    if not r:  # during the round-0 evaluation: no round done, nothing to save
      announce(signum, "stopped before round 1, nothing to save; exiting")
      raise SystemExit(128 + signum)
    ckpt.wait()
    if not ckpt.committed(r):
      raise CheckpointError(f"received signal {signum}, but the checkpoint at round {r} "
                            f"is not on disk (latest: {ckpt.latest_step()}) in {ckpt.directory}")
    announce(signum, f"saved checkpoint at round {r}, exiting")
    raise SystemExit(128 + signum)

  if finished is not None:
    if primary:
      print(f"the run already finished at round {R}; its final evaluation is in {results_path}",
            flush=True)
    return finished
  if pending:
    row = dict(meta["row"])
    if eval_again:
      evaluate(start, row)
    append_line(wd / ROUNDS_FILE, row)
  if eval_zero:
    row = {"round": 0}
    evaluate(0, row)
    append_line(wd / ROUNDS_FILE, row)
  progress = writers.Progress(R, start, config.train.progress if primary else "none")
  closers.append(progress.close)
  measured: list[float] = []
  if not fed.step_time_s and not meta.get("step_time"):
    # A measured step time is needed before round 1 (its deadline, stragglers and clock): the
    # compiled round runs twice on a copy of the state with zero-weight batches (the same work;
    # nothing is applied), the second run timed. Resumed runs reuse the checkpoint's value.
    warm = _stack([_stack([blank] * H) for _ in range(S)])
    if multi:
      warm = jax.tree.map(lambda x: _site_global(x, mesh, local), warm)
    copies = jax.tree.map(jnp.copy, (server, clients))
    ones = np.ones(S, np.float32)
    for _ in range(2):  # the first call compiles, the second is timed
      t0 = time.time()
      copies = round_fn(*copies, warm, examples, ones, holds, modes,
                        val_metric=meta["val_metric"], val_count=meta["val_count"])[:2]
      jax.block_until_ready(copies)
      took = time.time() - t0
    if multi:
      took = distributed.agree_max(int(took * 1e6)) / 1e6
    meta["step_time"] = took / H
    measured.append(took / H)
    del copies, warm
  seed, lag = int(config.seed), float(fed.faults.stragglers)
  slow_of = lambda r: asynchronous.slowdown(seed, r, S, lag,  # noqa: E731
                                            float(fed.faults.straggler_slowdown))
  if is_async and meta.get("queue") is None:  # asynchronous: every site starts a job at time 0
    step_time = float(fed.step_time_s) or float(meta.get("step_time") or 0.0)
    meta["queue"] = asynchronous.EventQueue.start(
        site_seconds(sites, site_bytes, H, step_time, slow_of(1), up_bytes),
        slow_of(1)).to_json()
  for r in range(start + 1, R + 1):
    step_time = float(fed.step_time_s) or float(meta.get("step_time") or 0.0)
    scale, extra_row = None, {}
    if is_async:  # FedBuff: the K earliest deliveries, staleness-scaled (module asynchronous)
      queue = asynchronous.EventQueue.from_json(meta["queue"])
      deliverers, t_step, tau = queue.buffer(int(fed.buffer_size))
      mask, scale = asynchronous.fedbuff_inputs(examples, deliverers, tau)
      sampled = mask
      held_s = np.array([t_step - queue.start_time[k] for k in range(S)])
      round_s = t_step - queue.clock
      lagging = [k for k in deliverers.tolist() if queue.slow[k] > 1]
      lost = np.zeros(S, bool)  # no random dropout in async runs (a config rule refuses it)
      extra_row = {"staleness": {sites[k].name: int(v) for k, v in zip(deliverers, tau)},
                   "sim_clock": t_step}
    else:
      sampled = sample_participants(seed, r, S, float(fed.participation))
      # Simulated seconds per sampled site; the deadline drops the late ones before the round.
      slow = slow_of(r)
      secs = site_seconds(sites, site_bytes, H, step_time, slow, up_bytes)
      mask = deadline_mask(sampled, secs, float(fed.deadline_s))
      lagging = [k for k in range(S) if sampled[k] and slow[k] > 1]
      mask, lost = faults_lib.dropout(mask, faults.dropout, seed, r)
    steps = []
    for h in range(H):
      per_site = []
      for k, s in enumerate(sites):
        per_site.append({t: (pad_rows(next(iters[s.name][t])[t], rows[t])
                             if mask[k] and t in iters[s.name] else blank[t]) for t in names})
      steps.append(per_site)
    site_batches = _stack([_stack([steps[h][k] for h in range(H)]) for k in range(S)])
    if multi:  # each process supplies the blocks of its own sites
      site_batches = jax.tree.map(lambda x: _site_global(x, mesh, local), site_batches)
    tokens = sum(train_loop._tokens(steps[h][k]) for h in range(H) for k in range(S)  # noqa: SLF001
                 if mask[k])
    t0 = time.time()
    server, clients, m = round_fn(server, clients, site_batches, examples, mask, holds, modes,
                                  scale=scale, val_metric=meta["val_metric"],
                                  val_count=meta["val_count"])
    m = distributed.to_host(m)
    took = time.time() - t0
    if multi:  # the simulated clock must not differ between processes
      took = distributed.agree_max(int(took * 1e6)) / 1e6
    tps = math.nan
    if r == start + 1:  # the first round of a process compiles: the ETA counts from here
      progress.start_clock(r)
    else:
      tps = tokens / max(took, 1e-9)
      measured.append(took / H)
      if not fed.step_time_s:
        meta["step_time"] = float(np.median(measured))
    part = [k for k in range(S) if mask[k]]
    if is_async:  # the deliverers restart from the new model; their next jobs aim at round r + 1
      step_time = float(fed.step_time_s) or float(meta.get("step_time") or 0.0)
      meta["queue"] = queue.restart(deliverers, t_step,
                                    site_seconds(sites, site_bytes, H, step_time, slow_of(r + 1),
                                                 up_bytes),
                                    slow_of(r + 1)).to_json()
    else:
      # A synchronous round lasts until its slowest participant has uploaded; when the deadline
      # cut a site off, the server waited until the deadline to know it.
      late = [k for k in range(S) if sampled[k] and fed.deadline_s and secs[k] > fed.deadline_s]
      round_s = float(max(secs[part])) if part else 0.0
      if late:
        round_s = max(round_s, float(fed.deadline_s))
      held_s = np.full(S, round_s)
      held_s[late] = float(fed.deadline_s)  # a late site computed until it was cut off
    cost = {s.cloud or s.name: 0.0 for s in sites}
    cost.update(meta.get("cost") or {})
    billed = part if is_async else sorted(set(part) | set(late))
    for k in billed:  # a site is held from its job's start to the server step that uses it
      s = sites[k]
      c = s.devices * float(held_s[k]) / 3600.0 * s.price_device_hour
      if k in part:  # only participants upload
        c += up_bytes[k] / 1e9 * s.price_egress_gb
      cost[s.cloud or s.name] = cost.get(s.cloud or s.name, 0.0) + c
    meta["cost"] = cost
    row = {"round": r, "sites": [sites[k].name for k in part],
           "dropped": [sites[k].name for k in range(S) if sampled[k] and not mask[k]],
           "dropout": [sites[k].name for k in range(S) if lost[k]],
           "byzantine": [sites[k].name for k in part if modes[k]],
           "applied": int(m["applied"]), "loss": _clean(m["loss"]) if part else None,
           "site_loss": {sites[k].name: _clean(m["site_loss"][k]) for k in part},
           "weights": {sites[k].name: _clean(m["weights"][k]) for k in part},
           "bytes_up": {**{sites[k].name: up_bytes[k] for k in part},
                        "total": sum(up_bytes[k] for k in part)},
           "bytes_down": {**{sites[k].name: site_bytes[k] for k in part},
                          "total": sum(site_bytes[k] for k in part)},
           "stragglers": [sites[k].name for k in lagging],
           "sim_seconds": float(round_s), **extra_row,
           "sim_cost": {c: v for c, v in sorted(cost.items())},
           "sim_cost_total": sum(cost.values())}
    if dp is not None:  # every round counts, also one whose sites were all dropped
      eps = privacy.epsilon(dp.noise_multiplier, dp.sampling_rate, r, dp.delta)
      row["dp_epsilon_rdp"], row["dp_epsilon_pld"] = _clean(eps[0]), _clean(eps[1])
    if not part:
      logging.warning("round %d: no site left after the deadline and dropout; round skipped", r)
    if not math.isfinite(float(m["loss"])) and part:
      raise NonFiniteError(f"non-finite loss at round {r} (site losses {row['site_loss']}); "
                           f"stopped; last checkpoint: {ckpt.latest_step() or 'none'} in "
                           f"{ckpt.directory}")
    if r % fed.log_every == 0 or r == R:
      line = {"train/loss": float(m["loss"]) if part else math.nan,
              "train/delta_norm": float(m["delta_norm"]), "train/tokens_per_s": tps}
      if "secagg_clipped" in m:  # values the secure sum's clipping changed, all participants
        line["train/secagg_clipped"] = float(m["secagg_clipped"])
      line.update({f"train/site/{sites[k].name}/loss": float(m["site_loss"][k]) for k in part})
      writer.write(r, "train", line)
      progress.update(r, float(m["loss"]) if part else math.nan, tps)
    signum = signal_agreed()
    stopping = signum is not None
    do_eval = is_eval(r)
    do_save = r % fed.checkpoint_every == 0 or do_eval or stopping
    if not do_eval:
      append_line(wd / ROUNDS_FILE, row)
    if do_save:
      save(r, row if do_eval else None)
    ckpt.check()
    if stopping:  # at an evaluation round, the resumed run evaluates and writes its line
      stop_now(r, signum)
    if do_eval:
      evaluate(r, row)
      append_line(wd / ROUNDS_FILE, row)
  if not final:  # shortened to its checkpoint's round, which was not an evaluation round then
    evaluate(R, {"round": R})  # that round's line is on file already
  return final


def _finished(rounds_path: epath.Path, results_path: epath.Path, start: int, R: int
              ) -> dict | None:
  """The final metrics when the run is complete (checkpoint at round R, its line the last of
  rounds.jsonl, eval.json of round R), else None."""
  if start != R or not rounds_path.exists() or not results_path.exists():
    return None
  try:
    lines = rounds_path.read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    results = json.loads(results_path.read_text())
  except (ValueError, OSError):
    return None
  if last.get("round") != R or results.get("step") != R:
    return None
  return {k: v for k, v in results.items() if k not in ("step", "split")}


def _changed_eval_keys(wd: epath.Path, config: ml_collections.ConfigDict) -> list[str]:
  """`eval.*` keys whose value differs from the run's `config.json` (`key old -> new`)."""
  path = wd / "config.json"
  if not path.exists():
    return []
  old = workdir_lib.flat_config(json.loads(path.read_text()))
  new = workdir_lib.flat_config(config)
  return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in sorted(new.items())
          if k.startswith("eval.") and old.get(k) != v]


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                     ) -> dict[str, float]:
  """`jmtl eval` on a federated workdir (`jmtl federated`'s, or a Flower server's with
  fed.backend = flower: its checkpoint holds the server state only, evaluated on every device
  of this host, `server_eval_mesh`, not the sites' mesh): the server parameters of the latest
  checkpoint on the global evaluation split (writes eval.json / predictions like the trainer's
  eval)."""
  wd = train_loop._workdir(workdir)  # noqa: SLF001
  with train_loop._lock(wd, "eval"), train_loop.StopRequest() as stop:  # noqa: SLF001
    ckpt = checkpoint_lib.Checkpointer(wd / "checkpoints", read_only=True)
    try:  # closed whatever happens (a refused checkpoint, a failed restore)
      found = ckpt.read_latest_meta()
      distributed.decide_together(  # a host that sees no checkpoint stops every process
          lambda: train_loop.check_found(found, config, wd, ckpt.directory),
          config_lib.ConfigError)
      flower = found[1].get("backend") == "flower"  # a Flower server's: the server state only
      mesh = (server_eval_mesh() if flower
              else build_mesh(config, sites_lib.sites_from_config(config)))
      tasks = [task_registry.get_task(name) for name in config.tasks]
      tokenizer = train_loop._tokenizer(config, tasks, wd)  # noqa: SLF001
      client_tx, server_tx = build_optimizers(config)
      head_specs = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
      state, graphdef, shardings = state_lib.create_train_state(
          config, head_specs, tokenizer.vocab_size, client_tx, mesh)
      server, clients = algorithm.init(
          state.params, server_tx, client_tx, mesh, param_shardings=shardings.params,
          site_starts=config.fed.mode == "async",
          error_feedback=compression.parse(config.fed.compress,
                                           config.fed.compress_block).error_feedback)
      tree = checkpoint_tree(server, clients)
      if flower:  # no client states (they are the sites')
        tree = flower_checkpoint_tree(server.params, server.opt_state)
      tree_sh = jax.tree.map(lambda x: x.sharding, tree)
      step, tree, _, _ = ckpt.restore_latest(checkpoint_lib.abstract_like(tree, tree_sh))
    finally:
      ckpt.close()
    view = state_lib.TrainState(step=jnp.int32(step), params=tree["server"]["params"],
                                rest=state.rest, opt_state=tree["server"]["opt_state"],
                                rng=state.rng)
    predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
    out = train_loop._run_eval(  # noqa: SLF001
        config, train_loop._eval_sets(config, tasks, tokenizer), view, graphdef, predict,  # noqa: SLF001
        tokenizer, mesh, should_stop=train_loop.eval_stop_check(stop))
    if out is None:
      train_loop.eval_stopped(stop)
    metrics, rows = out
    # The run's per-site held-out results of this step (`site/...`) are kept, not dropped:
    # this evaluation recomputes the global split only.
    results = wd / train_loop.outputs_names(config.data.eval_split)[0]
    kept = {}
    if results.exists():
      previous = json.loads(results.read_text())
      if previous.get("step") == step:
        kept = {k: v for k, v in previous.items() if k.startswith("site/")}
    changed = _changed_eval_keys(wd, config)
    if kept and changed:  # the run's site results were decoded otherwise: not mixed in
      print(f"jmtl: warning: eval.json keeps no site/... results: the run computed them with "
            f"other evaluation settings ({', '.join(changed)})", file=sys.stderr, flush=True)
      kept = {}
    if distributed.is_primary():
      train_loop._write_outputs(wd, config.data.eval_split, {**metrics, **kept}, rows,  # noqa: SLF001
                                step)
  return {"step": step, "split": config.data.eval_split, **metrics, **kept}
