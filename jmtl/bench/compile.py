"""`jmtl compile`: ahead-of-time lowering and compilation of the train step for a target topology.

The precedent is MaxText's `train_compile.py`: the train state and a batch exist only as shapes
(`jax.eval_shape` of the state's init, `jax.ShapeDtypeStruct` batches), the jitted train step
of `jmtl.train.step.make_train_step` is lowered with them over a mesh of the target's devices
and compiled, and the executable's `memory_analysis()` tells the per-device memory before any
hardware runs it.

Targets (`--topology`):
- `local` (default): this host's devices (`jax.devices()`); it always compiles.
- `v4-N`, `v5e-N` (= `v5litepod-N`), `v5p-N`, `v6e-N`: Cloud TPU slices named as Google Cloud
  names them (the table is jmtl.tpu_names; v4 and v5p count TensorCores, two per chip, so
  `v4-32` is 16 chips; v5e and v6e count chips). Their devices come from
  `jax.experimental.topologies.get_topology_desc`, which needs the TPU runtime (`libtpu`, the
  version `jax[tpu]` pins) but no TPU: XLA's TPU compiler runs on this host.
  Without the runtime, the checks that need no compiler still run over an
  `AbstractMesh` of the target's shape: every sharding rule's divisibility and the per-device
  bytes of parameters and optimizer state.

Per-device bytes:
- parameters, optimizer state: sum over leaves of prod(shard shape) x dtype size, with the shard
  shape from the leaf's `NamedSharding` (the trainer's own rules, `jmtl.train.state`);
- compiled: `argument` (state + batch shards), `output`, `alias` (outputs written in place of
  donated arguments), `temp` (activations and other temporaries), `generated_code`; the total is
  argument + output - alias + temp + generated_code (what one step needs at once).
- device memory: the HBM of one TPU chip (table below), `memory_stats()["bytes_limit"]` of a
  local GPU/TPU, and for CPU devices the host's physical memory divided by the local device count
  (fake CPU devices share it). "fits" = total <= device memory.

Batch shapes: the largest batch the config can produce, i.e. `data.batch_size` rows padded to
the task's longest source (`min(task.max_len, data.max_len)`) and target lengths, one batch per
task (`data.mixing = "task_per_batch"`, each a compilation) or one with every task
(`"mixed"`: rows per task from the mixture's rates; mixtures that need the train sizes are taken
as uniform). The vocabulary is `data.tokenizer`'s when set, else `data.vocab_size` (a trained
tokenizer can come out smaller).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from jmtl import mtl as mtl_lib
from jmtl import optim
from jmtl.bench.step import synthetic_batch
from jmtl import tpu_names
from jmtl.config import ConfigError
from jmtl.data import features
from jmtl.data import pipeline
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.tasks import get_task
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

GIB = 2**30

# The version of the TPU runtime the installed jax pins (`jax[tpu]` extra of jax 0.10.2).
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"


# The generations and slice sizes (one table shared with launch/tpu_vm.py).
TpuGeneration = tpu_names.Generation
TPU_GENERATIONS = tpu_names.GENERATIONS


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is compiled for.

  name: "local" or a slice name ("v5e-16"); num_devices: JAX devices (TPU chips, megacore);
  memory_bytes: memory of one device (see the module docstring); memory_source: where that
  number comes from; topology: libtpu's topology name ("v5e:4x4"), None for local.
  """
  name: str
  platform: str
  num_devices: int
  memory_bytes: int
  memory_source: str
  topology: str | None = None
  chip_config: str | None = None
  host_bounds: tuple[int, ...] | None = None


def tpu_target(name: str) -> Target:
  """The Target of a Cloud TPU slice name such as "v5e-16" or "v4-32".

  Raises ConfigError (one line naming `--topology`) for an unknown generation or slice size.
  """
  try:
    gen, chips = tpu_names.parse(name)
  except ValueError as e:
    raise ConfigError(f"--topology: {e}; or use local") from None
  grid = gen.shapes[chips]
  # Chips per host: 2x2 (4 chips) on multi-host slices; a single-host slice is one host.
  bounds = (2, 2, 1) if chips >= 16 or len(grid) == 3 else (grid + (1,) * 3)[:3]
  return Target(name=name, platform="tpu", num_devices=chips, memory_bytes=gen.hbm_bytes,
                memory_source=f"HBM per {gen.name} chip", topology=f"{gen.prefix}:"
                + "x".join(map(str, grid)), chip_config=gen.chip_config, host_bounds=bounds)


def local_target() -> Target:
  """This host's devices; memory from the device's `bytes_limit`, or host RAM / devices (CPU)."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    memory, source = int(stats["bytes_limit"]), "device bytes_limit"
  else:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory, source = ram // len(devices), f"host RAM / {len(devices)} local devices"
  return Target(name="local", platform=devices[0].platform, num_devices=jax.device_count(),
                memory_bytes=memory, memory_source=source)


def get_target(name: str) -> Target:
  """`local` or a TPU slice name (see `tpu_target`)."""
  return local_target() if name == "local" else tpu_target(name)


def tpu_runtime_available() -> bool:
  """True when the TPU runtime (the `libtpu` package, or TPU_LIBRARY_PATH) can be loaded."""
  return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def target_mesh(config: Any, target: Target) -> jax.sharding.Mesh | jax.sharding.AbstractMesh:
  """The config's mesh over the target's devices: real (local), compile-only TPU devices
  (`get_topology_desc`, needs libtpu) or, without the runtime, an `AbstractMesh`."""
  if target.topology is None:
    return mesh_lib.make_mesh(config.mesh)
  dcn = int(config.mesh.dcn_data)
  if dcn > 1:  # as make_mesh checks it over local devices: a slice target is one slice
    data = mesh_lib.mesh_shape((config.mesh.data, config.mesh.fsdp, config.mesh.tensor),
                               target.num_devices)[0]
    if data % dcn:
      raise ValueError(f"mesh.dcn_data={dcn} does not divide the data axis size {data}.")
    raise ValueError(f"mesh.dcn_data={dcn} but --topology {target.name} is one slice; compile "
                     f"one slice of the multislice run with mesh.dcn_data=1")
  if not tpu_runtime_available():
    return mesh_lib.abstract_mesh(config.mesh, target.num_devices)
  from jax.experimental import topologies  # noqa: PLC0415
  devices = topologies.get_topology_desc(
      topology_name=target.topology, platform="tpu", chip_config_name=target.chip_config,
      chips_per_host_bounds=target.host_bounds, num_slices=1).devices
  return mesh_lib.make_mesh(config.mesh, devices)


def vocab_size(config: Any) -> int:
  """Tokens of `data.tokenizer` when set, else `data.vocab_size` (an upper bound)."""
  if config.data.tokenizer:
    from jmtl.data import tokenizer as tokenizer_lib  # noqa: PLC0415
    return tokenizer_lib.Tokenizer.load(config.data.tokenizer).vocab_size
  return int(config.data.vocab_size)


def abstract_batches(config: Any, tasks: list, vocab: int) -> list[dict[str, dict[str, Any]]]:
  """The batch shapes the trainer can feed, as `jax.ShapeDtypeStruct`s (module docstring)."""
  def shapes(task, rows):
    feat = features.Featurizer(task, None, config.data)  # its max_len / max_target_len rule
    batch = synthetic_batch(task.kind, task.num_labels, rows, feat.max_len, feat.max_target_len,
                            vocab, np.random.RandomState(0))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}

  rows = int(config.data.batch_size)
  if config.data.mixing == "mixed":
    rates = pipeline.mixture_rates(config.data, dict.fromkeys(config.tasks, 1))
    per_task = pipeline.rows_per_task(rates, rows)
    return [{t.name: shapes(t, per_task[t.name]) for t in tasks}]
  return [{t.name: shapes(t, rows)} for t in tasks]


def _memory(compiled: Any) -> dict[str, int]:
  """Bytes of the compiled step's `memory_analysis()` and their total (module docstring)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out[
      "generated_code"]
  return out


def compile_check(config: Any, target: Target, *, compile_step: bool = True) -> dict[str, Any]:
  """Checks the train step of `config` for `target`; returns the report (JSON-serialisable).

  Always: the mesh over the target's devices, every sharding rule that does not divide
  (`sharding_problems`, one line each, nothing compiled then), the parameter and optimizer-state
  bytes per device. With a compiler for the target (local, or TPU with libtpu) and
  `compile_step`: lowers and compiles the step for each batch shape (`abstract_batches`) and adds
  `memory` (per batch: bytes of the compiled step), `total_bytes` (the largest total) and `fits`.
  Without one, `compiled` is False, `not_compiled` says why and `fits` is False only when
  parameters and optimizer state alone exceed the device memory (else None: unknown). When the
  compiler itself reports that the step does not fit (XLA:TPU does), `fits` is False and
  `out_of_memory` holds its first line.
  """
  tasks = [get_task(name) for name in config.tasks]
  vocab = vocab_size(config)
  try:
    mesh = target_mesh(config, target)
  except ValueError as e:  # mesh sizes against the target's device count
    raise ConfigError(f"config keys 'mesh.*' for --topology {target.name}: {e}") from e
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = optim.build(config.optim, int(config.train.steps))
  heads = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  from jmtl.model.multitask import MultiTaskModel  # noqa: PLC0415

  def model_fn(rngs):
    return MultiTaskModel(config.model, vocab, heads, rngs=rngs)

  sharding_log = logging.getLogger(sharding_lib.__name__)
  level = sharding_log.level
  sharding_log.setLevel(logging.ERROR)  # its fallback warnings are the problems listed below
  try:
    abstract, graphdef, shardings, _ = state_lib.abstract_train_state(
        model_fn, int(config.seed), tx, mesh, rules,
        mtl_init=mtl_lib.build(config.mtl, list(heads)).weighting.init)
  finally:
    sharding_log.setLevel(level)
  problems = (sharding_lib.sharding_problems(abstract.params, mesh, rules)
              + sharding_lib.sharding_problems(abstract.rest, mesh, rules))
  batches = abstract_batches(config, tasks, vocab)
  shards = sharding_lib.batch_shards(mesh, rules)
  for b in batches:
    for name, arrays in b.items():
      rows = arrays["input_ids"].shape[0]
      if rows % shards:
        problems.append(f"batch of task {name!r}: {rows} rows do not split over the {shards} "
                        "batch shards (mesh axes of the 'batch' rule)")
  params_bytes = sharding_lib.bytes_per_device(abstract.params, shardings.params)
  opt_bytes = sharding_lib.bytes_per_device(abstract.opt_state, shardings.opt_state)
  n_params = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
  report: dict[str, Any] = {
      "topology": target.name, "platform": target.platform, "devices": target.num_devices,
      "tpu_topology": target.topology,
      "mesh": "x".join(str(mesh.shape[a]) for a in mesh_lib.MESH_AXES),
      "mesh_axes": "x".join(mesh_lib.MESH_AXES),
      "tasks": ",".join(config.tasks), "optimizer": str(config.optim.name), "vocab": vocab,
      "batch_shapes": [{t: {k: list(v.shape) for k, v in arrays.items() if k == "input_ids"
                            or k == "decoder_input_ids"} for t, arrays in b.items()}
                       for b in batches],
      "params": n_params, "params_bytes_per_device": params_bytes,
      "opt_state_bytes_per_device": opt_bytes,
      "device_memory_bytes": target.memory_bytes, "device_memory_source": target.memory_source,
      "sharding_problems": problems, "compiled": False, "not_compiled": None,
      "memory": [], "total_bytes": None, "fits": None, "out_of_memory": None,
  }
  if params_bytes + opt_bytes > target.memory_bytes:
    report["fits"] = False
  if problems:
    report["not_compiled"] = "sharding rules do not divide"
    return report
  if isinstance(mesh, jax.sharding.AbstractMesh):
    report["not_compiled"] = (f"compiling for {target.name} needs the TPU runtime "
                              f"(pip install '{LIBTPU_REQUIREMENT}')")
    return report
  if not compile_step:
    report["not_compiled"] = "not asked to compile"
    return report
  step_fn = step_lib.make_train_step(graphdef, tx, {t.name: t.kind for t in tasks}, config,
                                     shardings, mesh)
  scalar_f = jax.ShapeDtypeStruct((), np.float32)
  scalar_i = jax.ShapeDtypeStruct((), np.int32)
  t0 = time.perf_counter()
  for b in batches:
    try:
      compiled = step_fn.jitted.lower(abstract, b, scalar_f, scalar_i).compile()
    except jax.errors.JaxRuntimeError as e:
      line = out_of_memory_line(str(e))
      if line is None:
        raise
      report.update(compile_s=round(time.perf_counter() - t0, 3), fits=False,
                    out_of_memory=f"[{','.join(sorted(b))}] {line}",
                    not_compiled="the compiler ran out of device memory")
      return report
    report["memory"].append({"tasks": ",".join(sorted(b)), **_memory(compiled)})
  report["compile_s"] = round(time.perf_counter() - t0, 3)
  report["compiled"] = True
  report["total_bytes"] = max(m["total"] for m in report["memory"])
  report["fits"] = report["total_bytes"] <= target.memory_bytes
  return report


def out_of_memory_line(message: str) -> str | None:
  """The first line of a compiler error that says the program does not fit in device memory
  (XLA:TPU raises `RESOURCE_EXHAUSTED: ... CompileTimeHbmOom ... Ran out of memory in memory
  space hbm. Used X of Y hbm ...` at compile time), else None."""
  first = message.strip().splitlines()[0] if message.strip() else ""
  return first if first.startswith("RESOURCE_EXHAUSTED") else None


def _gib(n: int | None) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1, e.g. "1.50 GiB"."""
  if n is None:
    return "-"
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report of `compile_check` (one fact per line)."""
  lines = [
      f"target: {r['topology']} ({r['platform']}, {r['devices']} devices"
      + (f", topology {r['tpu_topology']}" if r["tpu_topology"] else "") + ")",
      f"mesh {r['mesh_axes']}: {r['mesh']}",
      f"tasks: {r['tasks']}; optimizer: {r['optimizer']}; vocab: {r['vocab']}; "
      f"parameters: {r['params']:,}",
      "batches (rows x length): " + "; ".join(
          ", ".join(f"{t} " + " ".join("x".join(map(str, s)) for s in shapes.values())
                    for t, shapes in b.items()) for b in r["batch_shapes"]),
  ]
  for p in r["sharding_problems"]:
    lines.append(f"sharding rule does not divide: {p}")
  lines += [f"per device: parameters {_gib(r['params_bytes_per_device'])}",
            f"per device: optimizer state {_gib(r['opt_state_bytes_per_device'])}"]
  for m in r["memory"]:
    lines.append(f"compiled step [{m['tasks']}]: arguments {_gib(m['argument'])}, outputs "
                 f"{_gib(m['output'])}, aliased {_gib(m['alias'])}, temporaries (activations) "
                 f"{_gib(m['temp'])}, code {_gib(m['generated_code'])}, total {_gib(m['total'])}")
  lines.append(f"device memory: {_gib(r['device_memory_bytes'])} ({r['device_memory_source']})")
  if r["out_of_memory"]:
    lines.append(f"compiler: {r['out_of_memory']}")
  if r["compiled"]:
    lines.append(f"compiled in {r['compile_s']} s; fits: {'yes' if r['fits'] else 'no'}")
  else:
    lines.append(f"not compiled: {r['not_compiled']}; fits: "
                 + ("unknown (activations not measured)" if r["fits"] is None else "no"))
  return "\n".join(lines)
