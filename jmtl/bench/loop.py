"""`jmtl bench loop`: speed of the real train-step loop by where its batches come from.

Three feeds of the same jitted, sharded train step (`jmtl.train.step.make_train_step` on the
state of `jmtl.train.state.create_train_state`, the real tokenizer's vocabulary), each over the
*same* `steps` batches -- the live stream of `train_iterator(config)` from its start:
  memory    -- the batches built beforehand and already `jax.device_put` to the batch sharding
               (the ceiling: no input cost at all);
  sync      -- `next(TrainIterator)` and the same `jax.device_put` on the main thread, in
               turn with the steps (the loop today, less its jit taking numpy: committed device
               arrays and numpy are different jit cache keys, so one input kind keeps all
               feeds on one compiled step);
  prefetch  -- `Prefetcher(TrainIterator, depth, put=device_put to the batch sharding)`.
A timed run dispatches `steps` steps and waits for the last state; it starts before the
prefetcher is built (its start-up counts). Every batch shape is compiled first (one pass over the
memory batches, plus one step through a prefetcher). Each repeat times the three feeds in a rotated
order; steps/s are medians over repeats and each ratio (sync / memory, prefetch / memory) is the
median of the per-repeat ratios, so a host whose speed drifts between repeats moves both sides.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jmtl import optim
from jmtl.bench import common
from jmtl.data import pipeline
from jmtl.data import tokenizer as tokenizer_lib
from jmtl.data.prefetch import Prefetcher
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.tasks import get_task
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib

FEEDS = ("memory", "sync", "prefetch")


def bench_loop(config: Any, *, steps: int = 30, repeats: int = 3, depth: int = 2,
               workdir: str | None = None,
               devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Steps/s of the train loop fed from memory, synchronously and through a Prefetcher.

  Args:
    config: a run config (tasks, data, model, optim, mesh as for `jmtl train`).
    steps: train steps per timed run (and batches held in memory), >= 1.
    repeats: timed runs per feed, >= 1.
    depth: the Prefetcher's buffer depth, >= 1.
    workdir: where the tokenizer is read from / saved (default: a temporary directory).
    devices: the mesh's devices (default: all).

  Returns:
    JSON-serialisable dict: device info, `steps`, `repeats`, `depth`, `tokens_per_step`
    (B x L, + B x T for decoders, summed over tasks, first batch), `pipeline_ms_per_batch`
    (building + device_put of one batch alone), `<feed>_steps_per_s` (median) and
    `<feed>_times_s` (every run, seconds) for feed in memory/sync/prefetch, `sync_over_memory`
    and `prefetch_over_memory` (median of per-repeat ratios of steps/s), `compile_s`.

  Raises:
    ValueError: steps, repeats or depth < 1.
  """
  if steps < 1 or repeats < 1 or depth < 1:
    raise ValueError(f"steps, repeats and depth must be >= 1, got {steps}, {repeats}, {depth}")
  tasks = [get_task(t) for t in config.tasks]
  with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer_lib.build_tokenizer(config, tasks, workdir or tmp)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = optim.build(config.optim, int(config.train.steps))
  heads = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  state, graphdef, shardings = state_lib.create_train_state(config, heads, tok.vocab_size, tx,
                                                            mesh)
  step_fn = step_lib.make_train_step(graphdef, tx, {t.name: t.kind for t in tasks}, config,
                                     shardings, mesh)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  put = lambda b: jax.device_put(b, batch_sh)  # noqa: E731

  it = pipeline.train_iterator(config, tasks, tok)
  start_state = it.get_state()
  t0 = time.perf_counter()
  memory = [put(next(it)) for _ in range(steps)]
  jax.block_until_ready(memory)
  pipeline_s = (time.perf_counter() - t0) / steps
  it.set_state(start_state)

  holder = {"state": state}

  def run(batches: Callable[[], Any]) -> None:
    """Dispatches `steps` steps on the batches `batches()` returns, waits for the last."""
    s = holder["state"]
    for _ in range(steps):
      s, metrics = step_fn(s, batches(), 0.0, 0)
    holder["state"] = jax.block_until_ready(s)
    jax.block_until_ready(metrics)

  def feed_memory() -> None:
    batches = iter(memory)
    run(lambda: next(batches))

  def feed_sync() -> None:
    it.set_state(start_state)
    run(lambda: put(next(it)))

  def feed_prefetch() -> None:
    it.set_state(start_state)
    with Prefetcher(it, depth=depth, put=put) as p:
      run(lambda: next(p))

  feeds = {"memory": feed_memory, "sync": feed_sync, "prefetch": feed_prefetch}
  t0 = time.perf_counter()
  feed_memory()  # compiles every batch shape of the stream
  it.set_state(start_state)
  with Prefetcher(it, depth=1, put=put) as p:  # and one through a prefetcher
    holder["state"], m = step_fn(holder["state"], next(p), 0.0, 0)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0

  times: dict[str, list[float]] = {f: [] for f in FEEDS}
  for r in range(repeats):
    for name in FEEDS[r % 3:] + FEEDS[:r % 3]:
      t0 = time.perf_counter()
      feeds[name]()
      times[name].append(time.perf_counter() - t0)

  rate = {f: [steps / t for t in times[f]] for f in FEEDS}
  ratio = lambda f: statistics.median(a / m for a, m in zip(rate[f], rate["memory"]))  # noqa: E731
  tokens = sum(b["input_ids"].size + (b["decoder_input_ids"].size if "decoder_input_ids" in b
                                      else 0) for b in memory[0].values())
  return {
      **common.device_info(),
      "device_count": int(mesh.devices.size),
      "mesh": "x".join(str(mesh.shape[a]) for a in mesh.axis_names),
      "tasks": ",".join(config.tasks),
      "batch_size": int(config.data.batch_size), "mixing": str(config.data.mixing),
      "steps": steps, "repeats": repeats, "depth": depth,
      "tokens_per_step": int(tokens),
      "pipeline_ms_per_batch": 1e3 * pipeline_s,
      "compile_s": round(compile_s, 3),
      **{f"{f}_steps_per_s": statistics.median(rate[f]) for f in FEEDS},
      **{f"{f}_times_s": [round(t, 4) for t in times[f]] for f in FEEDS},
      "sync_over_memory": ratio("sync"),
      "prefetch_over_memory": ratio("prefetch"),
  }
