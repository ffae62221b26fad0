"""Federated rounds across real processes on Flower's deployment engine (SuperLink + SuperNodes).

The mesh simulation (`jmtl.federated.algorithm.make_round`) runs every site inside one jitted
SPMD program. Here each site is its own process: a Flower SuperNode that runs `client_app`, and
the server is `server_app` run by the SuperLink. The numbers are the same code:

  site k (`client_app`, jitted on that process's own devices):
    receives x (float32 leaves) and the round r; key_k = fold_in(fold_in(key(seed), r), k)
    delta_k, c_k <- algorithm.make_site_update(...)(x, c_k, batches_k(r), key_k)
      (H local steps of the client optimizer, the function `make_round`'s sites call)
    c_k (its client optimizer state, DiLoCo's inner AdamW moments) stays on the site, in the
    SuperNode's per-run `Context.state`, committed only once the server applied the reply
    (`site_train`: a dropped reply leaves c_k as a mask-0 site of the simulation keeps it);
    it sends delta_k and n_k (its examples)
  server (`server_app`):
    m_k = 1 for the sites that replied within `round-timeout` seconds (a lost site is dropped
    from that round, the weights renormalise over the rest), w = aggregation.fedavg_weights(n, m)
    Delta = aggregation.grouped_mean(delta, 0, w, 1);  u, s <- server_tx.update(Delta, s, x);
    x <- x + u    (FedAvg: McMahan et al. 2017; DiLoCo: Douillard et al. 2023, arXiv
    2311.08105, Algorithm 1)
    With `Problem.aggregator` "dynamic" / "gradient" w is instead the simulation's
    `aggregation.dynamic_weights` (from the sites' reported L_k and the server's memory of
    each site's previous loss and last round) / `alignment_weights`; with a Byzantine-robust
    rule (median, trimmed_mean, krum) Delta is `robust.aggregate` of the [S, ...] stack, the
    simulation's call (`aggregate`); with `Problem.dp` (fed.dp.*) Delta is DP-FedAvg's noised
    sum of clipped updates over q S (`aggregate`; epsilon in rounds.jsonl); with the run
    config's `secure-aggregation` the rounds go through Flower's SecAgg+ (`serve_secagg`,
    FedAvg weights).

What a run computes is a `Problem` (initial parameters, loss, optimizers, each site's batches),
built in every process by the factory that the run config's `problem` names ("module:function",
called with the run config dict). Payloads are raw little-endian float32 bytes per leaf (Flower
`Array` with stype `RAW_STYPE`), so `bytes_up` / `bytes_down` in rounds.jsonl are the measured
payload bytes of the messages (4 bytes per value, the simulation's accounting), and `seconds` the
measured wall-clock of the round. With a codec (`Problem.codec`, `fed.compress`) site k sends
instead `compression.to_bytes` of the leaves it holds, encoded as the simulation's codec hook
encodes them (same keys, same error feedback; `encode_update`), and its top-k residual e_k
stays in its `Context.state` beside c_k, committed, as c_k, only once the server applied the
reply (`site_train`, `commit_pending`); the server decodes (`decode_update`) and aggregates
the decoded deltas, and `bytes_up` is that payload's length (`compression.leaf_bytes`).

Run config keys (Flower `[tool.flwr.app.config]`, overridable with `flwr run --run-config`):
  problem (str): "module:function" -> Problem;  workdir (str): where the server writes (one
  that holds a checkpoint of this run is resumed, see below);  rounds (int; 0 = the
  Problem's);  round-timeout (float, seconds);  wait-sites (float, seconds to wait for every
  site's SuperNode before the first round);  max-empty-rounds (int, default 3; 0 = never):
  the server stops the run after that many consecutive rounds without an applied reply
  (`serve`);  config, overrides (str; `encode_overrides`): `jmtl_problem`'s;
  secure-aggregation (bool, default false; fed.secure_aggregation): the rounds go through
  Flower's SecAgg+ workflow (`serve_secagg` in the ServerApp, `secaggplus_mod` in the
  ClientApp, `secagg_train`) instead of plain payloads;  secagg-max-weight (float > 0,
  default 1000; fed.flower.secagg_max_weight), secagg-clipping-range (float > 0, default 8,
  Flower's; fed.secagg.clipping_range), secagg-quantization-range (int, default 2**22;
  fed.secagg.quantization_range): the SecAgg+ workflow's max_weight, clipping_range and
  quantization_range (see `secagg_check`: a site whose scaled update would be clipped
  refuses, and the round stops with `applied` 0 and `error` in rounds.jsonl).
SuperNode node config: site (str): this SuperNode's site name (one of Problem.sites);
data-dir (str, optional): the site's own data root with fed.partition = "own" (`site_run_config`).

Files in `workdir` (written by the server process only, which holds the workdir's lock,
`jmtl.train.workdir.lock`, while it runs; lines appended by `jmtl federated`'s writer):
`flower.json` (the run config and sites), with a jmtl config `config.json` and
`tokenizer.json` (as `jmtl federated` writes them), `rounds.jsonl` (per round: `round`,
`sites` (those that replied), `dropped`, `applied`, `loss` (example-weighted L_k),
`site_loss`, `weights`, `bytes_up` / `bytes_down` per site and `total`, `seconds` (measured),
`site_seconds` (each site's measured local work), `errors` {node id: first line of the
error} when a SuperNode's ClientApp raised or the SuperLink answered for a node it lost (under
the node the message was sent to; also printed on the server's stderr), `timed_out` (the sites,
or "node <id>" for a node not yet heard from, whose reply did not come within round-timeout;
also on stderr; `bytes_down`'s `total` counts every message sent, theirs included),
`dp_epsilon_rdp` / `dp_epsilon_pld` with fed.dp.* (`dp_epsilon`), and `<task>/<metric>` at
evaluation rounds, with `site/<name>/<task>/<metric>` from the sites' held-out rows and
`site_eval_missing` / `site_eval_errors` / `site_eval_bytes_down` / `site_eval_seconds`, see
below), `checkpoints/<round>/` (jmtl's `Checkpointer`, the Orbax checkpoints of `jmtl
federated`: written to a temporary directory and renamed, keep-N, meta with the run's
fingerprint and, for aggregator "dynamic", each site's previous loss and last round
(`site_memory`); the tree is `loop.flower_checkpoint_tree`: the server parameters and optimizer
state), and
with a jmtl config `eval.json` (written after the last round's checkpoint and line: the last round's evaluation, `train.loop._run_eval` as in
`jmtl federated`; round 0 and every fed.eval_every rounds go into rounds.jsonl).

Per-site held-out evaluation (`Problem.site_evaluate`; a jmtl config: fed.holdout > 0, as
`jmtl federated` evaluates each site): the server cannot read a site's rows, so at each
evaluation round (round 0 with fed.eval_every, every fed.eval_every rounds, the last) it sends
every connected node an evaluate message (Flower `MessageType.EVALUATE`: the parameters it
evaluates as raw float32 leaves, and the round), each site's ClientApp evaluates them on its
own held-out rows (`site_evaluate`, `train.loop._run_eval` as in the simulation) and replies
its metrics, plain numbers; the server writes them as `site/<name>/<task>/<metric>` into the
round's line and (last round) eval.json, the simulation's keys (`evaluate_sites`). Every site
is asked, those not sampled for training too; a site without a reply within `round-timeout`
(gone, or its ClientApp raised) has no metrics and is listed in the line's
`site_eval_missing`. The evaluate messages are plain in a SecAgg+ run too: the server sends
the parameters to every site anyway, and each site's held-out metrics are revealed to the
server, as in the simulation.

Resume: a server started on a workdir with a checkpoint continues from its latest complete one
(only a checkpoint that exists: `Problem.checkpoint_every`, fed.checkpoint_every rounds, at
evaluation rounds and the last; a run stopped before its first save starts at round 1)
(server parameters, server optimizer state, the round; the lines of rounds.jsonl after it are
dropped, its own line restored from the checkpoint's meta when a kill came between the two;
a finished run submitted again writes eval.json again, which a kill after the last line can
have left out); a
checkpoint of another run (a simulation's, another config's keys or vocabulary, another run
config) is refused in one line. The sites' client optimizer states are NOT in the server's
checkpoint: each lives in its SuperNode's per-run `Context.state`, so a new run (the resumed
server is a new Flower run) and a restarted SuperNode start it again from
`client_tx.init(x)` at the server parameters they receive, as `fed.client_state = "reset"`
does for that round. With FedAvg (client SGD without momentum, stateless) nothing is lost: the
resumed rounds equal the uninterrupted ones. With DiLoCo the inner AdamW moments restart (the
rounds after the restart differ from an uninterrupted run's; the server's Nesterov momentum is
kept). A server restart within a run is not possible in Flower: the run ends with its
ServerApp.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl.federated import aggregation
from jmtl.federated import algorithm
from jmtl.federated import compression
from jmtl.federated import privacy

RAW_STYPE = "raw.le"  # Array.data = the leaf's values, little-endian, C order, no header
CODEC_STYPE = "jmtl.compress"  # Array.data = `compression.to_bytes` of the leaves a site sends


@dataclasses.dataclass
class Problem:
  """What a Flower run computes; every process builds the same one from the run config.

  `sites`: site names (index k = position); `params`: initial server parameters (a pytree of
  float32 arrays); `loss_fn(params, batch, key) -> scalar`; `client_tx` / `server_tx`: optax
  transformations (`jmtl.optim.build`); `batches(k, r) -> (tree of [H, ...] arrays, n_k)`: site
  k's local batches of round r and its example count (FedAvg weight); `seed`: the round keys';
  `groups`: a tree like the parameters of ints (0 = trunk, g >= 1 = task g's head; None = all
  0) and `holds` [S, G] 0/1 (site k holds group g; None = ones): the grouped mean of
  `aggregation.grouped_mean` (a head averages over its holders only); `rounds`: the rounds a run
  config without `rounds` (or with 0) runs; `prox_mu`, `reset_client_state`: as in
  `algorithm.make_site_update`.

  What the server does with its workdir: a checkpoint (`jmtl.train.checkpoint.Checkpointer`,
  keeping `keep_checkpoints`) every `checkpoint_every` rounds, at evaluation rounds and at the
  last; `config` (a jmtl ConfigDict, or None) and `fingerprint` (`workdir.fingerprint`'s
  config / tokenizer entries; None = the run config's) decide which checkpoints are this run's;
  `codec`: the sites' uplink compression (`compression.parse` of `fed.compress`; None or a
  disabled Codec = raw float32 leaves); `aggregator`: "fedavg", "dynamic" or "gradient" (the
  weighted rules of `jmtl.federated.aggregation`, with `temperature`: fed.temperature) or a
  Byzantine-robust rule of `jmtl.federated.robust.RULES` (median, trimmed_mean with `trim`,
  krum with `byzantine_f`, `krum_m`: fed.aggregator, fed.trim, fed.byzantine_f, fed.krum_m),
  applied by `aggregate`; `dp`: DP-FedAvg (`jmtl.federated.privacy.DPConfig` of fed.dp.*, its
  sampling rate m / S of `participation`; None = off), applied by `aggregate` on the server
  (central DP: the server sees each update, clips it, and adds the noise); `participation`
  (fed.participation): each round the server samples m = max(1, round(participation S)) sites
  with the simulation's draw (`loop.sample_participants(seed, round, S, participation)`), and
  only those train (`_round`, `site_train`). `mode` (fed.mode): "sync" (rounds, `serve`) or
  "async" (FedBuff with a buffer of `buffer_size` replies, fed.buffer_size:
  `jmtl.federated.flower_async.serve_async`).
  `files` {name: text} are written into the workdir when the server starts (config.json,
  tokenizer.json); `evaluate(params, opt_state, round) -> (metrics {"<task>/<metric>": float},
  prediction rows per task)` (None = no evaluation) runs every `eval_every` rounds (0 = only
  the last) and at the last round, whose results `write_outputs(workdir, metrics, rows, round)`
  writes (eval.json).
  `site_evaluate(params, k, round) -> {"<task>/<metric>": float}` (None = no per-site
  evaluation): site k's metrics of the server parameters on its own held-out rows, run AT the
  site (`site_evaluate` below, the ClientApp's evaluate handler) at the server's evaluation
  rounds; the server writes them as `site/<name>/<task>/<metric>` (`evaluate_sites`).
  """

  sites: tuple[str, ...]
  params: Any
  loss_fn: algorithm.LossFn
  client_tx: optax.GradientTransformation
  server_tx: optax.GradientTransformation
  local_steps: int
  batches: Callable[[int, int], tuple[Any, float]]
  seed: int = 0
  groups: Any = None
  holds: Any = None
  rounds: int = 1
  prox_mu: float = 0.0
  reset_client_state: bool = False
  checkpoint_every: int = 1
  keep_checkpoints: int = 1
  config: Any = None
  fingerprint: dict | None = None
  files: dict = dataclasses.field(default_factory=dict)
  evaluate: Callable[[Any, Any, int], tuple[dict, dict]] | None = None
  eval_every: int = 0
  write_outputs: Callable[[str, dict, dict, int], None] | None = None
  codec: compression.Codec | None = None
  aggregator: str = "fedavg"
  temperature: float = 1.0
  dp: Any = None  # privacy.DPConfig (fed.dp.*) or None
  participation: float = 1.0
  trim: float = 0.1
  byzantine_f: int = 0
  krum_m: int = 0
  mode: str = "sync"
  buffer_size: int = 1
  site_evaluate: Callable[[Any, int, int], dict] | None = None


def load_problem(run_config: dict) -> Problem:
  """The Problem of `run_config["problem"]` ("module:function", called with the run config).
  ValueError for a malformed spec or a factory that does not return a Problem."""
  spec = str(run_config.get("problem", ""))
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"run config 'problem' must be 'module:function', got {spec!r}")
  problem = getattr(importlib.import_module(module), name)(dict(run_config))
  if not isinstance(problem, Problem):
    raise ValueError(f"run config 'problem' {spec!r} returned {type(problem).__name__}, "
                     f"not a jmtl.federated.flower.Problem")
  return problem


SITE_DATA_DIR = "site-data-dir"  # run config key the ClientApp adds: node config data-dir


def site_run_config(context: Any) -> dict:
  """The run config a site's ClientApp builds its Problem with: Flower's run config plus
  SITE_DATA_DIR = the SuperNode's node config `data-dir` ('' when not given), the site's own
  data root under fed.partition = "own" (`flower-supernode --node-config "site='east'
  data-dir='/data/east'"`)."""
  return {**dict(context.run_config),
          SITE_DATA_DIR: str(context.node_config.get("data-dir", ""))}


def own_site_data(config: Any, tasks: list, site: Any, data_dir: str) -> dict:
  """fed.partition = "own" at one site: {"train": {site name: {task: train records}}, "held":
  {site name: {task: held-out records}}, "rows": {task: rows per batch}} from the site's own
  files only (`loop.own_records` under `data_dir`,
  else its `data_dir` field, else data.dir / $JMTL_DATA_DIR; `loop.own_split` holds out
  fed.holdout of them; `loop.own_rows` from its own sizes), as the mesh simulation computes
  them for that site. ConfigError naming site, task and path for a missing training file."""
  from jmtl.federated import loop  # noqa: PLC0415
  names = [t.name for t in tasks]
  records = loop.own_records(config, tasks, site, data_dir)
  train, held = loop.own_split(config, site, records)
  return {"train": {site.name: train}, "held": {site.name: held},
          "rows": loop.own_rows(config, names, {t: len(r) for t, r in records.items()})}


def jmtl_problem(run_config: dict) -> Problem:
  """The Problem of a jmtl federated config: run config `config` (a jmtl config file, the same
  file on every machine) and `overrides` ("--config.KEY=VALUE ..." separated by spaces).

  The same pieces as `jmtl federated` (`jmtl.federated.loop`): `fed.sites`, the model of
  `jmtl.train.state.create_train_state` (seeded by `seed`), `loop.make_loss_fn` (the trainer's
  task losses), `loop.build_optimizers` (`fed.client_*` / `fed.server_*` through
  `jmtl.optim.build`), `loop.param_groups` and each site's held tasks, the tokenizer
  (`data.tokenizer`, else trained on the tasks' train text: deterministic, the same on every
  machine), `loop.partition_records` (`fed.partition`, seeded) and one grain `TrainIterator` per
  (site, task) with `loop`'s rows per task; a site's round r reads batches r*H .. r*H + H - 1 of
  its streams (a task it does not hold: its rows with example_weight 0). Data is read on first
  use (the server never reads it). ConfigError for a bad config, as `jmtl federated`.

  fed.partition = "own" (`own_site_data`): site k reads only the training files of its own
  data root (the run config's SITE_DATA_DIR, which the ClientApp sets from the SuperNode's node
  config `data-dir`; else the site's `data_dir` field; else data.dir / $JMTL_DATA_DIR), all
  their rows less its fed.holdout, n_k = that count, rows per task from its own sizes; a task
  it does not hold is left out of its batches (no rows: nothing to read it from). The tokenizer
  is data.tokenizer's file (a config rule); the server reads the eval split only.
  """
  from jmtl import cli  # noqa: PLC0415
  from jmtl import config as config_lib  # noqa: PLC0415
  from jmtl import tasks as task_registry  # noqa: PLC0415
  from jmtl.data import pipeline, sources  # noqa: PLC0415
  from jmtl.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  from jmtl.federated import loop  # noqa: PLC0415
  from jmtl.federated import sites as sites_lib  # noqa: PLC0415
  from jmtl.model.multitask import HeadSpec  # noqa: PLC0415
  from jmtl.parallel import mesh as mesh_lib  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415
  from jmtl.train import evaluate as evaluate_lib  # noqa: PLC0415
  from jmtl.train import loop as train_loop  # noqa: PLC0415
  from jmtl.train import state as state_lib  # noqa: PLC0415
  from jmtl.train import step as step_lib  # noqa: PLC0415
  from jmtl.train import workdir as workdir_lib  # noqa: PLC0415

  config = config_lib.complete(config_lib.load_config_file(str(run_config["config"])))
  cli.apply_overrides(config, decode_overrides(str(run_config.get("overrides", ""))))
  # fed.partition = "own": a site process reads only its own training files (checked when it
  # reads them, naming site, task and path), so its data root need not hold any other file.
  own_files = config.fed.partition == "own"
  config = config_lib.validate(config,
                               check_files=not (own_files and SITE_DATA_DIR in run_config))
  sites = sites_lib.sites_from_config(config)
  tasks = [task_registry.get_task(n) for n in config.tasks]
  names = [t.name for t in tasks]
  kinds = {t.name: t.kind for t in tasks}
  H, R = int(config.fed.local_steps), int(config.fed.rounds)
  tokenizer = tokenizer_lib.build_tokenizer(config, tasks, None)
  client_tx, server_tx = loop.build_optimizers(config)
  mesh = mesh_lib.make_site_mesh(config.mesh, 1, sites[0].devices)
  head_specs = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  state, graphdef, shardings = state_lib.create_train_state(
      config, head_specs, tokenizer.vocab_size, client_tx, mesh)
  params = jax.device_get(state.params)
  holds = np.array([[1.0] + [float(t in s.tasks) for t in names] for s in sites], np.float32)
  data: dict[str, Any] = {}

  def load():
    records = {t.name: sources.load_records(t, "train", config.data) for t in tasks}
    train, held = loop.partition_records(config, tasks, sites, records)
    sizes = {t: len(r) for t, r in records.items()}
    rates = pipeline.mixture_rates(config.data, sizes, total_steps=R * H)
    rows = (pipeline.rows_per_task(rates, config.data.batch_size) if len(names) > 1
            else {names[0]: int(config.data.batch_size)})
    data.update(train=train, held=held, rows=rows)

  def load_own(k: int):  # fed.partition = "own": site k's own files only (`own_site_data`)
    data.update(own_site_data(config, tasks, sites[k], str(run_config.get(SITE_DATA_DIR, ""))))

  def stream(t, recs):
    cfg = copy.deepcopy(config)
    cfg.data.batch_size, cfg.data.mixing, cfg.data.mixture = data["rows"][t.name], \
        "task_per_batch", "proportional"
    return pipeline.TrainIterator(cfg, [t], tokenizer, records={t.name: recs})

  def batches(k: int, r: int):
    if not data:
      load_own(k) if own_files else load()
    own = data["train"][sites[k].name]
    steps = []
    iters = {t.name: stream(t, own[t.name]) for t in tasks if t.name in own}
    for _ in range(r * H):  # this round's place in the site's streams
      for it in iters.values():
        next(it)
    blank = {}
    for t in tasks:
      if t.name not in iters and not own_files:
        holder = next(s.name for s in sites if t.name in data["train"][s.name])
        b = dict(stream(t, data["train"][holder][t.name][:data["rows"][t.name]])
                 .streams[t.name][0])
        b["example_weight"] = np.zeros_like(b["example_weight"])
        blank[t.name] = b
    for _ in range(H):
      steps.append({t.name: (next(iters[t.name])[t.name] if t.name in iters else blank[t.name])
                    for t in tasks if t.name in iters or t.name in blank})
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *steps)
    return stacked, float(sum(len(v) for v in own.values()))

  def evaluate(params, opt_state, r: int):
    """The server model on the tasks' data.eval_split: `train.loop._run_eval`, the call
    `jmtl federated` makes (`loop._federated`'s evaluate) on a TrainState view of the server."""
    if "eval" not in data:
      data["eval"] = (train_loop._eval_sets(config, tasks, tokenizer),  # noqa: SLF001
                      step_lib.make_predict_fn(graphdef, config, shardings, mesh))
    sets, predict = data["eval"]
    view = state_lib.TrainState(step=jnp.int32(r), params=params, rest=state.rest,
                                opt_state=opt_state, rng=state.rng)
    return train_loop._run_eval(config, sets, view, graphdef, predict, tokenizer, mesh)  # noqa: SLF001

  def site_evaluate(params, k: int, r: int) -> dict:
    """Site k's held-out rows (`loop.partition_records`, fed.holdout) evaluated at `params`:
    `train.loop._run_eval`, the call `jmtl federated` makes per site (`loop._federated`'s
    evaluate); {} when the site holds out no row."""
    if "held" not in data:  # under "own": the site's own held-out rows, never a pooled split
      load_own(k) if own_files else load()
    if ("held", k) not in data:
      sets = []
      with train_loop._user_data_errors():  # noqa: SLF001
        for t in tasks:
          recs = data["held"][sites[k].name].get(t.name) or []
          if recs:
            batches_, meta_ = pipeline.eval_batches(t, recs, tokenizer, config)
            sets.append(evaluate_lib.EvalSet(t, recs, batches_, meta_))
      data[("held", k)] = sets
    if "predict" not in data:
      data["predict"] = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
    if not data[("held", k)]:
      return {}
    view = state_lib.TrainState(step=jnp.int32(r), params=params, rest=state.rest,
                                opt_state=None, rng=state.rng)
    return train_loop._run_eval(config, data[("held", k)], view, graphdef,  # noqa: SLF001
                                data["predict"], tokenizer, mesh)[0]

  def write_outputs(workdir: str, metrics: dict, rows: dict, r: int) -> None:
    train_loop._write_outputs(epath.Path(workdir), config.data.eval_split, metrics, rows, r)  # noqa: SLF001

  vocab = tokenizer.backend.to_str()
  return Problem(sites=tuple(s.name for s in sites), params=params,
                 loss_fn=loop.make_loss_fn(config, graphdef, state.rest, kinds),
                 client_tx=client_tx, server_tx=server_tx, local_steps=H, batches=batches,
                 seed=int(config.seed), groups=loop.param_groups(params, names), holds=holds,
                 rounds=R, prox_mu=float(config.fed.prox_mu),
                 reset_client_state=config.fed.client_state == "reset",
                 checkpoint_every=int(config.fed.checkpoint_every),
                 keep_checkpoints=int(config.train.keep_checkpoints), config=config,
                 fingerprint={"config": workdir_lib.config_fingerprint(config),
                              "tokenizer": workdir_lib.digest_text(vocab), "steps": R},
                 files={"config.json": config_lib.to_json(config) + "\n",
                        tokenizer_lib.TOKENIZER_FILE: vocab},
                 evaluate=evaluate, eval_every=int(config.fed.eval_every),
                 write_outputs=write_outputs,
                 codec=compression.parse(config.fed.compress, config.fed.compress_block),
                 aggregator=str(config.fed.aggregator),
                 temperature=float(config.fed.temperature), trim=float(config.fed.trim),
                 dp=privacy.from_config(config.fed, float(loop.sample_participants(
                     0, 1, len(sites), float(config.fed.participation)).mean())),
                 participation=float(config.fed.participation),
                 byzantine_f=int(config.fed.byzantine_f), krum_m=int(config.fed.krum_m),
                 mode=str(config.fed.mode), buffer_size=int(config.fed.buffer_size),
                 site_evaluate=site_evaluate if float(config.fed.holdout) > 0 else None)


# ---------------------------------------------------------------- payloads (pytree <-> bytes)

def _flat(tree: Any) -> list[tuple[str, np.ndarray]]:
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def to_record(tree: Any):
  """A Flower ArrayRecord of `tree`'s leaves keyed by their key paths, each leaf's raw
  little-endian bytes (no header: `payload_bytes` = sum of itemsize x size)."""
  from flwr.app import Array, ArrayRecord  # noqa: PLC0415  (the `flower` extra)
  arrays = {}
  for key, x in _flat(tree):
    x = np.ascontiguousarray(x, x.dtype.newbyteorder("<"))
    arrays[key] = Array(dtype=x.dtype.str, shape=tuple(x.shape), stype=RAW_STYPE,
                        data=x.tobytes())
  return ArrayRecord(array_dict=arrays)


def from_record(record: Any, like: Any) -> Any:
  """The pytree shaped like `like` from `to_record`'s ArrayRecord; ValueError when a leaf is
  missing or its dtype / shape differ from `like`'s."""
  leaves = []
  for key, x in _flat(like):
    if key not in record:
      raise ValueError(f"payload has no leaf {key}")
    a = record[key]
    # (Flower's wire format sends a 0-d leaf as shape (1,): sizes, not shapes, are compared.)
    if (a.stype != RAW_STYPE or np.dtype(a.dtype) != x.dtype or len(a.data) != x.nbytes
        or int(np.prod(a.shape)) != x.size):
      raise ValueError(f"payload leaf {key}: {a.stype} {a.dtype} {tuple(a.shape)}, expected "
                       f"{RAW_STYPE} {x.dtype.str} {x.shape}")
    leaves.append(np.frombuffer(a.data, np.dtype(a.dtype)).reshape(x.shape))
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def payload_bytes(record: Any) -> int:
  """Bytes of a payload's values (the measured size of what `to_record` put on the wire)."""
  return sum(len(a.data) for a in record.values())


# ---------------------------------------------------------------- compressed payloads

def codec_of(problem: Problem) -> compression.Codec | None:
  """The Problem's codec when it compresses, else None (raw float32 leaves)."""
  codec = problem.codec
  return codec if codec is not None and codec.enabled else None


def sent_leaves(problem: Problem, k: int) -> list[float]:
  """Per parameter leaf (tree order) 1.0 when site k sends it (it holds the leaf's group:
  `Problem.holds[k, groups]`), else 0.0; the simulation's per-site `sent` flags."""
  leaves = jax.tree.leaves(problem.params)
  groups = ([0] * len(leaves) if problem.groups is None
            else [int(g) for g in jax.tree.leaves(problem.groups)])
  holds = (np.ones((len(problem.sites), 1), np.float32) if problem.holds is None
           else np.asarray(problem.holds, np.float32))
  return [float(holds[k, g]) for g in groups]


@functools.partial(jax.jit, static_argnums=0)
def _encode_leaves(codec: compression.Codec, delta: Any, residual: Any, key: jax.Array,
                   sent: list) -> tuple[list, Any]:
  """`compression.apply`'s per-leaf steps, returning the encodings instead of the decoded
  update: leaf i: x = (delta_i + e_i) s_i, enc_i = encode(x, fold_in(key, i)), and with error
  feedback e_i <- x - decode(enc_i) s_i (the site takes part)."""
  leaves, treedef = jax.tree.flatten(delta)
  res = jax.tree.leaves(residual) if residual is not None else [None] * len(leaves)
  encs, new_res = [], []
  for i, (d, e, s) in enumerate(zip(leaves, res, sent)):
    x = (d + e if e is not None else d) * s
    enc = compression.encode(codec, x.reshape(-1), jax.random.fold_in(key, i))
    encs.append(enc)
    if e is not None:
      new_res.append(x - compression.decode(codec, enc, x.size).reshape(x.shape) * s)
  return encs, (jax.tree.unflatten(treedef, new_res) if residual is not None else None)


def encode_update(problem: Problem, k: int, r: int, delta: Any, residual: Any
                  ) -> tuple[Any, Any]:
  """Site k's round-r update as the simulation compresses it (`algorithm.make_round`'s codec
  hook: `compression.apply` with key fold_in(site_key(key(seed), r, k), _CODEC_KEY), leaf i
  with fold_in(that, i)), serialised: an ArrayRecord holding one Array (stype CODEC_STYPE,
  dtype uint8) whose data is `compression.to_bytes` of the leaves the site holds, in tree order
  (exactly sum of `compression.leaf_bytes`, the simulation's `bytes_up`). `residual`: the
  site's error-feedback tree (float32 like the parameters; None without top-k). Returns
  (record, new residual)."""
  from flwr.app import Array, ArrayRecord  # noqa: PLC0415
  codec = codec_of(problem)
  sent = sent_leaves(problem, k)
  key = jax.random.fold_in(algorithm.site_key(jax.random.key(int(problem.seed)), r, k),
                           algorithm._CODEC_KEY)  # noqa: SLF001
  delta = jax.tree.map(lambda x: np.asarray(x, np.float32), delta)
  encs, residual = jax.device_get(_encode_leaves(
      codec, delta, residual, key, [np.float32(f) for f in sent]))
  leaves = jax.tree.leaves(delta)
  chosen = [i for i, f in enumerate(sent) if f]
  data = compression.to_bytes(codec, [encs[i] for i in chosen], [leaves[i].size for i in chosen])
  record = ArrayRecord(array_dict={"payload": Array(
      dtype="|u1", shape=(len(data),), stype=CODEC_STYPE, data=data)})
  return record, residual


def decode_update(problem: Problem, k: int, record: Any, like: Any) -> Any:
  """The float32 update tree (shaped like `like`) of site k's `encode_update` record: the
  leaves it sent decoded (`compression.from_bytes`, `decode_host`), the others 0 (as the
  simulation's unsent leaves). ValueError for a payload of another stype or length."""
  codec = codec_of(problem)
  if "payload" not in record or record["payload"].stype != CODEC_STYPE:
    raise ValueError(f"site {problem.sites[k]!r} sent no {CODEC_STYPE} payload")
  leaves, treedef = jax.tree.flatten(like)
  sent = sent_leaves(problem, k)
  chosen = [i for i, f in enumerate(sent) if f]
  encs = compression.from_bytes(codec, record["payload"].data,
                                [int(np.size(leaves[i])) for i in chosen])
  out = [np.zeros(np.shape(x), np.float32) for x in leaves]
  for i, enc in zip(chosen, encs):
    out[i] = compression.decode_host(codec, enc, int(np.size(leaves[i]))).reshape(
        np.shape(leaves[i]))
  return jax.tree.unflatten(treedef, out)


def site_reply(problem: Problem, update: Callable, params: Any, opt: Any, residual: Any,
               k: int, r: int) -> tuple[Any, Any, Any, dict]:
  """Site k's round r as its ClientApp runs it: `site_round`, then its update as a payload
  record (raw float32 leaves, `to_record`, or with a codec `encode_update`). `residual`: its
  error-feedback tree (None = zeros, or no codec / no top-k). Returns (payload record, new
  client state, new residual (None without error feedback), metrics)."""
  delta, opt1, metrics = site_round(problem, update, params, opt, k, r)
  codec = codec_of(problem)
  if codec is None:
    return to_record(delta), opt1, None, metrics
  if codec.error_feedback and residual is None:
    residual = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), params)
  record, residual = encode_update(problem, k, r, delta,
                                   residual if codec.error_feedback else None)
  return record, opt1, residual, metrics


# ---------------------------------------------------------------- the site (ClientApp)

_SITES: dict[tuple, Any] = {}  # per process: (run id, site) -> (problem, jitted update, like)


def _site(run_id: int, run_config: dict, site: str):
  key = (run_id, site)
  if key not in _SITES:
    problem = load_problem(run_config)
    if site not in problem.sites:
      raise ValueError(f"node config 'site' = {site!r} is not one of {list(problem.sites)}")
    update = algorithm.make_site_update(problem.loss_fn, problem.client_tx,
                                        local_steps=problem.local_steps,
                                        prox_mu=problem.prox_mu,
                                        reset_client_state=problem.reset_client_state)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), problem.params)
    opt_like = jax.tree.map(np.asarray, problem.client_tx.init(params))
    _SITES[key] = (problem, jax.jit(update), params, opt_like)
  return _SITES[key]


def site_round(problem: Problem, update: Callable, params: Any, opt: Any, k: int, r: int
               ) -> tuple[Any, Any, dict]:
  """Site k's round r: its batches, the shared `make_site_update` function (jitted), its key
  fold_in(fold_in(key(seed), r), k). Returns (delta, new client state, metrics: examples,
  site_loss (loss before any local step), train_loss (mean over the H steps), seconds)."""
  t0 = time.perf_counter()
  batches, n = problem.batches(k, r)
  key = algorithm.site_key(jax.random.key(int(problem.seed)), r, k)
  delta, _, opt1, losses = update(params, opt, batches, key)
  delta, opt1, losses = jax.device_get((delta, opt1, losses))
  return delta, opt1, {"examples": float(n), "site_loss": float(losses[0]),
                       "train_loss": float(np.mean(losses)),
                       "seconds": time.perf_counter() - t0}


PENDING = "pending"  # Context.state: a reply's site state, committed once the server applied it
PENDING_TOKEN = "pending_token"  # Context.state: {"reply": the token of that reply}


def set_pending(state: Any, token: str, **records: Any) -> None:
  """Keeps `records` (name -> ArrayRecord; None = none) in the site's `state` (a Flower
  RecordDict, its SuperNode's Context.state) as the state of the reply `token`, replacing any
  earlier pending state: `commit_pending` makes them the site's once the server applied that
  reply. Each record is stored as `state[f"{PENDING}.{name}"]`."""
  from flwr.app import ConfigRecord  # noqa: PLC0415
  for key in [key for key in state if key.startswith(PENDING + ".")]:
    del state[key]
  for name, record in records.items():
    if record is not None:
      state[f"{PENDING}.{name}"] = record
  state[PENDING_TOKEN] = ConfigRecord({"reply": token})


def commit_pending(state: Any, applied: str) -> bool:
  """The site's side of the reply token: when `state` holds the pending state of a reply
  (`set_pending`) whose token is among `applied` (the server's space-separated tokens of each
  site's latest applied reply), each pending record `name` becomes `state[name]`; either way the
  pending state is removed (a dropped reply's state is discarded). Returns True when it was
  committed."""
  if PENDING_TOKEN not in state:
    return False
  token = str(state[PENDING_TOKEN]["reply"])
  keep = token in applied.split()
  for key in [key for key in state if key.startswith(PENDING + ".")]:
    if keep:
      state[key[len(PENDING) + 1:]] = state[key]
    del state[key]
  del state[PENDING_TOKEN]
  return keep


def site_train(content: Any, state: Any, site: str, run_id: int, run_config: dict) -> Any:
  """What site `site`'s ClientApp does with the server's round-r message `content` (a Flower
  RecordDict: "params", "config" {"round": r, "applied": per site, the token of its latest
  reply a round applied, space-separated}), keeping its state in `state` (its SuperNode's per-run
  `Context.state`, a RecordDict). Returns the reply content: "delta" (the payload,
  `site_reply`), "metrics" (site index, examples, losses, seconds), "info" {"site", "reply": a
  token naming this reply}.

  The site's state that a round moves on, its client optimizer state c_k ("client_opt", DiLoCo's
  inner AdamW moments) and its top-k error-feedback residual e_k ("residual"), is committed only
  for a reply the server applied: round r's new c_k and e_k wait in `state` ("pending", with
  this reply's token in "pending_token") and become the site's ("client_opt", "residual") when
  the site's next message lists that token (`commit_pending`); a reply the server dropped (it
  came after `round-timeout`, or was refused) leaves c_k and e_k as if the site had not taken
  part in that round, as the simulation keeps a mask-0 site's client state and residual
  (`algorithm.make_round`, `compression.apply`)."""
  import uuid  # noqa: PLC0415
  from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: PLC0415
  problem, update, like, opt_like = _site(run_id, run_config, site)
  k = problem.sites.index(site)
  cfg = content["config"]
  r = int(cfg["round"])
  if "jobs" in cfg:  # asynchronous (flower_async): this site's job index picks batches and key
    r = int(str(cfg["jobs"]).split()[k])
  commit_pending(state, str(cfg.get("applied", "")))
  if "sampled" in cfg and str(k) not in str(cfg["sampled"]).split():
    # Not sampled this round (fed.participation < 1): no local work, the state as it is (the
    # simulation's mask-0 site); the reply names the site, so the server learns which node
    # holds it and sends that node no parameters while it is not sampled.
    return RecordDict({"metrics": MetricRecord({"site": k, "skipped": 1}),
                       "info": ConfigRecord({"site": site})})
  params = from_record(content["params"], like)
  opt = (from_record(state["client_opt"], opt_like) if "client_opt" in state
         else problem.client_tx.init(params))
  residual = (from_record(state["residual"], like)
              if "residual" in state else None)  # error feedback
  payload, opt1, residual, metrics = site_reply(problem, update, params, opt, residual, k, r)
  token = f"{site}.{r}.{uuid.uuid4().hex}"
  set_pending(state, token, client_opt=to_record(opt1),
              residual=None if residual is None else to_record(residual))
  return RecordDict({"delta": payload, "metrics": MetricRecord({"site": k, **metrics}),
                     "info": ConfigRecord({"site": site, "reply": token})})


def _make_client_app():
  from flwr.app import Message  # noqa: PLC0415
  from flwr.clientapp import ClientApp  # noqa: PLC0415
  app = ClientApp()

  @app.train()
  def train(msg: Message, context: Any) -> Message:
    if secure_aggregation(dict(context.run_config)):
      return secagg_train(msg, context)
    site = str(context.node_config.get("site", ""))
    return Message(content=site_train(msg.content, context.state, site, context.run_id,
                                      site_run_config(context)), reply_to=msg)

  @app.evaluate()
  def evaluate(msg: Message, context: Any) -> Message:  # plain also with secure-aggregation
    site = str(context.node_config.get("site", ""))
    return Message(content=site_evaluate(msg.content, site, context.run_id,
                                         site_run_config(context)), reply_to=msg)

  return app


# ---------------------------------------------------------------- the server (ServerApp)

def _append(path: str, row: dict) -> None:
  """One line of rounds.jsonl: `jmtl federated`'s `_append_line` (strict JSON: a non-finite
  value is refused, the rows hold None for it; a bucket path rewritten atomically)."""
  from etils import epath  # noqa: PLC0415
  from jmtl.federated import loop  # noqa: PLC0415
  loop._append_line(epath.Path(path), row)  # noqa: SLF001


def _finite(v: float) -> float | None:
  """`v` as a float, None when it is not finite (NaN / inf: JSON null, as `jmtl federated`)."""
  return float(v) if np.isfinite(v) else None


def aggregate(deltas: list[Any | None], examples: np.ndarray, like: Any, groups: Any = None,
              holds: Any = None, *, rule: str = "fedavg", trim: float = 0.1,
              byzantine_f: int = 0, krum_m: int = 0, temperature: float = 1.0,
              site_loss: Any = None, prev_loss: Any = None, staleness: Any = None,
              dp: Any = None, noise_key: Any = None) -> tuple[Any, np.ndarray]:
  """The sites' deltas aggregated with jmtl's rules: m_k = 1 for each site whose delta arrived
  (None = lost; its row of the [S, ...] stack is zeros, masked), `groups` / `holds` as in
  `Problem` (None = one group held by all). `rule` "fedavg": w = fedavg_weights(n, m), Delta =
  grouped_mean over the stack; "dynamic": w = `aggregation.dynamic_weights(L, P, n, tau, m, T)`
  from `site_loss` L [S] (each site's loss before its local steps), `prev_loss` P [S] (its loss
  when it last took part, 0 = never) and `staleness` tau [S] (rounds since then, minus one;
  `_Server.staleness`); "gradient": c_k = `aggregation.trunk_cosine` of each delta with the
  FedAvg mean, w = `alignment_weights(c, n, m, T)`; T = `temperature` (fed.temperature). These
  are the simulation's calls with the site axis as the leading array axis (axis_name None)
  instead of the mesh's `site` axis. A rule of `robust.RULES` (median, trimmed_mean with beta =
  `trim`, krum with f = `byzantine_f`, m = `krum_m`): (Delta, w) = `robust.aggregate(stack,
  groups, m, holds, rule, ...)`, the call the simulation's round makes (`algorithm.make_round`,
  its stacked path; n_k does not enter). With `dp` (a `privacy.DPConfig`; rule fedavg): DP-FedAvg
  as the simulation's round computes it (`jmtl.federated.privacy`): each arrived delta, its
  leaves of groups the site does not hold zeroed, clipped to global norm C (`privacy.clip`),
  summed, then `privacy.noise_and_scale` with `noise_key` (the simulation's: fold_in(fold_in(
  key(seed), algorithm._NOISE_KEY), round)) and S_g = the sites holding each leaf; w_k = m_k /
  (q S). Returns (Delta float32 like `like`, w [S]); Delta = 0 when no site arrived (with DP:
  the noise alone, scaled, as the simulation). ValueError for another rule, "dynamic" without
  the loss arrays, or `dp` with a rule other than fedavg or without `noise_key`."""
  from jmtl.federated import robust  # noqa: PLC0415
  S = len(deltas)
  mask = np.array([d is not None for d in deltas], np.float32)
  zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), like)
  stack = jax.tree.map(lambda *xs: np.stack(xs), *[zeros if d is None else d for d in deltas])
  groups = jax.tree.map(lambda _: 0, like) if groups is None else groups
  holds = np.ones((S, 1), np.float32) if holds is None else np.asarray(holds, np.float32)
  if dp is not None and (rule != "fedavg" or noise_key is None):
    raise ValueError(f"DP-FedAvg needs rule fedavg and a noise_key, got {rule!r}")
  if rule in robust.RULES:
    delta, w = _robust_aggregate(stack, groups, mask, holds, rule, float(trim),
                                 int(byzantine_f), int(krum_m))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), delta), np.asarray(w)
  if rule not in WEIGHTED_RULES:
    raise ValueError(f"the Flower server aggregates with {', '.join(WEIGHTED_RULES)} or "
                     f"{', '.join(robust.RULES)}, got {rule!r}")
  n, m, held = (jnp.asarray(examples, jnp.float32), jnp.asarray(mask), jnp.asarray(holds))
  if dp is not None:
    total = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), like)
    for k, d in enumerate(deltas):
      if d is None:
        continue
      sent = jax.tree.map(lambda x, g, k=k: x * holds[k, g], d, groups)
      bounded, _ = privacy.clip(sent, dp.clip_norm)
      total = jax.tree.map(lambda a, b: a + np.asarray(b, np.float32), total, bounded)
    holders = jax.tree.map(lambda g: jnp.sum(held[:, g]), groups)
    delta = privacy.noise_and_scale(total, noise_key, dp, holders)
    return (jax.tree.map(lambda a: np.asarray(a, np.float32), delta),
            np.asarray(m / (dp.sampling_rate * S)))
  if rule == "dynamic":
    if site_loss is None or prev_loss is None or staleness is None:
      raise ValueError("aggregator 'dynamic' needs site_loss, prev_loss and staleness")
    w = aggregation.dynamic_weights(jnp.asarray(site_loss, jnp.float32),
                                    jnp.asarray(prev_loss, jnp.float32), n,
                                    jnp.maximum(jnp.asarray(staleness, jnp.float32), 0.0), m,
                                    float(temperature))
  elif rule == "gradient":
    mean = aggregation.grouped_mean(stack, groups, aggregation.fedavg_weights(n, m), held)
    cos = aggregation.trunk_cosine(stack, groups, mean)
    w = aggregation.alignment_weights(cos, n, m, float(temperature))
  else:
    w = aggregation.fedavg_weights(n, m)
  delta = aggregation.grouped_mean(stack, groups, w, held)
  return delta, np.asarray(w)


WEIGHTED_RULES = ("fedavg", "dynamic", "gradient")  # `aggregate`'s weighted means


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6, 7))
def _robust_aggregate_jit(stack, groups_def, mask, holds, rule, trim, byzantine_f, krum_m):
  from jmtl.federated import robust  # noqa: PLC0415
  treedef, leaves = groups_def
  groups = jax.tree.unflatten(treedef, list(leaves))
  return robust.aggregate(stack, groups, mask, holds, rule, trim=trim, byzantine_f=byzantine_f,
                          krum_m=krum_m)


def _robust_aggregate(stack, groups, mask, holds, rule, trim, byzantine_f, krum_m):
  """`robust.aggregate` jitted as in the simulation's round (the group ids static)."""
  leaves, treedef = jax.tree.flatten(groups)
  return _robust_aggregate_jit(stack, (treedef, tuple(int(g) for g in leaves)),
                               jnp.asarray(mask), jnp.asarray(holds), rule, trim, byzantine_f,
                               krum_m)


PULL_INTERVAL_S = 0.1  # the server's poll for replies (Flower's send_and_receive sleeps 3 s)


def send_and_receive(grid: Any, msgs: list, timeout: float | None,
                     sent: dict | None = None) -> list:
  """Flower's `Grid.send_and_receive` (push the messages, pull their replies until all are in
  or `timeout` seconds passed; None = no limit) polling every PULL_INTERVAL_S seconds instead
  of Flower's 3 (a round waited 1.5 s on average for that poll alone). `sent` (a dict), when
  given, receives {message id: the node it was sent to (dst_node_id)} in push order: a reply's
  `reply_to_message_id` names its node there, also for an error reply that the SuperLink wrote
  itself for a node it lost (whose src_node_id is the SuperLink's, not the node's)."""
  # The ids in push order (a dict, not a set: the pulls, and so which of two replies for one
  # site counts first in `_round`, do not depend on string hashing).
  ids = list(grid.push_messages(msgs))
  if sent is not None:
    sent.update(zip(ids, (m.metadata.dst_node_id for m in msgs)))
  pending = dict.fromkeys(ids)
  replies: list = []
  deadline = time.time() + (float("inf") if timeout is None else timeout)
  while pending:
    got = list(grid.pull_messages(list(pending)))
    replies += got
    for m in got:
      pending.pop(m.metadata.reply_to_message_id, None)
    if not pending or time.time() >= deadline:
      break
    time.sleep(PULL_INTERVAL_S)
  return replies


class _FastGrid:
  """A Flower Grid whose `send_and_receive` is `send_and_receive` above (for Flower's own
  workflows, e.g. SecAgg+'s four message stages a round); everything else is the grid's."""

  def __init__(self, grid: Any):
    self._grid = grid

  def __getattr__(self, name: str) -> Any:
    return getattr(self._grid, name)

  def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list:
    return send_and_receive(self._grid, list(messages), timeout)


def _fingerprint(problem: Problem, run_config: dict) -> dict:
  """What a checkpoint of this run depends on: a jmtl config's `workdir.fingerprint`-style
  config keys (all but `workdir.RESUMABLE`) and vocabulary digest (`Problem.fingerprint`), else
  the run config without the keys a resumed run may change (`RESUMABLE_RUN_CONFIG`)."""
  if problem.fingerprint is not None:
    return dict(problem.fingerprint)
  return {"run_config": {k: v for k, v in sorted(run_config.items())
                         if k not in RESUMABLE_RUN_CONFIG},
          "sites": list(problem.sites)}


# Run config keys a resumed run may change (the others must equal the checkpoint's).
RESUMABLE_RUN_CONFIG = ("workdir", "rounds", "round-timeout", "wait-sites", "config",
                        "overrides", "submission", "max-empty-rounds")


def _check_checkpoint(problem: Problem, run_config: dict, workdir: str, step: int,
                      meta: dict) -> None:
  """Refuses (ValueError, one line; a jmtl config: ConfigError naming the keys, as `jmtl
  federated` does) a checkpoint that is not this run's: not a Flower server's, or another
  config / run config."""
  if meta.get("backend") != "flower":
    raise ValueError(f"--workdir {workdir} holds a checkpoint at round {step} that is not a "
                     f"Flower run's (a `jmtl federated` simulation's?): use a new workdir")
  if problem.config is not None:
    from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415
    workdir_lib.check_config(meta, problem.config, workdir=epath.Path(workdir), step=step)
    workdir_lib.check_vocabulary(meta, problem.fingerprint["tokenizer"],
                                 workdir=epath.Path(workdir), step=step)
    return
  saved, now = meta.get("fingerprint", {}), _fingerprint(problem, run_config)
  diffs = [f"{k} {saved.get('run_config', {}).get(k)!r} -> {now['run_config'].get(k)!r}"
           for k in sorted(set(saved.get("run_config", {})) | set(now["run_config"]))
           if saved.get("run_config", {}).get(k) != now["run_config"].get(k)]
  if saved.get("sites") != now["sites"]:
    diffs.append(f"sites {saved.get('sites')} -> {now['sites']}")
  if diffs:
    raise ValueError(f"--workdir {workdir} holds a checkpoint at round {step} of another run "
                     f"({'; '.join(diffs)}): use a new workdir or the same run config")


def _abstract(tree: Any) -> Any:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=sharding), tree)


def load_checkpoint(workdir: str, params: Any, opt_state: Any, *, step: int | None = None
                    ) -> tuple[int, Any, Any, dict]:
  """Reads a Flower server checkpoint of `workdir` (the latest, or round `step`), shaped like
  `params` / `opt_state`: returns (round, params, opt_state, meta) as numpy trees.
  CheckpointError / FileNotFoundError when there is none to read."""
  from jmtl.federated import loop  # noqa: PLC0415
  from jmtl.train import checkpoint as checkpoint_lib  # noqa: PLC0415
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    tree, _, meta = ckpt.restore(step, _abstract(loop.flower_checkpoint_tree(params, opt_state)))
  finally:
    ckpt.close()
  tree = jax.device_get(tree)
  return step, tree["server"]["params"], tree["server"]["opt_state"], meta


def _last_round(path: str) -> int | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  try:
    return int(json.loads(lines[-1])["round"]) if lines else None
  except (ValueError, KeyError, TypeError):
    return None


class _Server:
  """The server side shared by `serve` and the SecAgg+ strategy: the workdir and its lock (the
  trainer's `workdir.lock`, held from the start until `close`: a second server on the same
  workdir, e.g. a run submitted again while the old server still runs, is refused in one line
  naming the workdir and the holder), the jmtl `Checkpointer` (Orbax, atomic, keep-N), resume
  from the latest complete checkpoint, the server optimizer step, evaluation and rounds.jsonl
  (`jmtl federated`'s `_append_line`). Whatever raises in `__init__` closes the checkpointer and
  releases the lock; `close` does both after the run (the caller's `finally`; a process killed
  outright, SIGKILL or an unhandled SIGTERM, loses its `flock` with its file descriptors)."""

  def __init__(self, problem: Problem, run_config: dict, grid: Any = None):
    import contextlib  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415
    from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
    self.problem, self.run_config = problem, run_config
    # The Flower Grid the per-site evaluation messages go through (`evaluate_sites`; None =
    # no per-site evaluation), and whether it has waited for the sites' nodes once.
    self.grid, self.sites_waited = grid, False
    self.workdir = str(run_config["workdir"])
    self.rounds = int(run_config.get("rounds") or problem.rounds)
    self.rounds_path = os.path.join(self.workdir, "rounds.jsonl")
    self._closing = contextlib.ExitStack()
    self._closing.enter_context(workdir_lib.lock(epath.Path(self.workdir), "flower server"))
    try:
      self._open(problem, run_config)
    except BaseException:
      self._closing.close()  # the checkpointer (when opened), then the lock
      raise

  def _open(self, problem: Problem, run_config: dict) -> None:
    from jmtl.train import checkpoint as checkpoint_lib  # noqa: PLC0415
    if problem.dp is not None and problem.aggregator != "fedavg":
      # (a jmtl config is refused earlier: fed.dp.clip_norm's rule) A robust rule would
      # otherwise drop the clipping and noise while rounds.jsonl still reports an epsilon.
      raise ValueError(f"the Problem's dp (DP-FedAvg) needs aggregator 'fedavg', got "
                       f"{problem.aggregator!r}: DP-FedAvg weighs every participant 1 / (q S)")
    from jmtl.federated import loop  # noqa: PLC0415
    self.params = jax.tree.map(lambda x: np.asarray(x, np.float32), problem.params)
    tx = optax.with_extra_args_support(problem.server_tx)
    self.opt_state = jax.tree.map(np.asarray, tx.init(self.params))

    @jax.jit
    def step(params, opt_state, delta):
      u, opt_state = tx.update(delta, opt_state, params)
      return optax.apply_updates(params, u), opt_state
    self._step = step
    self.fp = _fingerprint(problem, run_config)
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                            keep=problem.keep_checkpoints)
    self._closing.callback(self.ckpt.close)
    found = self.ckpt.read_latest_meta()
    if found is not None:  # another run's checkpoint is refused before anything is written
      _check_checkpoint(problem, run_config, self.workdir, found[0], found[1])
    restored = self.ckpt.restore_latest(
        _abstract(loop.flower_checkpoint_tree(self.params, self.opt_state)),
        check=lambda s, m: _check_checkpoint(problem, run_config, self.workdir, s, m))
    self.start, self._outputs = 0, None
    self.meta_extra: dict = {}  # more checkpoint meta (flower_async: each site's job index)
    # Per site, the token of its latest reply that a round applied (`_round`, `site_train`).
    self.applied_replies: dict[int, str] = {}
    # Node id (str) -> the site its applied replies were for (names a timed-out node).
    self.node_sites: dict[str, str] = {}
    # Per site, the simulation's `ServerState.prev_loss` / `last_round`: its loss when it last
    # took part (0 = never) and that round (0-based; -1 = never), for aggregator "dynamic"
    # (kept in the checkpoint's meta, `site_memory`).
    S = len(problem.sites)
    self.prev_loss = np.zeros(S, np.float32)
    self.last_round = np.full(S, -1, np.int32)
    if restored is not None:
      self.start, tree, _, meta = restored
      tree = jax.device_get(tree)
      self.params, self.opt_state = tree["server"]["params"], tree["server"]["opt_state"]
      memory = meta.get("site_memory")
      if memory is not None:
        self.prev_loss = np.asarray(memory["prev_loss"], np.float32).reshape(S)
        self.last_round = np.asarray(memory["last_round"], np.int32).reshape(S)
      print(f"resumed from checkpoint at round {self.start}", flush=True)
    self.ckpt.remove_incomplete()
    # rounds.jsonl: the lines of rounds past the checkpoint are dropped (their rounds run
    # again); the checkpoint's own line, when a kill came between the save and the line, is
    # written from the checkpoint's meta.
    from etils import epath  # noqa: PLC0415
    eval_zero = _evaluates(problem) and bool(problem.eval_every) and not self.start
    loop._truncate_rounds(epath.Path(self.rounds_path),  # noqa: SLF001
                          -1 if eval_zero else self.start)
    if restored is not None and meta.get("row") and _last_round(self.rounds_path) != self.start:
      _append(self.rounds_path, meta["row"])
    from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
    wd = epath.Path(self.workdir)
    for name, text in problem.files.items():  # a reader sees the old file or the whole new one
      workdir_lib.write_text_atomic(wd / name, text)
    workdir_lib.write_text_atomic(wd / "flower.json", json.dumps(
        {"run_config": dict(run_config), "sites": list(problem.sites),
         "resumed_from": self.start if restored is not None else None}, indent=1))
    if (restored is not None and self.start == self.rounds and problem.evaluate is not None
        and problem.write_outputs is not None):
      # A finished run submitted again: eval.json again (a kill after the last line and
      # before eval.json left none; the evaluation of the same parameters is the same).
      # The sites' held-out metrics of that round stay (from the checkpoint's line: the sites
      # are not asked again).
      metrics, pred_rows = problem.evaluate(self.params, self.opt_state, self.start)
      problem.write_outputs(self.workdir, {**metrics, **site_metrics_of(meta.get("row"))},
                            pred_rows, self.start)
    if eval_zero:
      row = {"round": 0}  # the initial model, as `jmtl federated` evaluates it
      self.evaluate(0, row)
      _append(self.rounds_path, row)

  def apply(self, delta: Any) -> None:
    """x, s <- server_tx step with the aggregated delta (`optax.apply_updates`)."""
    self.params, self.opt_state = jax.device_get(self._step(self.params, self.opt_state, delta))

  def staleness(self, r: int) -> np.ndarray:
    """tau_k = r - last_round_k - 1 for round r (0-based), the simulation's `stale`."""
    return (r - self.last_round - 1).astype(np.float32)

  def remember(self, r: int, site_loss: dict[int, float]) -> None:
    """After round r (0-based): each site that took part remembers its loss and the round
    (the simulation's new `ServerState.prev_loss` / `last_round`)."""
    for k, v in site_loss.items():
      self.prev_loss[k], self.last_round[k] = np.float32(v), r

  def evaluate(self, r: int, row: dict) -> None:
    """The Problem's evaluation of the server parameters (a jmtl config: the trainer's
    `_run_eval` on the tasks' data.eval_split, as `jmtl federated`) and, with
    `Problem.site_evaluate` and a grid, the sites' own (`evaluate_sites`: `site/<name>/...`
    and the `site_eval_*` notes); metrics go into `row`,
    and at the last round into eval.json (`train.loop._write_outputs`), which `end_round`
    writes only after that round's checkpoint is committed and its line appended (a kill in
    between leaves no eval.json claiming a round that never completed)."""
    metrics, pred_rows = (self.problem.evaluate(self.params, self.opt_state, r)
                          if self.problem.evaluate is not None else ({}, {}))
    if self.grid is not None and self.problem.site_evaluate is not None:
      site_metrics, notes = evaluate_sites(self, r)  # at the sites: `site/<name>/...`
      metrics = {**metrics, **site_metrics}
      row.update(notes)
    row.update({k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()})
    if r == self.rounds and self.problem.write_outputs is not None:
      self._outputs = (metrics, pred_rows)  # written by end_round after checkpoint and line

  def end_round(self, r: int, row: dict) -> None:
    """After round r: evaluation (fed.eval_every and the last round), the checkpoint
    (`Problem.checkpoint_every`, evaluation rounds and the last round; saved and committed
    before the line), then the line of rounds.jsonl, then (last round) eval.json."""
    from jmtl.federated import loop  # noqa: PLC0415
    last = r == self.rounds
    self._outputs = None
    evaluated = _evaluates(self.problem) and (
        last or bool(self.problem.eval_every and r % self.problem.eval_every == 0))
    if evaluated:
      self.evaluate(r, row)
    if last or r % self.problem.checkpoint_every == 0 or evaluated:
      meta = {"row": row, "backend": "flower", "fingerprint": self.fp}
      if self.problem.aggregator == "dynamic":  # float32 values: exact in JSON doubles
        meta["site_memory"] = {"prev_loss": [float(v) for v in self.prev_loss],
                               "last_round": [int(v) for v in self.last_round]}
      meta.update(self.meta_extra)
      self.ckpt.save(r, loop.flower_checkpoint_tree(self.params, self.opt_state), {}, meta)
      self.ckpt.wait()
    _append(self.rounds_path, row)
    if self._outputs is not None and self.problem.write_outputs is not None:
      self.problem.write_outputs(self.workdir, *self._outputs, r)

  def close(self) -> None:
    """Closes the checkpointer (waits for a save in flight), then releases the workdir lock."""
    self._closing.close()


MAX_EMPTY_ROUNDS = 3  # run config `max-empty-rounds` default (fed.flower.max_empty_rounds)


class EmptyRoundsError(RuntimeError):
  """`serve` stopped: `max-empty-rounds` consecutive rounds had no applied reply."""


def serve(grid: Any, run_config: dict) -> Any:
  """The server's rounds (what `server_app` runs): resumes from the workdir's latest
  checkpoint (`_Server`), runs the remaining rounds; returns the final server parameters.

  After `max-empty-rounds` (run config; fed.flower.max_empty_rounds, default 3; 0 = never)
  consecutive rounds in which no reply was applied (every site gone), the run stops: each of
  those rounds' line and checkpoint are written as usual (the parameters are unchanged), then
  one line on stderr and EmptyRoundsError (the Flower run ends failed; submitting it again
  resumes from the checkpoint)."""
  from flwr.app import ConfigRecord, Message, RecordDict  # noqa: PLC0415
  problem = load_problem(run_config)
  if problem.mode == "async":  # FedBuff (fed.mode = "async")
    from jmtl.federated import flower_async  # noqa: PLC0415
    return flower_async.serve_async(grid, run_config, problem)
  timeout = float(run_config.get("round-timeout", 60.0))
  most = int(run_config.get("max-empty-rounds", MAX_EMPTY_ROUNDS))
  server = _Server(problem, run_config, grid)
  try:
    S = len(problem.sites)
    deadline = time.time() + float(run_config.get("wait-sites", 120.0))
    while len(list(grid.get_node_ids())) < S and time.time() < deadline:
      time.sleep(PULL_INTERVAL_S)
    empty = 0
    for r in range(server.start, server.rounds):
      row = _round(grid, server, problem, r, timeout, Message, RecordDict, ConfigRecord)
      server.end_round(r + 1, row)
      empty = 0 if row["applied"] else empty + 1
      _stop_if_empty(server, empty, r + 1, most)
  finally:
    server.close()
  return server.params


def _stop_if_empty(server: _Server, empty: int, r: int, most: int) -> None:
  """After round r (1-based), the `empty`-th consecutive round without an applied reply: when
  `most` > 0 and empty >= most, one line `jmtl: error: ...` on stderr (the rounds, the limit,
  the checkpoint a resubmitted run resumes from) and EmptyRoundsError."""
  if not (most and empty >= most):
    return
  c = server.ckpt.latest_step()
  msg = (f"{empty} consecutive rounds ({r + 1 - empty}-{r}) had no applied reply "
         f"(max-empty-rounds {most}): stopping at round {r} of {server.rounds}; "
         f"submit the run again once the sites are back: it resumes from its last "
         + (f"checkpoint, round {c}" if c is not None else
            "checkpoint only if one exists, and none was saved yet "
            "(fed.checkpoint_every): it starts at round 1"))
  print(f"jmtl: error: {msg}", file=sys.stderr, flush=True)
  raise EmptyRoundsError(msg)


def train_reply(content: Any, problem: Problem) -> tuple[int, dict[str, float]]:
  """The site index k and the numbers of a training reply's content (`site_train`'s "metrics":
  "site", and unless "skipped": "site_loss", "train_loss", "seconds" and "examples", n_k, the
  FedAvg weight's count; a "delta" payload). ValueError naming what is wrong with a malformed
  one: a missing or non-numeric entry, a site index not in 0..S-1, no delta, or an example count
  that is not a finite number > 0 (FedAvg's n_k, McMahan et al. 2017, Algorithm 1: a NaN or
  negative one made every weight of the round 0 or NaN, a round written `applied` that moved
  nothing)."""
  try:
    metrics = content["metrics"]
    k = int(metrics["site"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"malformed training reply (no site index: {e!r})") from None
  if not 0 <= k < len(problem.sites):
    raise ValueError(f"malformed training reply: site index {k} is not one of "
                     f"0..{len(problem.sites) - 1}")
  if "skipped" in metrics:
    return k, {"skipped": 1.0}
  out = {}
  for key in ("site_loss", "train_loss", "seconds", "examples"):
    try:
      out[key] = float(metrics[key])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"site {problem.sites[k]!r}: malformed training reply (metrics "
                       f"{key!r} missing or not a number)") from None
  if "delta" not in content:
    raise ValueError(f"site {problem.sites[k]!r}: malformed training reply (no delta)")
  if not (np.isfinite(out["examples"]) and out["examples"] > 0):
    raise ValueError(f"site {problem.sites[k]!r} reported {out['examples']:g} training "
                     f"examples (n_k must be a finite number > 0)")
  return k, out


def _round(grid, server, problem, r, timeout, Message, RecordDict, ConfigRecord) -> dict:  # noqa: N803
  """Round r (0-based): the messages out (with each site's latest applied reply token,
  `site_train`), the replies in, aggregation and the server step; returns the round's
  rounds.jsonl row. A second node claiming a site that already replied this round is refused
  (first reply kept; a line on stderr and in the row's `errors`). A reply whose site_loss or
  (decoded) update is not finite (NaN / inf) is refused the same way: not aggregated, its
  site's previous loss and last round kept, the site in `dropped`, its loss null in
  `site_loss`, a line on stderr and in `errors` (`jmtl federated` stops at such a round;
  a Flower run goes on without the site, and `max-empty-rounds` ends it when every site's
  reply is refused). An error reply goes into
  `errors` under the node its message was sent to; the nodes that did not reply within
  `timeout` into `timed_out` (site names, "node <id>" for a node that never replied in this
  run; a line on stderr). `bytes_down` per site: the sites whose reply was applied; its
  `total`: every message sent (each one was there to download: a refused claimant's, an error
  reply's and a timed-out node's too)."""
  S = len(problem.sites)
  t0 = time.time()
  record = to_record(server.params)
  down = payload_bytes(record)
  applied = " ".join(server.applied_replies[k] for k in sorted(server.applied_replies))
  # fed.participation < 1: the round's sampled sites, the simulation's draw (round r + 1). A
  # node known to hold a site that is not sampled gets the round's config without parameters
  # (and replies `skipped`); a node not heard from yet gets the parameters (it may hold a
  # sampled site), which `bytes_down`'s total counts.
  sampled = None
  if problem.participation < 1.0:
    from jmtl.federated import loop  # noqa: PLC0415
    mask = loop.sample_participants(problem.seed, r + 1, S, problem.participation)
    sampled = [k for k in range(S) if mask[k] > 0]
  cfg = {"round": r, "applied": applied}
  if sampled is not None:
    cfg["sampled"] = " ".join(map(str, sampled))
  light: set = set()  # the nodes sent no parameters
  msgs = []
  for n in grid.get_node_ids():
    site = server.node_sites.get(str(n))
    if sampled is not None and site is not None and problem.sites.index(site) not in sampled:
      light.add(n)
      content = RecordDict({"config": ConfigRecord(cfg)})
    else:
      content = RecordDict({"params": record, "config": ConfigRecord(cfg)})
    msgs.append(Message(content=content, message_type="train", dst_node_id=n))
  sent: dict = {}  # message id -> the node it went to
  replies = send_and_receive(grid, msgs, timeout, sent)
  deltas: list[Any] = [None] * S
  examples = np.zeros(S, np.float32)
  info: dict[int, dict] = {}
  errors: dict[str, str] = {}
  claimed: dict[int, str] = {}  # site -> the node whose reply counts
  nonfinite: dict[int, float] = {}  # site -> its reported loss, for a refused non-finite reply
  answered: set = set()  # the message ids that got a reply
  # A site's owner (the node whose reply it last applied) goes first, whatever order the replies
  # came in: with two claimants the owner's reply counts while it answers, and another node
  # takes the site over only in a round its owner does not answer (its state then moves on).
  owner = {site: node for node, site in server.node_sites.items()}

  def site_of(rep: Any) -> str | None:
    try:
      return None if rep.has_error() else problem.sites[int(rep.content["metrics"]["site"])]
    except (KeyError, IndexError, TypeError, ValueError):
      return None

  def node_of(rep: Any) -> str:
    return str(sent.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id))

  replies = sorted(replies, key=lambda rep: owner.get(site_of(rep)) != node_of(rep))
  for rep in replies:
    answered.add(rep.metadata.reply_to_message_id)
    # The node the message went to (a SuperNode the SuperLink lost gets an error reply whose
    # src_node_id is the SuperLink's own id).
    node = node_of(rep)
    if rep.has_error():  # a SuperNode whose ClientApp raised (e.g. an unknown node config site)
      reason = str(getattr(rep.error, "reason", "") or rep.error).strip()
      errors[node] = (reason.splitlines() or [""])[0]
      print(f"round {r + 1}: node {node} replied with an error: {errors[node]}",
            file=sys.stderr, flush=True)
      continue
    try:  # a malformed reply (`train_reply`) is refused as an error reply, the round goes on
      k, nums = train_reply(rep.content, problem)
    except ValueError as e:
      errors[node] = f"node {node}: {e}: its reply is refused"
      print(f"round {r + 1}: {errors[node]}", file=sys.stderr, flush=True)
      continue
    if "skipped" in nums:  # not sampled: learn the node's site, nothing else
      if problem.sites[k] not in server.node_sites.values():
        server.node_sites[node] = problem.sites[k]
      continue
    if sampled is not None and k not in sampled:
      errors[node] = (f"node {node} trained site {problem.sites[k]!r}, which this round did not "
                      f"sample: its reply is refused")
      print(f"round {r + 1}: {errors[node]}", file=sys.stderr, flush=True)
      continue
    if k in claimed:  # two SuperNodes with one node config site: the first reply counts
      errors[node] = (f"node {node} claims site {problem.sites[k]!r}, which node {claimed[k]} "
                      f"already replied for: its reply is refused (give each SuperNode its own "
                      f"node config site; it takes the site over only in a round node "
                      f"{claimed[k]} does not answer)")
      print(f"round {r + 1}: {errors[node]}", file=sys.stderr, flush=True)
      continue
    try:
      delta_k = (decode_update(problem, k, rep.content["delta"], server.params)
                 if codec_of(problem) is not None
                 else from_record(rep.content["delta"], server.params))
    except (KeyError, TypeError, ValueError) as e:  # leaves missing, or of another shape
      errors[node] = (f"node {node}: site {problem.sites[k]!r}: malformed update ({e}): its "
                      f"reply is refused")
      print(f"round {r + 1}: {errors[node]}", file=sys.stderr, flush=True)
      continue
    loss_k = nums["site_loss"]
    if not (np.isfinite(loss_k) and all(np.all(np.isfinite(x))
                                        for x in jax.tree.leaves(delta_k))):
      # A non-finite loss or update is refused, as a lost reply: applied, it would make every
      # weight of `dynamic` 0 (a silent no-op round) or the FedAvg mean NaN, and a NaN
      # previous loss kept for the site would zero `dynamic`'s weights in every later round.
      nonfinite[k] = loss_k
      errors[node] = (f"site {problem.sites[k]!r} (node {node}) reported a non-finite "
                      + ("loss" if not np.isfinite(loss_k) else "update")
                      + ": its reply is refused (not aggregated, its previous loss kept)")
      print(f"round {r + 1}: {errors[node]}", file=sys.stderr, flush=True)
      continue
    claimed[k] = node
    for other in [n for n, s in server.node_sites.items() if s == problem.sites[k]]:
      del server.node_sites[other]  # one owner per site
    server.node_sites[node] = problem.sites[k]
    deltas[k] = delta_k
    examples[k] = nums["examples"]
    token = (str(rep.content["info"]["reply"])
             if "info" in rep.content and "reply" in rep.content["info"] else None)
    info[k] = {"up": payload_bytes(rep.content["delta"]), "token": token,
               **{m: nums[m] for m in ("site_loss", "train_loss", "seconds")}}
  # Nodes whose reply did not come within round-timeout: named by the site they last replied
  # for in this run (`_Server.node_sites`), else "node <id>".
  timed_out = sorted({server.node_sites.get(str(n), f"node {n}")
                      for i, n in sent.items() if i not in answered})
  if timed_out:
    print(f"round {r + 1}: no reply within round-timeout {timeout:g} s from "
          f"{', '.join(timed_out)}", file=sys.stderr, flush=True)
  part = sorted(info)
  site_loss = np.zeros(S, np.float32)
  for k in part:
    site_loss[k] = info[k]["site_loss"]
  delta, w = aggregate(deltas, examples, server.params, problem.groups, problem.holds,
                       rule=problem.aggregator, trim=problem.trim,
                       byzantine_f=problem.byzantine_f, krum_m=problem.krum_m,
                       temperature=problem.temperature, site_loss=site_loss,
                       prev_loss=server.prev_loss, staleness=server.staleness(r),
                       dp=problem.dp, noise_key=None if problem.dp is None else noise_key(
                           problem.seed, r))
  if part:
    server.apply(delta)
  server.remember(r, {k: info[k]["site_loss"] for k in part})
  server.applied_replies.update({k: info[k]["token"] for k in part
                                 if info[k]["token"] is not None})
  fw = float(sum(examples[k] for k in part))
  return {"round": r + 1, "sites": [problem.sites[k] for k in part],
          "dropped": [s for k, s in enumerate(problem.sites)
                      if k not in info and (sampled is None or k in sampled)],
          "applied": int(bool(part)),
          "loss": (_finite(sum(examples[k] * info[k]["site_loss"] for k in part) / fw)
                   if part else None),
          "site_loss": {problem.sites[k]: _finite(info[k]["site_loss"] if k in info
                                                  else nonfinite[k])
                        for k in sorted(set(part) | set(nonfinite))},
          "weights": {problem.sites[k]: float(w[k]) for k in part},
          "bytes_up": {**{problem.sites[k]: info[k]["up"] for k in part},
                       "total": sum(info[k]["up"] for k in part)},
          "bytes_down": {**{problem.sites[k]: down for k in part},
                         "total": down * (len(sent) - len(light))},
          "seconds": time.time() - t0,
          "site_seconds": {problem.sites[k]: info[k]["seconds"] for k in part},
          **(dp_epsilon(problem.dp, r + 1) if problem.dp is not None else {}),
          **({"errors": errors} if errors else {}),
          **({"timed_out": timed_out} if timed_out else {})}


def noise_key(seed: int, r: int) -> jax.Array:
  """DP-FedAvg's noise key of round r (0-based): the simulation's (`algorithm.make_round`)."""
  base = jax.random.key(int(seed))
  return jax.random.fold_in(jax.random.fold_in(base, algorithm._NOISE_KEY), r)  # noqa: SLF001


def dp_epsilon(dp: Any, rounds: int) -> dict:
  """rounds.jsonl's `dp_epsilon_rdp` / `dp_epsilon_pld` after `rounds` rounds (every round
  counts, one without an applied reply too, as in `jmtl federated`): `privacy.epsilon` at
  fed.dp.delta; None for an infinite epsilon (z = 0)."""
  rdp, pld = privacy.epsilon(dp.noise_multiplier, dp.sampling_rate, rounds, dp.delta)
  return {"dp_epsilon_rdp": _finite(rdp), "dp_epsilon_pld": _finite(pld)}


# ---------------------------------------------------------------- per-site held-out evaluation

def _evaluates(problem: Problem) -> bool:
  """Whether the server evaluates at evaluation rounds: the Problem's own evaluation and / or
  the per-site one (`Problem.site_evaluate`)."""
  return problem.evaluate is not None or problem.site_evaluate is not None


def site_metrics_of(row: dict | None) -> dict:
  """The `site/<name>/<task>/<metric>` entries of a rounds.jsonl row (None = {})."""
  return {k: v for k, v in (row or {}).items() if k.startswith("site/")}


def site_evaluate(content: Any, site: str, run_id: int, run_config: dict) -> Any:
  """What site `site`'s ClientApp does with the server's evaluate message `content` (a Flower
  RecordDict: "params", the parameters to evaluate, raw float32 leaves as `to_record` sends
  them; "config" {"round": r, the server's round, 0 = the initial model}): its
  `Problem.site_evaluate(params, k, r)` on its own held-out rows (a jmtl config: fed.holdout's
  rows of `loop.partition_records`, evaluated with `train.loop._run_eval` as `jmtl federated`
  evaluates each site). Its state (`Context.state`: client optimizer, residual) is not read
  or changed. Returns the reply content: "metrics" {"<task>/<metric>": float} (plain numbers;
  NaN stays NaN), "info" {"site": its name, "round": r, "seconds": the evaluation's measured
  wall-clock}. ValueError when the Problem has no per-site evaluation (the server asks only
  when its Problem has one: the same run config on both sides has it too) or the site is not
  one of the Problem's."""
  from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: PLC0415
  problem, _, like, _ = _site(run_id, run_config, site)
  if problem.site_evaluate is None:
    raise ValueError(f"site {site!r}: this run's Problem has no per-site evaluation "
                     f"(fed.holdout = 0?)")
  k = problem.sites.index(site)
  r = int(content["config"]["round"])
  t0 = time.perf_counter()
  metrics = problem.site_evaluate(from_record(content["params"], like), k, r)
  return RecordDict({"metrics": MetricRecord({str(m): float(v) for m, v in metrics.items()}),
                     "info": ConfigRecord({"site": site, "round": r,
                                           "seconds": time.perf_counter() - t0})})


def evaluate_sites(server: _Server, r: int) -> tuple[dict, dict]:
  """The per-site held-out evaluation of round r (after r rounds; 0 = the initial model), run
  at the sites: the server sends every connected node an evaluate message (Flower
  `MessageType.EVALUATE`, plain also in a SecAgg+ run) holding the parameters the server
  evaluates itself (`optim.eval_params(server opt state, x)`: x, or schedule-free's averaged
  point) as raw float32 leaves and the round; each site runs `site_evaluate` and replies its
  metrics. Every site is asked, those not sampled for training too (fed.participation < 1), as
  the simulation evaluates every site. The first call waits (at most the run config's
  `wait-sites` seconds) until the Problem's S nodes are connected; each call waits at most
  `round-timeout` seconds for the replies. With two replies for one site, its owner's (the node
  whose training reply the server last applied, `_Server.node_sites`) counts, else the first;
  the other, and a reply naming a site that is not one of the Problem's, is not used and said
  in `site_eval_errors` under its node.

  Returns (metrics {"site/<name>/<task>/<metric>": float}, the simulation's keys, for the row
  and eval.json; notes for the round's row: `site_eval_missing` [the sites without a reply:
  gone, late, or their ClientApp raised; their metrics are absent, nothing is filled in],
  `site_eval_errors` {node id: first line of its error} when a ClientApp raised,
  `site_eval_bytes_down` (the parameter bytes of the evaluate messages sent, 4 per value and
  message) and `site_eval_seconds` (measured)). The missing sites are also said on stderr."""
  from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: PLC0415
  from jmtl import optim  # noqa: PLC0415
  problem, grid, rc = server.problem, server.grid, server.run_config
  S = len(problem.sites)
  if not server.sites_waited:
    server.sites_waited = True
    deadline = time.time() + float(rc.get("wait-sites", 120.0))
    while len(list(grid.get_node_ids())) < S and time.time() < deadline:
      time.sleep(PULL_INTERVAL_S)
  t0 = time.time()
  record = to_record(jax.tree.map(lambda x: np.asarray(x, np.float32),
                                  optim.eval_params(server.opt_state, server.params)))
  msgs = [Message(content=RecordDict({"params": record,
                                      "config": ConfigRecord({"round": int(r)})}),
                  message_type=MessageType.EVALUATE, dst_node_id=n)
          for n in grid.get_node_ids()]
  sent: dict = {}
  replies = (send_and_receive(grid, msgs, float(rc.get("round-timeout", 60.0)), sent)
             if msgs else [])
  owner = {site: node for node, site in server.node_sites.items()}

  def node_of(rep: Any) -> str:
    return str(sent.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id))

  def site_of(rep: Any) -> str | None:
    try:
      return None if rep.has_error() else str(rep.content["info"]["site"])
    except (KeyError, TypeError, ValueError):
      return None

  got: dict[str, Any] = {}
  claimed: dict[str, str] = {}  # site -> the node whose metrics are used
  errors: dict[str, str] = {}
  for rep in sorted(replies, key=lambda rep: owner.get(site_of(rep)) != node_of(rep)):
    if rep.has_error():
      reason = str(getattr(rep.error, "reason", "") or rep.error).strip()
      errors[node_of(rep)] = (reason.splitlines() or [""])[0]
      continue
    site = site_of(rep)
    if site not in problem.sites:  # said, not dropped silently: the reply names no site of ours
      errors[node_of(rep)] = (f"evaluate reply for site {site!r}, which is not one of "
                              f"{list(problem.sites)}: not used")
    elif site in got:  # two SuperNodes with one node config site (the training rounds refuse
      # the second the same way): the metrics written are the first's, and the row says so
      errors[node_of(rep)] = (f"node {node_of(rep)} claims site {site!r}, which node "
                              f"{claimed[site]} already replied for: its metrics are not used")
    else:
      try:
        got[site] = {str(m): float(v) for m, v in rep.content["metrics"].items()}
        claimed[site] = node_of(rep)
      except (KeyError, TypeError, ValueError) as e:  # not plain numbers: no metrics
        errors[node_of(rep)] = f"site {site!r}: malformed evaluate reply ({e})"
  metrics = {f"site/{s}/{m}": v for s in problem.sites if s in got for m, v in got[s].items()}
  missing = [s for s in problem.sites if s not in got]
  if missing:
    print(f"round {r}: per-site evaluation: no metrics from {', '.join(missing)} (no reply "
          f"within round-timeout, or an error)", file=sys.stderr, flush=True)
  return metrics, {**({"site_eval_missing": missing} if missing else {}),
                   **({"site_eval_errors": errors} if errors else {}),
                   "site_eval_bytes_down": payload_bytes(record) * len(msgs),
                   "site_eval_seconds": time.time() - t0}


def _make_server_app():
  from flwr.serverapp import ServerApp  # noqa: PLC0415
  app = ServerApp()

  @app.main()
  def main(grid: Any, context: Any) -> None:
    if secure_aggregation(dict(context.run_config)):
      serve_secagg(grid, context)
    else:
      serve(grid, dict(context.run_config))

  return app


# ---------------------------------------------------------------- SecAgg+ (Flower's workflow)

SECAGG_MAX_WEIGHT = 1000.0  # run config `secagg-max-weight` default (Flower's SecAggPlusWorkflow's)
SECAGG_CLIPPING_RANGE = 8.0  # Flower's defaults, passed explicitly
SECAGG_QUANTIZATION_RANGE = 2**22
SECAGG_MODULUS_RANGE = 2**32
SECAGG_REFUSAL = "jmtl secagg+ refusal"  # marks a site's refusal in the error the server receives


class SecAggRangeError(ValueError):
  """A site's update that Flower's SecAgg+ mod would clip or zero-weight (a wrong mean)."""


def secagg_check(leaves: list[np.ndarray], n_k: float, max_weight: float, clipping_range: float,
                 target_range: int, *, site: str = "?") -> float:
  """Refuses an update whose securely aggregated mean would be silently wrong in Flower 1.42's
  `secaggplus_mod`. The mod (`_collect_masked_vectors`) sends for site k

    q_k = round(n_k / max_weight * target_range),  y_k = clip(delta_k * q_k / target_range,
    -clipping_range, clipping_range)  (float32, as the mod computes it)

  quantised to `target_range` levels, and the server divides sum_k y_k by sum_k q_k /
  target_range. That equals sum_k n_k delta_k / sum_k n_k (up to quantisation) iff no
  coordinate is clipped and q_k >= 1; when n_k > max_weight the mod only logs a warning.
  `leaves`: the float32 arrays the site returns (any shapes); `n_k` >= 0: its example count.
  Returns max_k |y_k| (the largest scaled coordinate, <= clipping_range). Raises
  SecAggRangeError (message starting with SECAGG_REFUSAL, naming the run config key
  `secagg-max-weight` and the value that would fit) when a scaled coordinate is above
  `clipping_range` or not finite, or when n_k > 0 rounds to q_k = 0 (the site's weight lost)."""
  ratio = n_k / max_weight
  q = round(ratio * target_range)
  dq = q / target_range
  if n_k > 0 and q == 0:
    raise SecAggRangeError(
        f"{SECAGG_REFUSAL}: site {site!r}: n_k = {n_k:g} examples / secagg-max-weight "
        f"{max_weight:g} rounds to weight 0 of {target_range} levels: lower the run config key "
        f"secagg-max-weight to <= {n_k * target_range:g} (fed.flower.secagg_max_weight)")
  top = 0.0
  for x in leaves:
    y = np.asarray(x, np.float32) * dq  # the mod's `parameters_multiply` (float32)
    if y.size == 0:
      continue
    if not np.all(np.isfinite(y)):
      raise SecAggRangeError(f"{SECAGG_REFUSAL}: site {site!r}: its update is not finite")
    top = max(top, float(np.max(np.abs(y))))
  if top > clipping_range:
    big = top / dq if dq else 0.0
    raise SecAggRangeError(
        f"{SECAGG_REFUSAL}: site {site!r}: n_k = {n_k:g} examples x max|delta| = {big:.4g} / "
        f"secagg-max-weight {max_weight:g} = {top:.4g} exceeds SecAgg+'s clipping range "
        f"{clipping_range:g}, so the masked mean would be clipped (wrong): raise the run config "
        f"key secagg-max-weight to >= {n_k * big / clipping_range:.4g} "
        f"(fed.flower.secagg_max_weight)")
  return top


def secagg_refusals(failures: list) -> list[str]:
  """The sites' SecAggRangeError messages among a SecAgg+ round's failures (Flower's
  `Exception(Error(code, reason))`, the reason holding the site's exception text)."""
  out = []
  for f in failures:
    err = f.args[0] if isinstance(f, BaseException) and f.args else f
    text = str(getattr(err, "reason", err))
    if SECAGG_REFUSAL in text:
      out.append(text[text.index(SECAGG_REFUSAL):].rstrip("'>"))
  return out


def secagg_max_weight(run_config: dict) -> float:
  """The run config's `secagg-max-weight` (> 0 and finite; absent or 0 = SECAGG_MAX_WEIGHT).
  ValueError (one line) otherwise."""
  given = run_config.get("secagg-max-weight") or SECAGG_MAX_WEIGHT
  try:
    w = float(given)
  except (TypeError, ValueError):
    w = float("nan")
  if not (np.isfinite(w) and w > 0):
    raise ValueError(f"run config key secagg-max-weight must be > 0, got {given!r}")
  return w


def secure_aggregation(run_config: dict) -> bool:
  """Whether the run goes through Flower's SecAgg+ (run config `secure-aggregation`, from
  fed.secure_aggregation; absent = False). Accepts a TOML bool, 0/1 or "true"/"false"."""
  v = run_config.get("secure-aggregation", False)
  return v.strip().lower() in ("1", "true", "yes") if isinstance(v, str) else bool(v)


def secagg_ranges(run_config: dict) -> tuple[float, int]:
  """(clipping_range, quantization_range) of the SecAgg+ workflow: run config
  `secagg-clipping-range` (fed.secagg.clipping_range; absent or 0 = SECAGG_CLIPPING_RANGE) and
  `secagg-quantization-range` (fed.secagg.quantization_range; absent or 0 =
  SECAGG_QUANTIZATION_RANGE). ValueError (one line) for a clipping range that is not finite and
  > 0 or fewer than 2 levels."""
  c = run_config.get("secagg-clipping-range") or SECAGG_CLIPPING_RANGE
  q = run_config.get("secagg-quantization-range") or SECAGG_QUANTIZATION_RANGE
  try:
    c, q = float(c), int(q)
  except (TypeError, ValueError):
    raise ValueError(f"run config keys secagg-clipping-range / secagg-quantization-range must "
                     f"be numbers, got {c!r} / {q!r}") from None
  if not (np.isfinite(c) and c > 0) or q < 2:
    raise ValueError(f"run config keys secagg-clipping-range must be > 0 and "
                     f"secagg-quantization-range >= 2, got {c!r} / {q!r}")
  return c, q


def _secagg_site(context: Any):
  """The Flower `Client` of one SecAgg+ round stage at site `node_config["site"]` (what Flower's
  legacy handler calls `fit` on): `site_round` as `site_train` runs it, the delta leaves and n_k
  returned for `secaggplus_mod` to clip, quantise and mask. Before that, `secagg_check` (with
  the mod's max_weight and ranges from its setup stage) refuses an update the mod would clip:
  the site raises SecAggRangeError, which the server reads from the round's failures. The
  client optimizer state is committed by the reply token as in `site_train` (`set_pending` /
  `commit_pending`; the token goes back in the fit metrics "reply", the applied ones come in
  the fit config "applied")."""
  from flwr.client import NumPyClient  # noqa: PLC0415
  from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: PLC0415
      RECORD_KEY_STATE)

  class _Site(NumPyClient):
    def fit(self, parameters, config):
      import uuid  # noqa: PLC0415
      site = str(context.node_config.get("site", ""))
      problem, update, like, opt_like = _site(context.run_id, site_run_config(context), site)
      k = problem.sites.index(site)
      params = jax.tree.unflatten(jax.tree.structure(like),
                                  [np.asarray(p, np.float32).reshape(np.shape(x))
                                   for p, x in zip(parameters, jax.tree.leaves(like))])
      commit_pending(context.state, str(config.get("applied", "")))
      opt = (from_record(context.state["client_opt"], opt_like) if "client_opt" in context.state
             else problem.client_tx.init(params))
      r = int(config["round"])
      delta, opt1, metrics = site_round(problem, update, params, opt, k, r)
      # 0-d leaves go as shape (1,): Flower 1.42's SecAgg+ unmasking skips the offset and the
      # weight division for 0-d arrays (it rebinds them in a loop), returning ~ 2 x 8 for them.
      leaves = [np.atleast_1d(np.asarray(d, np.float32)) for d in jax.tree.leaves(delta)]
      n_k = int(round(metrics["examples"]))
      # The mod's parameters of this round (its setup stage stored them in the Context).
      mod = context.state.config_records.get(RECORD_KEY_STATE)
      if mod is None or "max_weight" not in mod:
        raise SecAggRangeError(f"{SECAGG_REFUSAL}: site {site!r}: no SecAgg+ setup state "
                               f"(the run config's secure-aggregation is on at the server?)")
      secagg_check(leaves, n_k, float(mod["max_weight"]), float(mod["clipping_range"]),
                   int(mod["target_range"]), site=site)  # raises: the round stops
      token = f"{site}.{r}.{uuid.uuid4().hex}"
      set_pending(context.state, token, client_opt=to_record(opt1))
      return leaves, n_k, {"site": k, "reply": token, **metrics}

  return _Site().to_client()


def secagg_train(msg: Any, context: Any) -> Any:
  """A SecAgg+ round stage at a site (`client_app` when the run config's `secure-aggregation`
  is on): Flower's `secaggplus_mod` (Bell et al. 2020, "Secure single-server aggregation with
  (poly)logarithmic complexity", as Flower implements it) answers the setup, key-sharing and
  unmasking stages itself and calls `_secagg_site`'s `fit` (through Flower's legacy message
  handler) for the masked-vector stage."""
  from flwr.client.message_handler.message_handler import (  # noqa: PLC0415
      handle_legacy_message_from_msgtype)
  from flwr.client.mod import secaggplus_mod  # noqa: PLC0415
  return secaggplus_mod(msg, context, lambda m, c: handle_legacy_message_from_msgtype(
      client_fn=_secagg_site, message=m, context=c))


def serve_secagg(grid: Any, context: Any) -> None:
  """The server's rounds through Flower's SecAgg+ workflow (`server_app` when the run config's
  `secure-aggregation` is on): `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares = S,
  reconstruction_threshold = S - 1))` (Flower needs S >= 3) around a legacy Strategy that
  applies jmtl's server optimizer to the securely aggregated mean delta (the workflow's weighted
  mean: sum_k n_k delta_k / sum_k n_k, from quantised values) and writes the same rounds.jsonl
  (without bytes: the masked payloads are the workflow's) and checkpoints (`_Server`: the
  workdir lock, resume). max_weight is the run config's `secagg-max-weight`, clipping range and
  levels `secagg_ranges`, modulus 2**32 (Flower's). A round with a site's refusal
  (`secagg_check`) or whose weight factors sum_k q_k reach 2**32 is written with `applied` 0
  and `error`, nothing is applied, and the run ends (RuntimeError); sites x levels at or above
  2**32 (the quantised sum would wrap) are refused (ValueError). The sites' client optimizer
  states follow the reply tokens of `site_train` (a site's token is recorded as applied when
  the round's secure sum included it).

  Sites that are gone: each round takes the connected sites after waiting at most
  `round-timeout` (round 1: `wait-sites`) for all S, and each SecAgg+ stage waits at most
  `round-timeout` for replies; a node that shared no keys is left out of the unmasking (not
  "dead"). A round the workflow halts (fewer than S - 1 sites answered a stage) is written as an
  empty round (`end_round`: applied 0, `error` naming the stage) and counts towards
  `max-empty-rounds` (EmptyRoundsError, as `serve`). A round's `loss` is the n_k-weighted mean
  of the sites' `site_loss` (their FitRes metrics, in the clear as n_k is)."""
  from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: PLC0415
  from flwr.server import LegacyContext, ServerConfig  # noqa: PLC0415
  from flwr.server.strategy import Strategy  # noqa: PLC0415
  from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: PLC0415
  from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD  # noqa: PLC0415
  from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: PLC0415

  run_config = dict(context.run_config)
  max_weight = secagg_max_weight(run_config)
  clipping_range, levels = secagg_ranges(run_config)
  timeout = float(run_config.get("round-timeout", 60.0))
  wait_sites = max(timeout, float(run_config.get("wait-sites", 120.0)))
  most = int(run_config.get("max-empty-rounds", MAX_EMPTY_ROUNDS))

  class _Strategy(Strategy):
    def __init__(self, server: _Server):
      self.server, self.problem, self.t0 = server, server.problem, time.time()
      self.empty = 0  # consecutive rounds without an applied secure sum
      self.claimants: dict[str, str] = {}  # node id -> the site it claimed after its owner

    def _leaves(self):
      return ndarrays_to_parameters([np.asarray(x) for x in jax.tree.leaves(self.server.params)])

    def initialize_parameters(self, client_manager):
      return self._leaves()

    def configure_fit(self, server_round, parameters, client_manager):
      S = len(self.problem.sites)
      self.t0 = time.time()
      # Every connected site, after waiting at most round-timeout for all S (Flower's
      # `sample(S, S)` blocks up to a day while a SuperNode is gone); fewer than the
      # reconstruction threshold halt the round's setup stage (`_Workflow`: a line, applied 0).
      client_manager.wait_for(S, timeout=wait_sites if server_round == 1 else timeout)
      clients = list(client_manager.all().values())
      # A node refused as a second claimant of a site is left out while the site's owner is
      # connected (it takes the site over when the owner is gone, as in `_round`).
      owners = {site: node for node, site in self.server.node_sites.items()}
      connected = {str(c.node_id) for c in clients}
      clients = [c for c in clients
                 if not (str(c.node_id) in self.claimants
                         and owners.get(self.claimants[str(c.node_id)]) in connected)]
      r = self.server.start + server_round - 1  # a resumed run continues at its round
      applied = " ".join(self.server.applied_replies[k]
                         for k in sorted(self.server.applied_replies))
      return [(c, FitIns(self._leaves(), {"round": r, "applied": applied})) for c in clients]

    def refuse(self, server_round, reasons, failures):
      """A round a site refused (`secagg_check`) or whose weights would wrap: nothing applied;
      the line (applied 0, `error`) goes to rounds.jsonl, and the run stops (RuntimeError)."""
      r = self.server.start + server_round
      msg = "; ".join(reasons)
      _append(self.server.rounds_path, {
          "round": r, "secure_aggregation": "secagg+", "sites": [], "failures": len(failures),
          "applied": 0, "max_weight": max_weight, "error": msg,
          "seconds": time.time() - self.t0})
      print(f"round {r}: secure aggregation refused, nothing applied: {msg}", file=sys.stderr,
            flush=True)
      raise RuntimeError(f"round {r}: secure aggregation refused: {msg}")

    def aggregate_fit(self, server_round, results, failures):
      # (A site's refusal never gets here: `_Workflow` stops the round when the masked vectors
      # come in, the stage whose `fit` raised it.) The mod's weight factors
      # q_k = round(n_k / max_weight * Q) are summed mod 2**32 with the masks; a sum at or
      # above 2**32 wraps (a wrong mean). n_k is in the clear (FitRes).
      q = sum(round(res.num_examples / max_weight * levels) for _, res in results)
      if q >= SECAGG_MODULUS_RANGE:
        self.refuse(server_round, [
            f"the sites' weights sum_k round(n_k / secagg-max-weight {max_weight:g} x "
            f"{levels}) = {q} reach the modulus 2**32 and wrap: raise the run config key "
            f"secagg-max-weight (fed.flower.secagg_max_weight)"], failures)
      if self._claimed_twice(server_round, results, failures):
        return self._leaves(), {}
      like = self.server.params
      mean = parameters_to_ndarrays(results[0][1].parameters)  # every result holds the sum
      delta = jax.tree.unflatten(jax.tree.structure(like),
                                 [np.asarray(m, np.float32).reshape(np.shape(x))
                                  for m, x in zip(mean, jax.tree.leaves(like))])
      self.server.apply(delta)
      self.server.applied_replies.update({
          int(res.metrics["site"]): str(res.metrics["reply"]) for _, res in results
          if "site" in res.metrics and "reply" in res.metrics})
      r = self.server.start + server_round
      # The round's loss: the n_k-weighted mean of the sites' site_loss (in the clear in their
      # FitRes metrics, as n_k is), as a plain round's `loss`.
      losses = [(float(res.num_examples), float(res.metrics["site_loss"])) for _, res in results
                if "site_loss" in res.metrics]
      n = sum(w for w, _ in losses)
      row = {"round": r, "secure_aggregation": "secagg+", "max_weight": max_weight,
             "sites": sorted(self.problem.sites[int(res.metrics["site"])] for _, res in results
                             if "site" in res.metrics),
             "failures": len(failures), "applied": 1,
             "loss": _finite(sum(w * v for w, v in losses) / n) if n > 0 else None,
             "seconds": time.time() - self.t0}
      self.server.end_round(r, row)
      self.empty = 0
      return self._leaves(), {}

    def _claimed_twice(self, server_round, results, failures) -> bool:
      """Two nodes whose replies claim one site (one node config `site` on two SuperNodes):
      the secure sum holds both and no single update can be taken out of it, so the round is
      written as an empty round (applied 0, `errors` naming each claimant, as `_round` does)
      and counts towards max-empty-rounds; the site's owner (the node its last applied round
      took, else the lowest node id) keeps it, the others are left out of the next rounds
      while it is connected (`configure_fit`). Returns whether the round was refused."""
      by_site: dict[str, list[str]] = {}
      for proxy, res in results:
        if "site" in res.metrics:
          by_site.setdefault(self.problem.sites[int(res.metrics["site"])], []).append(
              str(proxy.node_id))
      owners = {site: node for node, site in self.server.node_sites.items()}
      errors = {}
      for site, nodes in by_site.items():
        if len(nodes) < 2:
          continue
        owner = owners.get(site) if owners.get(site) in nodes else min(nodes, key=int)
        self.server.node_sites[owner] = site
        for node in nodes:
          if node != owner:
            self.claimants[node] = site
            errors[node] = (f"node {node} claims site {site!r}, which node {owner} also answered "
                            f"for: a secure sum cannot leave one out, so the round is not "
                            f"applied and node {node} is left out while node {owner} answers "
                            f"(give each SuperNode its own node config site)")
      if not errors:
        for proxy, res in results:
          if "site" in res.metrics:
            self.server.node_sites[str(proxy.node_id)] = self.problem.sites[
                int(res.metrics["site"])]
        return False
      r = self.server.start + server_round
      for msg in errors.values():
        print(f"round {r}: {msg}", file=sys.stderr, flush=True)
      self.server.end_round(r, {
          "round": r, "secure_aggregation": "secagg+", "max_weight": max_weight, "sites": [],
          "failures": len(failures), "applied": 0, "loss": None, "errors": errors,
          "seconds": time.time() - self.t0})
      self.empty += 1
      _stop_if_empty(self.server, self.empty, r, most)
      return True

    def halted(self, server_round, stage, state):
      """A round Flower's workflow halted (too few sites answered a stage: SecAgg+ needs
      `reconstruction_threshold` of them): nothing applied; the round is written as a plain
      round without replies (`end_round`: evaluation, checkpoint, the line with applied 0 and
      `error`) and counts towards max-empty-rounds."""
      r = self.server.start + server_round
      active = len(getattr(state, "active_node_ids", ()) or ())
      threshold = getattr(state, "threshold", 0) or S - 1
      msg = (f"secure aggregation halted at its {stage} stage: {active} of {S} sites active, "
             f"SecAgg+ needs {threshold}; nothing applied")
      print(f"round {r}: {msg}", file=sys.stderr, flush=True)
      self.server.end_round(r, {
          "round": r, "secure_aggregation": "secagg+", "max_weight": max_weight, "sites": [],
          "failures": len(getattr(state, "failures", ()) or ()), "applied": 0, "loss": None,
          "error": msg, "seconds": time.time() - self.t0})
      self.empty += 1
      _stop_if_empty(self.server, self.empty, r, most)

    def configure_evaluate(self, server_round, parameters, client_manager):
      return []

    def aggregate_evaluate(self, server_round, results, failures):
      return None, {}

    def evaluate(self, server_round, parameters):
      return None

  class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, stopping a round that a site refused (`secagg_check`) right
    after the masked vectors come in, whether or not enough sites are left to unmask."""

    def __call__(self, grid, context):
      """Flower's `SecAggPlusWorkflow.__call__` (its four stages in order), telling the strategy
      when a stage halts the round (Flower's only logs it and goes on to the next round)."""
      from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (  # noqa: PLC0415
          WorkflowState)
      state = WorkflowState()
      for name, step in (("setup", self.setup_stage), ("share-keys", self.share_keys_stage),
                         ("collect-masked-vectors", self.collect_masked_vectors_stage),
                         ("unmask", self.unmask_stage)):
        if not step(grid, context, state):
          cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
          context.strategy.halted(int(cfg[WorkflowKey.CURRENT_ROUND]), name, state)
          return

    def share_keys_stage(self, grid, context, state):
      ok = super().share_keys_stage(grid, context, state)
      # Flower 1.42 unmasks with every node sampled at setup that sent no masked vector as
      # "dead", asking the others for its key shares; a node that did not answer the setup or
      # key-sharing stage (a SuperNode gone, or one the SuperLink still lists) left them none
      # and is in no one's masks, so the sites' `_unmask` raised KeyError and the round halted.
      # The nodes that shared their keys are the ones the unmasking must account for.
      state.sampled_node_ids = set(state.active_node_ids)
      return ok

    def collect_masked_vectors_stage(self, grid, context, state):
      ok = super().collect_masked_vectors_stage(grid, context, state)
      reasons = secagg_refusals(state.failures)
      if reasons:
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        context.strategy.refuse(int(cfg[WorkflowKey.CURRENT_ROUND]), reasons, state.failures)
      return ok

  problem = load_problem(run_config)
  if problem.mode == "async":  # refused in one line (flower_async runs no SecAgg+)
    from jmtl.federated import flower_async  # noqa: PLC0415
    flower_async.check_problem(problem, run_config)
  S = len(problem.sites)
  if S < 3:
    raise ValueError(f"Flower's SecAgg+ needs at least 3 sites, got {S}")
  if S * levels >= SECAGG_MODULUS_RANGE:  # the quantised sum would wrap
    most = (SECAGG_MODULUS_RANGE - 1) // levels
    raise ValueError(f"Flower's SecAgg+ sums at most {most} sites' {levels}-level values "
                     f"below its modulus 2**32, got {S}")
  if problem.holds is not None and not np.all(np.asarray(problem.holds) == 1):
    raise ValueError("Flower's SecAgg+ averages every leaf over every site: each site must "
                     "hold every task (a head's mean over its holders is not a secure sum)")
  server = _Server(problem, run_config, _FastGrid(grid))
  try:
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=server.rounds - server.start),
                           strategy=_Strategy(server))
    if server.rounds > server.start:
      DefaultWorkflow(fit_workflow=_Workflow(
          num_shares=S, reconstruction_threshold=S - 1, max_weight=max_weight,
          clipping_range=clipping_range, quantization_range=levels,
          modulus_range=SECAGG_MODULUS_RANGE, timeout=timeout))(_FastGrid(grid), legacy)
  finally:
    server.close()


# ---------------------------------------------------------------- submitting a run

def app_pyproject(name: str, config: dict[str, Any], *, server: str = "server_app",
                  client: str = "client_app") -> str:
  """The pyproject.toml of a Flower app named `name` whose ServerApp / ClientApp are
  `jmtl.federated.flower:<server>` / `:<client>`, with `[tool.flwr.app.config]` = `config`
  (str, int and float values)."""
  def value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)
  lines = "".join(f"{k} = {value(v)}\n" for k, v in config.items())
  return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "jmtl federated rounds on Flower"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "jmtl"

[tool.flwr.app.components]
serverapp = "jmtl.federated.flower:{server}"
clientapp = "jmtl.federated.flower:{client}"

[tool.flwr.app.config]
{lines}"""


APP_PYPROJECT = app_pyproject("jmtlfederated", {
    "problem": "jmtl.federated.flower:jmtl_problem", "config": "", "overrides": "",
    "workdir": "", "rounds": 0, "round-timeout": 600.0, "wait-sites": 600.0,
    "max-empty-rounds": MAX_EMPTY_ROUNDS, "submission": "", "secure-aggregation": False,
    "secagg-max-weight": SECAGG_MAX_WEIGHT, "secagg-clipping-range": SECAGG_CLIPPING_RANGE,
    "secagg-quantization-range": SECAGG_QUANTIZATION_RANGE})


def write_app(directory: str) -> str:
  """Writes the Flower app (pyproject.toml naming `server_app` / `client_app`) that `flwr run`
  packs and ships; returns `directory`. Its code is jmtl itself, installed on every machine."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "pyproject.toml"), "w", encoding="utf-8") as f:
    f.write(APP_PYPROJECT)
  with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
    f.write("jmtl federated rounds on Flower (jmtl.federated.flower)\n")
  return directory


# Characters an encoded override keeps as they are: all printable ASCII but the quotes, the
# backslash and the percent sign, which Flower's `--run-config` parser cannot take inside a
# quoted value (its pattern is "[^"]*" or '[^']*', no escapes).
_OVERRIDE_SAFE = " !#$&()*+,-./:;<=>?@[]^_`{|}~"


def encode_overrides(overrides: list[str]) -> str:
  """The run config value `overrides`: the `--config.KEY=VALUE` arguments joined as a shell
  line (`shlex.quote`), then percent-encoded (`urllib.parse.quote`) outside `_OVERRIDE_SAFE`,
  so quotes in a value (e.g. `--config.tasks=('sst2',)`) survive `flwr run --run-config`."""
  import shlex  # noqa: PLC0415
  import urllib.parse  # noqa: PLC0415
  return urllib.parse.quote(" ".join(shlex.quote(o) for o in overrides), safe=_OVERRIDE_SAFE)


def decode_overrides(text: str) -> list[str]:
  """`encode_overrides`' inverse (a plain shell line without '%' decodes to itself)."""
  import shlex  # noqa: PLC0415
  import urllib.parse  # noqa: PLC0415
  return shlex.split(urllib.parse.unquote(text))


def run_config_text(items: dict) -> str:
  """`flwr run --run-config` text: space-separated key=value, values as TOML (JSON-quoted)."""
  return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def check_workdir(config: Any, workdir: str) -> int | None:
  """Refuses (ConfigError, one line) a `workdir` visible here whose lock a running jmtl holds
  (a Flower server still running there: the message names the workdir and the holder,
  `workdir.check_unlocked`), so nothing is submitted that its server would refuse; when it
  holds a checkpoint, refuses it unless it is this config's Flower run (naming the keys that
  differ, as `jmtl federated` does): the server then resumes from it. Returns the round of its
  latest complete checkpoint (None: none here). A workdir on another machine is checked by the
  server."""
  from etils import epath  # noqa: PLC0415
  from jmtl.config import ConfigError  # noqa: PLC0415
  from jmtl.train import checkpoint as checkpoint_lib  # noqa: PLC0415
  from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
  workdir_lib.check_unlocked(epath.Path(os.path.abspath(workdir)))
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    found = ckpt.read_latest_meta()
  finally:
    ckpt.close()
  if found is None:
    return None
  step, meta = found
  if meta.get("backend") != "flower":
    raise ConfigError(f"--workdir {workdir} holds a checkpoint at round {step} of a `jmtl "
                      f"federated` simulation, not of a Flower run: use a new workdir")
  workdir_lib.check_config(meta, config, workdir=epath.Path(workdir), step=step)
  return int(step)


class RunError(RuntimeError):
  """The followed Flower run ended before its last round, or fed.flower.wait_s ran out first
  (`jmtl federated` prints it as one line `jmtl: error: ...` and exits 1)."""


def run_status(flwr: str, superlink: str, run_id: Any) -> tuple[str, str] | None:
  """(status, details) of Flower run `run_id` as `flwr ls [superlink] --run-id ID --format
  json` reports it (status: "pending", "starting", "running", "finished:completed",
  "finished:failed", "finished:stopped"); None when the SuperLink does not answer."""
  import subprocess  # noqa: PLC0415
  args = [flwr, "ls"] + ([superlink] if superlink else []) + [
      "--run-id", str(run_id), "--format", "json"]
  try:
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    runs = json.loads(out.stdout).get("runs") or []
  except (subprocess.TimeoutExpired, ValueError, AttributeError, OSError):
    return None
  for run in runs:
    if str(run.get("run-id")) == str(run_id):
      return str(run.get("status", "")), str(run.get("status-details") or "")
  return None


def saved_round(workdir: str) -> int | None:
  """The round of the latest complete checkpoint in `workdir` (None: none, or the workdir is
  not visible here)."""
  from jmtl.train import checkpoint as checkpoint_lib  # noqa: PLC0415
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  try:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  except Exception:  # noqa: BLE001  (a hint only: an unreadable directory is "none")
    return None
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def resume_hint(workdir: str) -> str:
  """What submitting the run again does: it resumes from the latest checkpoint only if one
  exists (the server saves every fed.checkpoint_every rounds, default 5, at evaluation rounds
  and at the last: a run stopped early may have saved none)."""
  c = saved_round(workdir)
  if c is not None:
    return f"submit again to resume from its last checkpoint (round {c})"
  where = "in " + workdir if os.path.isdir(workdir) else "visible here"
  return (f"no checkpoint {where} (the server saves every fed.checkpoint_every rounds and at "
          f"the last): submitting again resumes from the last checkpoint only if the server "
          f"saved one, else it starts at round 1")


def follow(workdir: str, rounds: int, run_id: Any, *, submission: str, resumed: int | None,
           wait_s: float, status: Callable[[], tuple[str, str] | None],
           echo: Callable[[str], None] = print, poll_s: float = 0.2,
           status_every_s: float = 5.0, superlink: str = "") -> int:
  """Follows the rounds.jsonl lines that THIS run's server writes until round `rounds`.

  A line counts only once `workdir`/flower.json names `submission` (the run config key the
  server writes there after it dropped the lines past its checkpoint, see `_Server`) and its
  round is past the round the server restored (flower.json's `resumed_from`, printed as
  "resuming from round c"; a server that does not write it: `resumed`, the latest complete
  checkpoint's round when submitted; the killed run's later lines are dropped and redone by
  the server). After the last round it waits (within `wait_s`) until the server released the
  workdir's lock, so a command right after this one finds the workdir free; so does a finished
  run submitted again (its server starts, writes eval.json again, ends). `status()` (every
  status_every_s seconds: `run_status`) tells when the Flower run has finished. Returns the
  last round seen.
  RunError (one line) when the run finished before round `rounds` or `wait_s` ran out; it
  names the command that shows the server's log (`flwr log RUN_ID SUPERLINK`, `superlink` =
  fed.flower.superlink, the Flower connection; '' = Flower's default connection)."""
  from etils import epath  # noqa: PLC0415
  from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
  path, meta = os.path.join(workdir, "rounds.jsonl"), os.path.join(workdir, "flower.json")
  start = resumed or 0
  last, deadline, asked, ended = start, time.time() + float(wait_s), 0.0, None
  started = False  # this submission's server has written flower.json

  def server_meta() -> dict | None:
    try:
      with open(meta, encoding="utf-8") as f:
        got = json.load(f)
      return got if got["run_config"].get("submission") == submission else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return None

  def ours() -> bool:
    return server_meta() is not None

  def read() -> None:
    nonlocal last, start, started
    if not started:
      got = server_meta()
      if got is None:
        return
      started = True
      # The round the server restored (it may be older than the checkpoint seen at submission,
      # when a newer one does not read); a server that does not say: the one seen then.
      start = got["resumed_from"] if "resumed_from" in got else resumed
      if start is not None:
        echo(f"resuming from round {start}")
      start = int(start or 0)
      last = start
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:  # a line being written
        break
      if int(row["round"]) <= last:
        continue
      last = int(row["round"])
      missing = ""  # `evaluate_sites`: the sites without metrics, and why (first error)
      if row.get("site_eval_missing"):
        errs = sorted(set((row.get("site_eval_errors") or {}).values()))
        why = ""
        if errs:
          more = f" and {len(errs) - 1} other error(s)" if len(errs) > 1 else ""
          why = f": {errs[0]}{more}; see the line's site_eval_errors"
        missing = f" (no site metrics from {','.join(row['site_eval_missing'])}{why})"
      if "sites" in row:
        loss = row.get("loss")
        what = (f"loss {loss:.6g}" if isinstance(loss, (int, float)) else
                "nothing applied" if not row.get("applied", 1) else "loss not finite")
        echo(f"round {row['round']}: {what} sites {','.join(row['sites']) or '-'} "
             f"{row.get('seconds', 0.0):.1f} s"
             + (f" errors {row['errors']}" if row.get("errors") else "")
             + (f" error: {row['error']}" if row.get("error") else "") + missing)
      else:  # round 0: the evaluation of the initial model
        echo(f"round {row['round']}: evaluated{missing}")

  # A finished run submitted again (`resumed` = rounds) waits for its new server all the same:
  # until flower.json names this submission (or the run ends), then for the workdir's lock.
  while last < rounds or not started:
    read()
    if started and last >= rounds:
      break
    if ended is not None:
      st, details = ended
      raise RunError(f"the Flower run {run_id} ended ({st}) after round {max(last, start)} of "
                     f"{rounds}" + (f" ({' '.join(details.split())[:300]})" if details else "")
                     + f"; its server's log: `{' '.join(['flwr', 'log', str(run_id), superlink]).strip()}`; "
                     + resume_hint(workdir))
    now = time.time()
    if now >= deadline:
      got = status()
      raise RunError(f"stopped waiting for the Flower run {run_id} after fed.flower.wait_s = "
                     f"{float(wait_s):g} s at round {max(last, start)} of {rounds} (run status: "
                     f"{got[0] if got else 'unknown'}); its server writes {workdir}")
    if now - asked >= status_every_s:
      asked = now
      got = status()
      if got is not None and got[0].startswith("finished"):
        if got[0] == "finished:completed" and not ours():  # its workdir is not visible here
          echo(f"the Flower run {run_id} ended ({got[0]}); its server wrote {workdir} on its "
               f"own machine")
          return last
        ended = got  # read the file once more: the last lines may have landed meanwhile
        continue
    time.sleep(poll_s)
  # The server writes eval.json after the last line, then closes its checkpointer and releases
  # the workdir's lock: a command right after this one (`jmtl eval`) finds the workdir free.
  while (ours() and workdir_lib._is_locked(epath.Path(workdir))  # noqa: SLF001
         and time.time() < deadline):
    time.sleep(poll_s)
  return last


LOCAL_SIMULATION = ":local:"  # the address of Flower's local simulation runtime connection


def check_connection(name: str) -> None:
  """Refuses, before anything is submitted, a `fed.flower.superlink` connection that is Flower's
  local simulation runtime (address ":local:" in $FLWR_HOME/config.toml, FLWR_HOME default
  ~/.flwr; the connection "local" that `flwr` writes when there is no config.toml, and its
  default): it starts a SuperLink with simulated SuperNodes of its own, none of which is a jmtl
  site (no node config `site`), so every round would fail. ConfigError (one line); an unknown
  connection or an unreadable file is left to `flwr run`, whose message names it."""
  import tomllib  # noqa: PLC0415
  from jmtl.config import ConfigError  # noqa: PLC0415
  home = os.environ.get("FLWR_HOME") or os.path.join(os.path.expanduser("~"), ".flwr")
  path = os.path.join(home, "config.toml")
  try:
    with open(path, "rb") as f:
      links = tomllib.load(f).get("superlink", {})
  except FileNotFoundError:
    links = {"default": "local", "local": {"address": LOCAL_SIMULATION}}  # what flwr writes
  except (OSError, tomllib.TOMLDecodeError):
    return
  conn = name or str(links.get("default", ""))
  entry = links.get(conn)
  if isinstance(entry, dict) and entry.get("address") == LOCAL_SIMULATION:
    raise ConfigError(
        f"config key 'fed.flower.superlink' = {name!r}: Flower's connection {conn!r} "
        f"({path}) is its local simulation runtime (address {LOCAL_SIMULATION}), whose "
        f"simulated SuperNodes are not jmtl sites; name a connection to your SuperLink there "
        f"(address host:port, root-certificates; README \"Real sites with Flower\")")


def submit(config: Any, config_path: str, overrides: list[str], workdir: str, *,
           echo: Callable[[str], None] = print) -> dict:
  """`jmtl federated` with fed.backend = flower: submits the run (`flwr run`) to the SuperLink
  connection fed.flower.superlink; the ServerApp writes `workdir` on the SuperLink's machine.
  `config_path` (absolute) and `overrides` ("--config.KEY=VALUE") must name the same config on
  every machine. With fed.flower.wait_s > 0, follows this run's lines of rounds.jsonl until
  round fed.rounds (`follow`; a resumed run: only the rounds past the checkpoint, after
  "resuming from round c") and asks the SuperLink for the run's status (`run_status`).
  Returns {"run_id", "workdir", "rounds" (the last round seen)}. A workdir with a checkpoint
  of this config's Flower run is resumed by the server (`check_workdir` refuses another run's
  here when the workdir is visible). ConfigError (one line) when `flwr` is missing or the
  SuperLink refuses the run; RunError (one line) when the run ended before its last round
  or wait_s ran out first."""
  import shutil  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import tempfile  # noqa: PLC0415
  from jmtl.config import ConfigError  # noqa: PLC0415

  flwr = shutil.which("flwr", path=os.pathsep.join(
      [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
  if flwr is None:
    raise ConfigError("config key 'fed.backend' = 'flower' needs Flower's `flwr` command "
                      "(pip install 'jmtl[flower]')")
  fed = config.fed
  if fed.secure_aggregation:
    from jmtl.federated import sites as sites_lib  # noqa: PLC0415
    partial = [s.name for s in sites_lib.sites_from_config(config)
               if set(s.tasks) != set(config.tasks)]
    if partial:
      raise ConfigError(f"config key 'fed.secure_aggregation' with fed.backend = 'flower' needs "
                        f"every site to hold every task (Flower's SecAgg+ averages each leaf "
                        f"over all sites); fed.sites {partial} hold only some")
  resumed = check_workdir(config, workdir)
  check_connection(str(fed.flower.superlink))
  submission = f"{time.time_ns():x}-{os.getpid()}"  # names this submission in flower.json
  items = {"problem": "jmtl.federated.flower:jmtl_problem",
           "config": os.path.abspath(config_path),
           "overrides": encode_overrides(overrides),
           "workdir": os.path.abspath(workdir), "rounds": int(fed.rounds),
           "round-timeout": float(fed.flower.round_timeout),
           "wait-sites": float(fed.flower.wait_sites),
           "max-empty-rounds": int(fed.flower.max_empty_rounds), "submission": submission,
           "secure-aggregation": bool(fed.secure_aggregation),
           "secagg-max-weight": float(fed.flower.secagg_max_weight),
           "secagg-clipping-range": float(fed.secagg.clipping_range),
           "secagg-quantization-range": int(fed.secagg.quantization_range)}
  with tempfile.TemporaryDirectory() as tmp:
    args = [flwr, "run", write_app(tmp)] + ([fed.flower.superlink] if fed.flower.superlink
                                            else [])
    args += ["--run-config", run_config_text(items), "--format", "json"]
    try:
      out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
      raise ConfigError(f"config key 'fed.flower.superlink': `flwr run` got no answer from the "
                        f"SuperLink in 300 s ({e})") from None
  try:
    answer = json.loads(out.stdout)
  except ValueError:
    answer = {"success": False, "error-message": (out.stdout + out.stderr).strip()}
  if not answer.get("success"):
    # Flower's message: notes and warnings first, the error last (its last paragraph).
    msg = " ".join(str(answer.get("error-message", "")).strip().split("\n\n")[-1].split())
    raise ConfigError(f"config key 'fed.flower.superlink' = {fed.flower.superlink!r}: flwr run "
                      f"failed: {msg[:400]}")
  run_id = answer.get("run-id")
  echo(f"submitted Flower run {run_id}; its server writes {items['workdir']}")
  last = -1
  if float(fed.flower.wait_s) > 0:
    last = follow(items["workdir"], int(fed.rounds), run_id, submission=submission,
                  resumed=resumed, wait_s=float(fed.flower.wait_s), echo=echo,
                  status=lambda: run_status(flwr, fed.flower.superlink, run_id),
                  superlink=str(fed.flower.superlink))
  return {"run_id": run_id, "workdir": items["workdir"], "rounds": max(last, 0)}


# The apps the Flower app's pyproject names (`[tool.flwr.app.components]`).
client_app = _make_client_app()
server_app = _make_server_app()
