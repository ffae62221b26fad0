"""Everything the config alone can check, run by the CLI before any command does work.

`run(config, command, workdir)` validates and completes the config and builds what needs only
the config, files and registries, so that a user mistake stops the command in well under a second
with one `ConfigError` line naming the key, instead of minutes later (or as a traceback):

- types, choices, ranges and cross-key rules declared in `jmtl.defaults.KEYS`;
- the mesh against `jax.device_count()` (built, no arrays) and its logical-axis rules; global
  and evaluation batches divisible by the batch shards; with `data.mixing = "mixed"` every task
  gets a multiple of the batch shards where the config alone fixes the rows (uniform and
  explicit mixtures), and room for one at least otherwise;
- the tasks (registry) and the optimizer (`jmtl.optim.build`, no arrays);
- `train.val_metric` names "mean", "" or "<task>/<metric>" of a task in `tasks`;
- the data files of the splits a run reads (not for `bench`), `data.tokenizer` loads (a vocab
  that is not UTF-8 is named), `model.init_from` holds a BERT checkpoint (`config.json` +
  `model.safetensors`) whose architecture matches `model.*`, `model.init_layers` and the
  tokenizer's vocabulary;
- `jmtl sweep`: the `sweep.*` keys (`jmtl.study.sweep.check_sweep_config`);
- `jmtl data prepare` (command "prepare"): everything above but the data files and the
  tokenizer (it makes the TFDS datasets the files check would miss);
- the workdir (`jmtl.train.workdir.preflight`): not a file; `eval` needs its checkpoints.

Layering: this module sits above study/bench/train (it imports them to ask them), below the CLI.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from jmtl import config as config_lib
from jmtl.config import ConfigError

COMMANDS = ("train", "eval", "data", "sweep", "bench", "prepare", "compile", "federated")
CHECKPOINT_FILES = ("config.json", "model.safetensors")

# Commands that join a multi-host run when `dist.initialize` is set.
DISTRIBUTED_COMMANDS = ("train", "eval", "federated")
# Config keys each process of a multi-host run may set for itself: its own id, its own spelling
# of process 0's address (`localhost:1234` on host 0, `host0:1234` elsewhere), its console
# display and how long it waits for the others to join. None changes what is computed; every
# other key must be the same on all processes (the roll call and `check_same_config`).
PER_PROCESS_KEYS = ("dist.process_id", "dist.coordinator_address", "train.progress",
                    "dist.initialization_timeout_s")
# The keys `jmtl data prepare` reads (jmtl.data.prepare); only their values are checked for it.
PREPARE_KEYS = ("tasks", "data.dir", "data.tfds_dir", "data.tfds_download_dir",
                "data.tfds_manual_dir")


def run(config: ml_collections.ConfigDict, command: str, workdir: str | None, *,
        device_count: int | None = None) -> ml_collections.ConfigDict:
  """Checks `config` for `command` (one of COMMANDS) with run directory `workdir` (None for
  data/bench/compile); returns the config completed with defaults. Raises ConfigError (one line
  naming the key, path or file) on the first problem; reads files but writes nothing.

  `device_count`: the devices the mesh is checked against (default: `jax.device_count()`);
  `jmtl compile --topology` passes the target topology's count, whose devices need not exist
  here (the mesh is then an `AbstractMesh`). `bench` and `compile` read no data files.

  Multi-host (`dist.initialize`: train, eval, federated): the processes join first, check that they
  run the same config, and agree on the outcome of the checks, so that a mistake one host sees
  stops every process with one line."""
  if command not in COMMANDS:
    raise ValueError(f"preflight: unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  if command == "prepare":  # reads only these keys: the training checks must not block it
    return config_lib.validate(config, check_files=False, keys=PREPARE_KEYS)
  federated = command == "federated" or (
      command in ("eval", "data", "bench") and bool(config.get("fed", {}).get("sites")))
  files = command not in ("bench", "prepare", "compile")
  joined = False
  keys_only = config_lib.validate(config, check_files=False) if (
      command in DISTRIBUTED_COMMANDS) else None
  if keys_only is not None and keys_only.dist.initialize:
    # Join first (keys only checked), so that every later mistake, even one that only one
    # host sees (a missing file), is agreed on: every process stops with one line.
    joined = _join(keys_only)
  try:
    config = _checks(config, command, workdir, device_count, federated, files)
  except Exception:
    if joined:
      _agree_failed(True)
    raise
  if joined and _agree_failed(False):
    raise ConfigError("another process of this multi-host run failed its checks (its own "
                      "error line says why); nothing was started")
  # Last, and by every process together: reading a workdir's checkpoints through Orbax is a
  # collective on several processes (it waits at barriers), so it comes after the agreement.
  if workdir is not None and command in ("train", "eval", "sweep", "federated"):
    _workdir(config, workdir, "train" if command == "federated" else command)
  return config


def _agree_failed(failed: bool) -> bool:
  """Whether any process of a multi-host run failed its preflight (a collective)."""
  from jmtl.parallel import distributed  # noqa: PLC0415
  return bool(distributed.agree_max(int(failed)))


def _checks(config: ml_collections.ConfigDict, command: str, workdir: str | None,
            device_count: int | None, federated: bool, files: bool) -> ml_collections.ConfigDict:
  """The checks of `run` (after joining a multi-host run)."""
  import jax  # noqa: PLC0415  (device count; importing jax is the slow part of a preflight)

  config = config_lib.validate(config, check_files=files)
  if not federated:
    config_lib.check_mesh(config, jax.device_count() if device_count is None else device_count)
  tasks = _tasks(config)
  _optimizer(config)
  shards = _federated(config, jax.device_count()) if federated else _mesh(config, device_count)
  if federated and files:
    _own_files(config)
  _mixed_rows(config, shards)
  check_val_metric(config.train.val_metric, [t.name for t in tasks])
  tokenizer = _tokenizer(config) if command not in ("bench", "prepare") else None
  if config.model.init_from and command != "prepare":
    check_init_from(config, tokenizer.vocab_size if tokenizer is not None else None)
  if command == "sweep":
    from jmtl.study import sweep  # noqa: PLC0415
    sweep.check_sweep_config(config)
  return config


def _own_files(config: ml_collections.ConfigDict) -> None:
  """fed.partition = "own" simulated on one mesh (not Flower, whose sites' roots are on their
  own machines): every site's data root holds the training file of each task it holds
  (`jmtl.federated.loop.check_own_files`: one line naming the site, the task and the path)."""
  if config.fed.partition != "own" or config.fed.backend == "flower":
    return
  from jmtl.federated import loop as fed_loop  # noqa: PLC0415
  from jmtl.federated import sites as sites_lib  # noqa: PLC0415
  for site in sites_lib.sites_from_config(config):
    fed_loop.check_own_files(config, site, _tasks(config))


def _join(config: ml_collections.ConfigDict) -> bool:
  """Joins a multi-host run (`dist.initialize`) before anything counts devices and checks that
  every process has the same config; True when joined. Set-up mistakes the roll call finds
  before JAX's runtime starts (`distributed.check_coordinator`: a coordinator that cannot be
  reached, a duplicate `dist.process_id`, a `dist.num_processes` that differs or counts
  processes that never come, different configs) are its line, the same on every process
  (exit 2); what JAX raises is one line naming the `dist.*` keys (JAX may also abort the
  process from C++ after `dist.initialization_timeout_s`)."""
  from jmtl.parallel import distributed  # noqa: PLC0415
  from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
  # Every process must run the same config but for PER_PROCESS_KEYS: compared by the roll call
  # before the runtime starts, and again once joined (for clusters JAX detects by itself).
  flat = {k: v for k, v in workdir_lib.flat_config(config).items() if k not in PER_PROCESS_KEYS}
  try:
    joined = distributed.initialize(config.dist, flat)
  except distributed.SetupError as e:
    raise ConfigError(str(e)) from e
  except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError/ValueError/XlaRuntimeError
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise ConfigError(
        f"config keys 'dist.*' (coordinator_address={config.dist.coordinator_address!r}, "
        f"num_processes={config.dist.num_processes}, process_id={config.dist.process_id}): "
        f"jax.distributed.initialize failed: {first}") from e
  if joined:
    try:
      distributed.check_same_config(flat)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  return joined


def _tasks(config: ml_collections.ConfigDict) -> list[Any]:
  from jmtl import tasks as task_registry  # noqa: PLC0415
  return [task_registry.get_task(name) for name in config.tasks]


def _optimizer(config: ml_collections.ConfigDict) -> None:
  """Builds the optimizer (pure Python, no arrays): a bad optim.* combination fails here."""
  from jmtl import optim  # noqa: PLC0415
  try:
    optim.build(config.optim, config.train.steps)
  except (KeyError, ValueError, TypeError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise ConfigError(f"config keys 'optim.*' (optim.name = {config.optim.name!r}): {msg}") from e


def _mesh(config: ml_collections.ConfigDict, device_count: int | None = None) -> int:
  """Builds the mesh over this process's devices (no arrays), or over `device_count` devices
  as an `AbstractMesh`; returns the batch shards (product of the mesh axes the 'batch' rule
  names). Global batch sizes must divide by it."""
  from jmtl.parallel import mesh as mesh_lib  # noqa: PLC0415
  from jmtl.parallel import sharding  # noqa: PLC0415

  rules = tuple(tuple(r) for r in config.mesh.rules)
  try:
    mesh = (mesh_lib.make_mesh(config.mesh) if device_count is None
            else mesh_lib.abstract_mesh(config.mesh, device_count))
    shards = sharding.batch_shards(mesh, rules)
    sharding.rules_table(rules, mesh)
  except ValueError as e:
    raise ConfigError(f"config keys 'mesh.*': {e}") from e
  if "batch" not in dict(rules):
    raise ConfigError("config key 'mesh.rules' has no rule for the logical axis 'batch'")
  for key in ("data.batch_size", "eval.batch_size"):
    value = config_lib._get(config, key)  # noqa: SLF001
    if value % shards:
      raise ConfigError(f"config key {key!r} = {value} must be divisible by the {shards} batch "
                        f"shards (mesh axes of the 'batch' rule)")
  return shards


def _federated(config: ml_collections.ConfigDict, device_count: int) -> int:
  """A config with `fed.sites`: the sites (`jmtl.federated.sites`, one line naming a bad entry),
  the Byzantine site names of `fed.faults.byzantine`,
  the ("site", "data", "fsdp", "tensor") mesh over sites x devices per site (`mesh.*` sizes are
  one site's), the client and server optimizers, and one length bucket (every site's batches
  must have one shape), and `cryptography` when `fed.secure_aggregation` is on. Returns one
  site's batch shards."""
  from jmtl.federated import loop as fed_loop  # noqa: PLC0415
  from jmtl.federated import sites as sites_lib  # noqa: PLC0415
  from jmtl.parallel import sharding  # noqa: PLC0415

  sites = sites_lib.sites_from_config(config)
  from jmtl.federated import faults as faults_lib  # noqa: PLC0415
  faults_lib.from_config(config, [s.name for s in sites])  # names in fed.faults.byzantine
  per_site = sites[0].devices
  # fed.backend = flower: every site is its own process (a Flower SuperNode) on its own devices;
  # here only one site's mesh is checked.
  mesh_sites = sites[:1] if config.fed.backend == "flower" else sites
  if len(mesh_sites) * per_site > device_count:
    raise ConfigError(f"config key 'fed.sites': {len(mesh_sites)} sites x {per_site} devices "
                      f"need {len(mesh_sites) * per_site} devices; {device_count} are available")
  config_lib.check_mesh(config, per_site)
  if config.fed.backend == "pmap" and per_site != 1:
    raise ConfigError(f"config key 'fed.backend' = 'pmap' maps one device per site, but the "
                      f"sites span {per_site} devices each (field 'devices'); use 'shard_map'")
  rules = tuple(tuple(r) for r in config.mesh.rules)
  try:
    mesh = fed_loop.build_mesh(config, mesh_sites)
    shards = sharding.batch_shards(mesh, rules)
    sharding.rules_table(rules, mesh)
  except ValueError as e:
    raise ConfigError(f"config keys 'mesh.*' (one site's mesh): {e}") from e
  for key in ("data.batch_size", "eval.batch_size"):
    value = config_lib._get(config, key)  # noqa: SLF001
    if value % shards:
      raise ConfigError(f"config key {key!r} = {value} must be divisible by one site's {shards} "
                        f"batch shards (mesh axes of the 'batch' rule)")
  if len(config.data.length_buckets) != 1:
    raise ConfigError(f"config key 'data.length_buckets' = {tuple(config.data.length_buckets)}: "
                      f"a federated run needs one bucket (every site's batches have one shape)")
  # A site's local loss is the plain sum of its task losses (jmtl.federated.loop.make_loss_fn):
  # task balancing is not part of the federated round, so asking for it is refused, not ignored.
  for key, plain in (("mtl.weighting", "equal"), ("mtl.gradient", "none")):
    if config_lib._get(config, key) != plain:  # noqa: SLF001
      raise ConfigError(f"config key {key!r} = {config_lib._get(config, key)!r}: federated runs "  # noqa: SLF001
                        f"train each site on the plain sum of its task losses; only {plain!r} "
                        f"is supported")
  for which, cfg in (("client", fed_loop.client_optim_config(config)),
                     ("server", fed_loop.server_optim_config(config))):
    from jmtl import optim  # noqa: PLC0415
    try:
      optim.build(cfg, config.fed.rounds * config.fed.local_steps)
    except (KeyError, ValueError, TypeError) as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
      raise ConfigError(f"config key 'fed.{which}_optimizer' = {cfg.name!r}: {msg}") from e
  if config.fed.secure_aggregation:
    from jmtl.federated import secagg  # noqa: PLC0415
    try:
      secagg._crypto()  # noqa: SLF001
    except ImportError as e:
      raise ConfigError(f"config key 'fed.secure_aggregation' = True: {e}") from e
  return shards


def _mixed_rows(config: ml_collections.ConfigDict, shards: int) -> None:
  """data.mixing='mixed': each task's rows of a batch split over the batch shards too. Uniform
  and explicit mixtures fix the rows from the config; proportional and temperature ones need
  the train sizes, so only the room for `shards` rows per task is checked for them."""
  if config.data.mixing != "mixed":
    return
  from jmtl.data import pipeline  # noqa: PLC0415

  n = len(config.tasks)
  batch = config.data.batch_size
  if batch < n * shards:
    raise ConfigError(f"config key 'data.batch_size' = {batch} cannot give each of {n} tasks a "
                      f"multiple of the {shards} batch shards with data.mixing = 'mixed' "
                      f"(needs >= {n * shards})")
  if config.data.mixture not in ("uniform", "explicit"):
    return
  rates = pipeline.mixture_rates(config.data, dict.fromkeys(config.tasks, 1))
  rows = pipeline.rows_per_task(rates, batch)
  bad = {t: r for t, r in rows.items() if r % shards}
  if bad:
    raise ConfigError(f"config key 'data.batch_size' = {batch}: with data.mixing = 'mixed' and "
                      f"data.mixture = {config.data.mixture!r} the tasks get rows {rows}; "
                      f"{', '.join(bad)} not a multiple of the {shards} batch shards")


def metric_names(task_name: str) -> list[str]:
  """Output metric names of a registered task (e.g. squad: exact_match, f1)."""
  from jmtl import tasks as task_registry  # noqa: PLC0415
  from jmtl.eval import metrics as metrics_lib  # noqa: PLC0415
  return [metrics_lib.OUTPUT_KEYS.get(m, m) for m in task_registry.get_task(task_name).metrics]


def check_val_metric(name: str, task_names: list[str]) -> None:
  """`train.val_metric` must be "mean", "" or "<task>/<metric>" with the task in `tasks` and the
  metric one the task reports (its registry `metrics`, output names); raises ConfigError."""
  if name in ("mean", ""):
    return
  known = [f"{t}/{m}" for t in task_names for m in metric_names(t)]
  if name not in known:
    raise ConfigError(f"config key 'train.val_metric' = {name!r} is not a metric of the tasks; "
                      f"use mean, '' or one of: {', '.join(known)}")


def _tokenizer(config: ml_collections.ConfigDict) -> Any:
  """Loads `data.tokenizer` when set (a missing, unreadable or non-UTF-8 file is named)."""
  if not config.data.tokenizer:
    return None
  from jmtl.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  try:
    return tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config key 'data.tokenizer': {e}") from e


def check_init_from(config: ml_collections.ConfigDict, vocab_size: int | None) -> None:
  """`model.init_from` is a BERT checkpoint directory whose architecture is `model.*` (with
  `model.init_layers = N`: its first N layers); `data.tokenizer` must be set (a trained one
  would number tokens differently) and `vocab_size` (its size; None = not loaded) must be the
  checkpoint's. Raises ConfigError naming the key."""
  from jmtl.model import pretrained  # noqa: PLC0415

  path = pathlib.Path(config.model.init_from)
  if not path.is_dir():
    raise ConfigError(f"config key 'model.init_from': directory not found: {path}")
  missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
  if missing:
    raise ConfigError(f"config key 'model.init_from' = {str(path)!r} is not a BERT checkpoint "
                      f"directory: no {' or '.join(missing)}")
  try:
    want = pretrained.bert_model_config(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"config key 'model.init_from': {e}") from e
  vocab = want.pop("vocab_size")
  n = config.model.init_layers
  if n:
    if n > want["layers"]:
      raise ConfigError(f"config key 'model.init_layers' = {n}: the checkpoint in {path} has "
                        f"only {want['layers']} encoder layers")
    want["layers"] = n
  for key, value in want.items():
    if config.model[key] != value:
      raise ConfigError(f"config key 'model.{key}' = {config.model[key]!r} does not match the "
                        f"checkpoint in {path} ({value!r})")
  if not config.data.tokenizer:
    raise ConfigError(f"config key 'data.tokenizer' is empty: model.init_from needs the "
                      f"checkpoint's own vocabulary (its vocab.txt or tokenizer.json in {path})")
  if vocab_size is not None and vocab_size != vocab:
    raise ConfigError(f"config key 'data.tokenizer': vocabulary of {vocab_size} tokens does not "
                      f"match the checkpoint in {path} ({vocab}); use its vocab.txt")


def _workdir(config: ml_collections.ConfigDict, workdir: str, command: str) -> None:
  """The run directory: `jmtl.train.workdir.preflight` owns every rule about it."""
  from jmtl.train import workdir as workdir_lib  # noqa: PLC0415
  workdir_lib.preflight(config, workdir, command)