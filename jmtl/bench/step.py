"""`jmtl bench step`: speed of the real sharded train step on synthetic batches.

model FLOPs / token = 6 * N + 12 * layers * d_model * seq_len, with N the non-embedding
parameters (every parameter except `nnx.Embed` tables: the 6N forward+backward matmuls plus the
attention score and value products). MFU = tokens/s * FLOPs/token / the fp32 matmul peak measured
in the same call (`jmtl.bench.common.MatmulPeak`, 1024 x 1024 `jnp.dot`, median of 20 products
in a block before and after the timed steps; the higher is the peak). tokens = rows * data.max_len source
positions per step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jmtl import optim
from jmtl.bench import common
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.tasks import get_task
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib


def synthetic_batch(kind: str, num_labels: int, rows: int, length: int, target_len: int,
                    vocab: int, rng: np.random.RandomState) -> dict[str, np.ndarray]:
  """A random batch of one task kind with the keys of docs/architecture.md (all rows real)."""
  batch = {
      "input_ids": rng.randint(1, vocab, (rows, length)).astype(np.int32),
      "segment_ids": (np.arange(length)[None] >= length // 2).repeat(rows, 0).astype(np.int32),
      "attention_mask": np.ones((rows, length), np.int32),
      "example_weight": np.ones((rows,), np.float32),
      "index": np.arange(rows, dtype=np.int32),
  }
  if kind == "classification":
    batch["labels"] = rng.randint(0, num_labels, rows).astype(np.int32)
  elif kind == "regression":
    batch["labels"] = rng.randn(rows).astype(np.float32)
  elif kind == "span_qa":
    batch["context_mask"] = batch["segment_ids"].copy()
    start = rng.randint(length // 2, length, rows)
    batch["start_positions"] = start.astype(np.int32)
    batch["end_positions"] = np.minimum(start + rng.randint(0, 4, rows), length - 1).astype(np.int32)
  elif kind == "seq2seq":
    target = rng.randint(1, vocab, (rows, target_len)).astype(np.int32)
    batch["decoder_input_ids"] = np.concatenate([np.ones((rows, 1), np.int32), target[:, :-1]], 1)
    batch["decoder_target_ids"] = target
    batch["decoder_mask"] = np.ones((rows, target_len), np.int32)
  else:
    raise ValueError(f"unknown task kind {kind!r}")
  return batch


def _batches(config: Any, tasks: list, vocab: int, shards: int) -> list[dict]:
  """One batch per task (data.mixing=task_per_batch) or one mixed batch with every task."""
  rng = np.random.RandomState(config.seed)
  rows, length = int(config.data.batch_size), int(config.data.max_len)
  target_len = int(config.data.max_target_len)
  make = lambda t, r: synthetic_batch(t.kind, t.num_labels, r, length, target_len, vocab, rng)
  if config.data.mixing == "mixed":
    per_task = rows // len(tasks) // shards * shards
    if per_task < shards:
      raise ValueError(f"data.batch_size={rows} is too small to give each of {len(tasks)} tasks "
                       f"a multiple of the {shards} batch shards")
    return [{t.name: make(t, per_task) for t in tasks}]
  return [{t.name: make(t, rows)} for t in tasks]


def _count_params(params: nnx.State) -> tuple[int, int]:
  """(all parameters, non-embedding parameters: leaves that are not `nnx.Embed.embedding`)."""
  total = non_embed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    total += leaf.size
    if "embedding" not in keys:
      non_embed += leaf.size
  return total, non_embed


def bench_step(config: Any, *, warmup: int = 3, iters: int = 10,
               devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Median time of the jitted train step after `warmup` steps, tokens/s, GFLOP/s and MFU.

  The mesh comes from `config.mesh` over `devices` (default: all devices).
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
  tasks = [get_task(name) for name in config.tasks]
  vocab = int(config.data.vocab_size)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = config.mesh.rules
  tx = optim.build(config.optim, int(config.train.steps))
  heads = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  t0 = time.perf_counter()
  state, graphdef, shardings = state_lib.create_train_state(config, heads, vocab, tx, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step_fn = step_lib.make_train_step(graphdef, tx, {t.name: t.kind for t in tasks}, config,
                                     shardings, mesh)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  batches = [jax.device_put(b, batch_sh)
             for b in _batches(config, tasks, vocab, sharding_lib.batch_shards(mesh, rules))]
  total_params, non_embed = _count_params(state.params)

  holder = {"state": state, "i": 0}

  def one_step():
    batch = batches[holder["i"] % len(batches)]
    holder["i"] += 1
    holder["state"], metrics = step_fn(holder["state"], batch, 0.0, 0)
    jax.block_until_ready(metrics)

  t0 = time.perf_counter()
  for _ in batches:  # the first step of each batch shape compiles
    one_step()
  compile_s = time.perf_counter() - t0
  # The matmul peak is measured in a block just before and just after the timed steps (median of
  # 20 products each) and the higher of the two is the peak: a product timed right after a train
  # step runs on a cold cache and reads about half the attainable rate on this CPU.
  peak_meter = common.MatmulPeak()
  for _ in range(warmup):
    one_step()
  peak_before = peak_meter.measure(runs=20, warmup=3)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - t0)
  peak_after = peak_meter.measure(runs=20, warmup=3)
  step_s, peak = statistics.median(times), max(peak_before, peak_after)

  state_now = holder["state"]
  seq = int(config.data.max_len)
  tokens = sum(b["input_ids"].shape[0] for b in next(iter(batches)).values()) * seq
  flops_per_token = 6 * non_embed + 12 * int(config.model.layers) * int(config.model.d_model) * seq
  tokens_per_s = tokens / step_s
  gflops = tokens_per_s * flops_per_token / 1e9
  return {
      **common.device_info(),
      "device_count": int(mesh.devices.size),
      "mesh": "x".join(str(mesh.shape[a]) for a in mesh.axis_names),
      "tasks": ",".join(config.tasks),
      "optimizer": str(config.optim.name),
      "mtl_weighting": str(config.mtl.weighting), "mtl_gradient": str(config.mtl.gradient),
      "layers": int(config.model.layers), "d_model": int(config.model.d_model),
      "d_ff": int(config.model.d_ff), "heads": int(config.model.heads), "vocab": vocab,
      "dtype": str(config.model.dtype),
      "batch_size": int(config.data.batch_size), "seq_len": seq,
      "params": int(total_params), "params_non_embedding": int(non_embed),
      # What each device holds under this mesh layout, and the replicated reference.
      "params_bytes_per_device": sharding_lib.bytes_per_device(state_now.params),
      "opt_state_bytes_per_device": sharding_lib.bytes_per_device(state_now.opt_state),
      "params_bytes_replicated": int(sum(x.nbytes for x in jax.tree.leaves(state_now.params))),
      "opt_state_bytes_replicated": int(sum(x.nbytes
                                            for x in jax.tree.leaves(state_now.opt_state))),
      "init_s": round(init_s, 3), "compile_s": round(compile_s, 3),
      "warmup": warmup, "iters": iters,
      "compilations": step_fn.trace_count(),
      "step_time_s": step_s, "step_time_min_s": min(times), "step_time_max_s": max(times),
      "tokens_per_step": tokens, "tokens_per_s": tokens_per_s,
      "flops_per_token": int(flops_per_token), "achieved_gflops": gflops,
      "peak_gflops": peak, "peak_gflops_before": peak_before, "peak_gflops_after": peak_after,
      "mfu_percent": 100.0 * gflops / peak,
  }
