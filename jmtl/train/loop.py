"""The training loop: one function you can read top to bottom (big_vision's train.py style).

mesh -> tasks + tokenizer -> model + optimizer state (created sharded) -> data -> resume ->
for each step: jitted step, log, evaluate, checkpoint -> final eval, predictions, checkpoint.

Resume is exact: the checkpoint holds the state (parameters, optimizer state, step, RNG), the
data iterator position and the validation value fed to adaptive optimizers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from jmtl import config as config_lib
from jmtl import optim
from jmtl import tasks as task_registry
from jmtl.data import pipeline
from jmtl.data import sources
from jmtl.data import tokenizer as tokenizer_lib
from jmtl.eval import metrics as metrics_lib
from jmtl.eval import predictions as predictions_lib
from jmtl.model import decoding
from jmtl.model import pretrained
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.train import NonFiniteError
from jmtl.train import checkpoint as checkpoint_lib
from jmtl.train import evaluate as evaluate_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib
from jmtl.train import writers


class _StopRequest:
  """Turns SIGTERM (TPU VM preemption) and SIGINT into a flag the loop checks each step."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@contextlib.contextmanager
def _user_data_errors():
  """Bad data files (missing, malformed row at file:line) are user errors: one line, exit 2."""
  try:
    yield
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, config_lib.ConfigError):
      raise
    raise config_lib.ConfigError(str(e)) from e


def _prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """Everything both `train` and `evaluate_checkpoint` need: mesh, tasks, tokenizer, state."""
  mesh = mesh_lib.make_mesh(config.mesh)
  tasks = [task_registry.get_task(name) for name in config.tasks]
  with _user_data_errors():
    tokenizer = tokenizer_lib.build_tokenizer(config, tasks, str(workdir))
  head_specs = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  tx = optim.build(config.optim, config.train.steps)
  state, graphdef, shardings = state_lib.create_train_state(
      config, head_specs, tokenizer.vocab_size, tx, mesh)
  if config.model.init_from:
    state = _init_from_pretrained(config, tokenizer, state, graphdef, shardings, tx)
  return mesh, tasks, tokenizer, tx, state, graphdef, shardings


def _init_from_pretrained(config, tokenizer, state, graphdef, shardings, tx):
  """Loads a BERT-family checkpoint into the trunk; the checkpoint's architecture must match
  (with `model.init_layers = N`: its first N encoder layers, and model.layers must be N)."""
  path = config.model.init_from
  want = pretrained.bert_model_config(path)
  vocab = want.pop("vocab_size")
  n = config.model.init_layers
  if n:
    if n > want["layers"]:
      raise config_lib.ConfigError(f"config key 'model.init_layers' = {n}: the checkpoint in "
                                   f"{path} has only {want['layers']} encoder layers")
    want["layers"] = n
  for key, value in want.items():
    if config.model[key] != value:
      raise config_lib.ConfigError(f"config key 'model.{key}' = {config.model[key]!r} does not "
                                   f"match the checkpoint in {path} ({value!r})")
  if tokenizer.vocab_size != vocab:
    raise config_lib.ConfigError(
        f"config key 'data.tokenizer': vocabulary of {tokenizer.vocab_size} tokens does not match "
        f"the checkpoint in {path} ({vocab}); use its vocab.txt")
  model = nnx.merge(graphdef, state.params, state.rest)
  pretrained.load_bert_into_trunk(model.trunk, path, first_layers=bool(n))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return state.replace(params=params, rest=jax.device_put(rest, shardings.rest),
                       opt_state=opt_state)


def _eval_sets(config, tasks, tokenizer) -> list[evaluate_lib.EvalSet]:
  out = []
  for task in tasks:
    with _user_data_errors():
      records = sources.load_records(task, config.data.eval_split, config.data)
      batches, meta = pipeline.eval_batches(task, records, tokenizer, config)
    out.append(evaluate_lib.EvalSet(task, records, batches, meta))
  return out


def _run_eval(config, eval_sets, state, graphdef, predict, tokenizer, mesh):
  """Evaluates every task; returns flat `<task>/<metric>` metrics and prediction rows per task."""
  params = optim.eval_params(state.opt_state, state.params)  # schedule-free: averaged point
  model = None
  flat, rows = {}, {}
  for es in eval_sets:
    name = es.task.name
    forward = lambda b, name=name: predict(params, state.rest, _global(b, mesh, config), name)
    generate = None
    if es.task.kind == "seq2seq":
      if model is None:
        model = nnx.merge(graphdef, params, state.rest)
      generate = lambda b, name=name: decoding.generate(
          model, b, name, eval_cfg=config.eval, bos_id=tokenizer.bos_id,
          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    result = evaluate_lib.evaluate_task(es, forward, generate, tokenizer, config)
    flat.update({f"{name}/{k}": v for k, v in result.metrics.items()})
    rows[name] = result.rows
  return flat, rows


def _val_metric(config, tasks, metrics: dict[str, float]) -> float:
  """The score the metric-driven optimizers see (`train.val_metric`): "mean" = the mean over
  tasks of each task's first metric, "<task>/<metric>" = that metric, "" = the first task's
  first metric."""
  name = config.train.val_metric
  firsts = metrics_lib.primary_metric_keys([t.name for t in tasks])
  if name == "mean":
    return sum(float(metrics[k]) for k in firsts) / len(firsts)
  if name:
    if name not in metrics:
      raise config_lib.ConfigError(
          f"config key 'train.val_metric' = {name!r} is not an eval metric; "
          f"available: mean, {', '.join(sorted(metrics))}")
    return float(metrics[name])
  return float(metrics[firsts[0]])


def _write_outputs(workdir: pathlib.Path, metrics: dict, rows: dict, step: int) -> None:
  predictions_lib.write_json_atomic(workdir / "eval.json", {"step": step, **metrics})
  for name, task_rows in rows.items():
    predictions_lib.write_predictions(workdir / "predictions" / f"{name}.jsonl", task_rows)


def _global(batch: dict, mesh, config) -> dict:
  """Host batch -> arrays the jitted functions take. One process: numpy as is (jit shards it by
  its in_shardings); several processes: each holds its rows of one global array."""
  if jax.process_count() == 1:
    return batch
  sh = sharding_lib.batch_sharding(mesh, tuple(tuple(r) for r in config.mesh.rules))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, x), batch)


def _tokens(batch: dict) -> int:
  """Positions the step computes on: B x L (+ B x T for decoders), summed over tasks."""
  n = 0
  for tb in batch.values():
    n += tb["input_ids"].size + (tb["decoder_input_ids"].size if "decoder_input_ids" in tb else 0)
  return n


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict[str, float]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns final eval."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")

  mesh, tasks, tokenizer, tx, state, graphdef, shardings = _prepare(config, workdir)
  train_step = step_lib.make_train_step(graphdef, tx, {t.name: t.kind for t in tasks}, config,
                                        shardings, mesh)
  predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
  with _user_data_errors():
    data_iter = pipeline.train_iterator(config, tasks, tokenizer,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  eval_sets = _eval_sets(config, tasks, tokenizer)
  writer = writers.MetricWriter(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)

  # Bookkeeping that must survive a restart, saved as the checkpoint's `meta` item.
  meta = {"val_metric": 0.0, "val_count": 0, "skipped": 0}
  start = ckpt.latest_step() or 0
  writer.truncate_after(start)  # drop lines a killed run logged after its last checkpoint
  if start:
    abstract = checkpoint_lib.abstract_like(state, shardings)
    state, data_state, meta = ckpt.restore(start, abstract)
    data_iter.set_state(data_state)
    logging.info("resumed from step %d", start)
    print(f"resumed from checkpoint at step {start}", flush=True)

  total = config.train.steps
  progress = writers.Progress(total, start, config.train.progress)
  pending: list[tuple[int, Any]] = []  # device metrics since the last log, fetched together
  tokens, t_last, paused = 0, time.time(), 0.0  # paused: eval/checkpoint time, not step time
  final_metrics: dict[str, float] = {}
  stopped = False
  with _StopRequest() as stop:
    for step in range(start + 1, total + 1):
      batch = _global(next(data_iter), mesh, config)
      tokens += _tokens(batch)
      state, m = train_step(state, batch, jnp.float32(meta["val_metric"]),
                            jnp.int32(meta["val_count"]))
      pending.append((step, m))

      last = step == total
      if step % config.train.log_every == 0 or last or stop.signal is not None:
        fetched = jax.device_get(pending)
        pending = []
        for s, ms in fetched:
          if float(ms["nonfinite"]):
            in_batch = {k.split("/")[1]: float(v) for k, v in ms.items()
                        if k.startswith("train/") and k.endswith("/loss") and k.count("/") == 2}
            bad = [t for t, v in in_batch.items() if not math.isfinite(v)] or list(in_batch)
            where = f" (task {', '.join(bad)})"
            if config.train.on_nonfinite == "halt":
              kept = ckpt.latest_step()
              ckpt.close()
              writer.close()
              progress.close()
              raise NonFiniteError(
                  f"non-finite loss or gradient at step {s}{where}; stopped "
                  f"(train.on_nonfinite='halt'); last good checkpoint: "
                  f"{'step ' + str(kept) if kept else 'none'} in {ckpt.directory}")
            meta["skipped"] += 1
            logging.warning("step %d: non-finite loss or gradient%s; update skipped", s, where)
        now = time.time()
        tps = tokens / max(now - t_last - paused, 1e-9)
        tokens, t_last, paused = 0, now, 0.0
        row = writers.window_means([{k: float(v) for k, v in ms.items()
                                     if k.startswith("train/") or k == "grad_norm"}
                                    for _, ms in fetched])
        row["train/tokens_per_s"] = tps
        row["train/skipped_steps"] = meta["skipped"]
        writer.write(step, "train", row)
        progress.update(step, row["train/loss"], tps)

      t_pause = time.time()
      if (config.train.eval_every and step % config.train.eval_every == 0) or last:
        metrics, rows = _run_eval(config, eval_sets, state, graphdef, predict, tokenizer, mesh)
        writer.write(step, "eval", metrics)
        meta["val_metric"] = _val_metric(config, tasks, metrics)
        meta["val_count"] += 1
        if last:
          final_metrics = metrics
          _write_outputs(workdir, metrics, rows, step)

      if step % config.train.checkpoint_every == 0 or last or stop.signal is not None:
        ckpt.save(step, state, data_iter.get_state(), meta)
      paused += time.time() - t_pause
      if stop.signal is not None:
        print(f"received signal {stop.signal}: saved checkpoint at step {step}, exiting",
              flush=True)
        stopped = True
        break

  progress.close()
  ckpt.close()
  writer.close()
  if stopped:
    raise SystemExit(128 + stop.signal)
  return final_metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike[str]) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir`; writes eval.json and predictions/."""
  workdir = pathlib.Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise config_lib.ConfigError(f"--workdir {workdir}: no checkpoints/ directory (train first)")
  mesh, tasks, tokenizer, _, state, graphdef, shardings = _prepare(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise config_lib.ConfigError(f"--workdir {workdir}: no complete checkpoint in {ckpt_dir}")
  state, _, _ = ckpt.restore(step, checkpoint_lib.abstract_like(state, shardings))
  ckpt.close()
  predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
  metrics, rows = _run_eval(config, _eval_sets(config, tasks, tokenizer), state, graphdef,
                            predict, tokenizer, mesh)
  _write_outputs(workdir, metrics, rows, step)
  return {"step": step, **metrics}


def load_metrics(workdir: str | os.PathLike[str]) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl`."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

