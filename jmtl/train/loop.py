"""The training loop: one function you can read top to bottom (big_vision's train.py style).

lock the workdir -> check an existing checkpoint's fingerprint -> mesh, tasks, tokenizer ->
model + optimizer state (created sharded) -> data -> resume -> for each step: jitted step,
check the previous step's metrics, log, checkpoint, evaluate -> final outputs.

What a run promises (each is tested with injected faults, tests/test_train_faults.py):
- Resume is exact: a checkpoint holds the state (parameters, optimizer state, step, RNG), the
  data position, the validation value fed to adaptive optimizers and the unlogged part of the
  current log window, so a resumed run logs exactly what an uninterrupted one logs, whatever
  `log_every` and `checkpoint_every` are.
- A checkpoint is saved before every evaluation, so a failing evaluation loses no training; a
  run resumed at an evaluation step evaluates again there (the saved validation feed is the
  one from before that evaluation).
- Every step's metrics are checked for non-finite values one step later (so the host does not
  wait on the device) and always before a checkpoint is saved: with
  `train.on_nonfinite=halt` no checkpoint at or after a bad step exists.
- SIGTERM/SIGINT (TPU preemption) are read once per step; the run saves that step, waits until
  the save is committed on disk, says so, and exits 128 + signal. The handlers stay installed
  until the checkpointer is closed, so a second signal cannot kill a save; under the CLI
  (`StopRequest` nested) until the final line is out, so a signal while a finished run closes
  is answered the same way (final line, signal line, 128 + signal), never a silent kill.
- A checkpoint from a different run (fingerprint: `jmtl.train.workdir`) is refused before any
  work; `config.json` is written only after that check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import tokenizers
from absl import logging
from etils import epath
from flax import nnx

from jmtl import config as config_lib
from jmtl import optim
from jmtl import tasks as task_registry
from jmtl.data import pipeline
from jmtl.data import prefetch
from jmtl.data import sources
from jmtl.data import tokenizer as tokenizer_lib
from jmtl.eval import metrics as metrics_lib
from jmtl.eval import predictions as predictions_lib
from jmtl.model import decoding
from jmtl.model import pretrained
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import distributed
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.train import CheckpointError
from jmtl.train import EvalError
from jmtl.train import NonFiniteError
from jmtl.train import checkpoint as checkpoint_lib
from jmtl.train import evaluate as evaluate_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib
from jmtl.train import workdir as workdir_lib
from jmtl.train import writers


class StopRequest:
  """Turns SIGTERM (TPU VM preemption) and SIGINT into a flag the loop reads once per step.

  `with StopRequest() as stop:` installs the handlers (main thread only) and restores the
  previous ones on exit. Nested, the inner one is the outer one (`as` gives the outer object;
  its exit restores nothing), so a caller that must still answer a signal after the run
  returns (the CLI: its final line, then exit 128 + N) wraps the run in its own: a signal
  between the run's end and the caller's last line is then recorded, never the default
  action (killed, exit 143, no line).
  """

  _active: "StopRequest | None" = None  # the installed one, outermost

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}
    self._outer: StopRequest | None = None

  def __enter__(self) -> "StopRequest":
    if StopRequest._active is not None:
      self._outer = StopRequest._active
      return self._outer
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    StopRequest._active = self
    return self

  @classmethod
  def pending(cls) -> int | None:
    """The signal the installed (outermost) StopRequest recorded; None when none is installed
    or no signal arrived."""
    return cls._active.signal if cls._active is not None else None

  def _handle(self, signum, frame):
    del frame
    if self.signal is None:
      self.signal = signum

  def __exit__(self, *exc):
    if self._outer is not None:
      self._outer = None
      return
    StopRequest._active = None
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


@contextlib.contextmanager
def _user_data_errors():
  """Bad data files (missing, malformed row at file:line) are user errors: one line, exit 2."""
  try:
    yield
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, config_lib.ConfigError):
      raise
    raise config_lib.ConfigError(str(e)) from e


def _tokenizer(config, tasks, wd: epath.Path) -> tokenizer_lib.Tokenizer:
  """`data.tokenizer`, else `W/tokenizer.json` (resume), else one trained on the tasks' train
  text (`train` writes it to `W/tokenizer.json` once the workdir's checkpoint is accepted).
  With several processes, process 0 decides and the others receive its tokenizer."""
  if config.data.tokenizer or not distributed.multi_process():
    return _tokenizer_here(config, tasks, wd)
  try:
    text = distributed.broadcast_text(
        lambda: _tokenizer_here(config, tasks, wd).backend.to_str())
  except distributed.DistributedError as e:
    raise config_lib.ConfigError(str(e)) from e
  return tokenizer_lib.Tokenizer(tokenizers.Tokenizer.from_str(text))


def _tokenizer_here(config, tasks, wd: epath.Path) -> tokenizer_lib.Tokenizer:
  out = wd / tokenizer_lib.TOKENIZER_FILE
  if not config.data.tokenizer and out.exists():
    try:
      return tokenizer_lib.Tokenizer(tokenizers.Tokenizer.from_str(out.read_text()))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
      raise config_lib.ConfigError(
          f"{out}: not a valid tokenizer file ({str(e).splitlines()[0] if str(e) else e!r}); "
          f"restore it, or delete it to train the same tokenizer again") from e
  with _user_data_errors():
    return tokenizer_lib.build_tokenizer(config, tasks, None)


def _prepare(config: ml_collections.ConfigDict, wd: epath.Path):
  """Everything both `train` and `evaluate_checkpoint` need: mesh, tasks, tokenizer, state."""
  mesh = mesh_lib.make_mesh(config.mesh)
  tasks = [task_registry.get_task(name) for name in config.tasks]
  tokenizer = _tokenizer(config, tasks, wd)
  head_specs = {t.name: HeadSpec(t.kind, t.num_labels) for t in tasks}
  tx = optim.build(config.optim, config.train.steps)
  state, graphdef, shardings = state_lib.create_train_state(
      config, head_specs, tokenizer.vocab_size, tx, mesh)
  if config.model.init_from:
    state = _init_from_pretrained(config, tokenizer, state, graphdef, shardings, tx)
  return mesh, tasks, tokenizer, tx, state, graphdef, shardings


def _init_from_pretrained(config, tokenizer, state, graphdef, shardings, tx):
  """Loads a BERT-family checkpoint into the trunk (with `model.init_layers = N`: its first N
  encoder layers). That its architecture and vocabulary match the config is checked before
  any work by `jmtl.preflight` (`check_init_from`)."""
  del tokenizer
  n = config.model.init_layers
  path = config.model.init_from
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


def _run_eval(config, eval_sets, state, graphdef, predict, tokenizer, mesh, *,
              should_stop=lambda: False):
  """Evaluates every task; returns flat `<task>/<metric>` metrics and prediction rows per task,
  or None when `should_stop()` turns true between tasks (a signal arrived)."""
  params = optim.eval_params(state.opt_state, state.params)  # schedule-free: averaged point
  model = None
  flat, rows = {}, {}
  for es in eval_sets:
    if should_stop():
      return None
    name = es.task.name
    forward = lambda b, name=name: distributed.to_host(
        predict(params, state.rest, _global({name: b}, mesh, config)[name], name))
    generate = None
    if es.task.kind == "seq2seq":
      if model is None:
        model = nnx.merge(graphdef, params, state.rest)
      generate = lambda b, name=name: decoding.generate(
          model, _global({name: b}, mesh, config)[name], name, eval_cfg=config.eval,
          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    result = evaluate_lib.evaluate_task(es, forward, generate, tokenizer, config)
    if not result.labelled:
      print(f"jmtl: warning: task {name}: split {config.data.eval_split!r} has no labels: "
            f"predictions written, no metrics", file=sys.stderr, flush=True)
    if result.nonfinite:
      logging.warning("task %s: %d eval examples have non-finite model outputs; its metrics "
                      "are NaN", name, result.nonfinite)
    flat.update({f"{name}/{k}": v for k, v in result.metrics.items()})
    rows[name] = result.rows
  if should_stop():  # a signal during the last task: the run stops, evaluation reruns on resume
    return None
  return flat, rows


def _val_metric(config, tasks, metrics: dict[str, float]) -> float:
  """The score the metric-driven optimizers see (`train.val_metric`): "mean" = the mean over
  tasks of each task's first metric, "<task>/<metric>" = that metric, "" = the first task's
  first metric. NaN when a metric it needs is missing (unlabelled split) or not finite."""
  name = config.train.val_metric
  firsts = metrics_lib.primary_metric_keys([t.name for t in tasks])
  keys = firsts if name == "mean" else [name] if name else firsts[:1]
  values = [float(metrics.get(k, math.nan)) for k in keys]
  return math.fsum(values) / len(values)


def outputs_names(split: str) -> tuple[str, str]:
  """(results file, predictions folder): the validation split's are the documented `eval.json`
  and `predictions/`; another split's carry its name, so they never overwrite those."""
  if split == "validation":
    return "eval.json", "predictions"
  return f"eval_{split}.json", f"predictions_{split}"


def _write_outputs(wd: epath.Path, split: str, metrics: dict, rows: dict, step: int) -> None:
  results, folder = outputs_names(split)
  _write_json(wd / results, {"step": step, "split": split, **metrics})
  for name, task_rows in rows.items():
    _write_jsonl(wd / folder / f"{name}.jsonl", task_rows)


def _write_json(p: epath.Path, obj: Any) -> None:
  if workdir_lib.is_local(p):
    predictions_lib.write_json_atomic(os.fspath(p), obj)
    return
  text = json.dumps(predictions_lib.to_json_value(obj), indent=2, ensure_ascii=False,
                    allow_nan=False)
  workdir_lib.write_text_atomic(p, text + "\n")


def _write_jsonl(p: epath.Path, rows: list[dict]) -> None:
  if workdir_lib.is_local(p):
    predictions_lib.write_predictions(os.fspath(p), rows)
    return
  text = "".join(json.dumps(predictions_lib.to_json_value(r), ensure_ascii=False,
                            allow_nan=False) + "\n" for r in rows)
  workdir_lib.write_text_atomic(p, text)


def _global(batch: dict, mesh, config) -> dict:
  """A whole host batch (every process holds all of it, as in evaluation) -> what the jitted
  functions take. One process: numpy as is (jit shards it by its in_shardings); several
  processes: global arrays, each process placing its devices' rows."""
  if not distributed.multi_process():
    return batch
  sh = sharding_lib.batch_sharding(mesh, tuple(tuple(r) for r in config.mesh.rules))
  return distributed.global_batch(batch, None, sh)


def _tokens(batch: dict) -> int:
  """Positions the step computes on: B x L (+ B x T for decoders), summed over tasks."""
  n = 0
  for tb in batch.values():
    n += tb["input_ids"].size + (tb["decoder_input_ids"].size if "decoder_input_ids" in tb else 0)
  return n


def _encode_window(window: list[dict[str, float]]) -> list[dict[str, float | None]]:
  """Per-step host metrics as JSON (non-finite values as strings, restored by `_decode`)."""
  return [{k: (v if math.isfinite(v) else repr(v)) for k, v in m.items()} for m in window]


def _decode_window(window: list[dict]) -> list[dict[str, float]]:
  return [{k: float(v) for k, v in m.items()} for m in window]


def _record_error(wd: epath.Path, step: int, what: str) -> str:
  """Appends the current traceback to `W/errors.log`; returns a pointer for the message."""
  try:
    with (wd / "errors.log").open("a") as f:
      f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: {what}\n")
      f.write(traceback.format_exc())
    return f"; traceback in {wd / 'errors.log'}"
  except Exception:  # noqa: BLE001 - never hide the evaluation's own error behind this one
    return ""


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> dict[str, float]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns final eval.

  Call `jmtl.preflight.run(config, "train", workdir)` first (the CLI does): it checks what the
  config alone can tell, so that this function meets only data and run-time failures.
  Raises ConfigError (a user mistake: bad data, a checkpoint of another run, workdir in use),
  NonFiniteError (train.on_nonfinite = halt), CheckpointError (a save or restore failed),
  EvalError (an evaluation failed; its step is checkpointed), SystemExit(128 + signal) after
  saving on SIGTERM/SIGINT.
  """
  wd = _workdir(workdir)
  with (_lock(wd, "train"), workdir_lib.background_errors_to_log(wd), StopRequest() as stop):
    return _train(config, wd, stop)


def _check_same_data(fp: dict[str, Any]) -> None:
  """Raises ConfigError on every process when a process read other training data or built
  another vocabulary than process 0 (its per-task digests in the run's fingerprint,
  `workdir_lib.fingerprint`): such hosts would train on a mix of two data sets without a
  word. A collective; no-op with one process."""
  if not distributed.multi_process():
    return
  for what in sorted(fp["data"]):
    others = distributed.differing_processes(fp["data"][what])
    if others:
      raise config_lib.ConfigError(
          f"the training data of task {what!r} differ between the processes of this run "
          f"(process{'es' if len(others) > 1 else ''} {', '.join(map(str, others))} read other "
          f"rows than process 0); give every host the same data files (data.dir / "
          f"$JMTL_DATA_DIR)")
  others = distributed.differing_processes(fp["tokenizer"])
  if others:
    raise config_lib.ConfigError(
        f"the vocabulary differs between the processes of this run (process"
        f"{'es' if len(others) > 1 else ''} {', '.join(map(str, others))} built another one "
        f"than process 0); give every host the same data.tokenizer file")


def _workdir(workdir: str | os.PathLike[str]) -> epath.Path:
  """The workdir as one epath; with several processes it must be the same path on all of them
  (a shared file system or a bucket: Orbax writes one checkpoint from all processes)."""
  wd = workdir_lib.path(workdir)
  try:
    distributed.check_same("--workdir", str(wd))
  except ValueError as e:
    raise config_lib.ConfigError(f"{e}; give an absolute path every host sees, or a bucket "
                                 f"path") from e
  return wd


def _lock(wd: epath.Path, command: str):
  """The workdir's lock, held by the process that writes the run's files (process 0)."""
  return workdir_lib.lock(wd, command) if distributed.is_primary() else contextlib.nullcontext()


def _train(config: ml_collections.ConfigDict, wd: epath.Path, stop: StopRequest
           ) -> dict[str, float]:
  return run_closing(_train_with, config, wd, stop)


def run_closing(body, config: ml_collections.ConfigDict, wd: epath.Path, stop: StopRequest):
  """Runs `body(config, wd, stop, checkpointer, closers)` (the trainer's or the federated
  job's), then closes what it opened, whatever happened: its closers (prefetch thread, metric
  writer, progress display), then the checkpointer last, which waits for the saves in flight
  (an error above still leaves them committed). The first error wins; later ones are printed
  as warnings."""
  ckpt = checkpoint_lib.Checkpointer(wd / "checkpoints", keep=config.train.keep_checkpoints)
  closers: list = [ckpt.close]
  try:
    return body(config, wd, stop, ckpt, closers)
  finally:
    failure = sys.exc_info()[1]
    for close in reversed(closers):
      try:
        close()
      except Exception as e:  # noqa: BLE001 - every closer runs; the first error is raised
        if failure is None:
          failure = e
        else:
          print(f"jmtl: warning: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if failure is not None and sys.exc_info()[1] is None:
      raise failure


def _train_with(config: ml_collections.ConfigDict, wd: epath.Path, stop: StopRequest,
                ckpt: checkpoint_lib.Checkpointer, closers: list) -> dict[str, float]:
  """The body of `train`; everything opened is registered in `closers` (closed by `_train`)."""
  found = ckpt.read_latest_meta()
  # Refuse another run's checkpoint before any work or any write (decided by all processes
  # together: a host that sees other files must not leave the others waiting).
  distributed.decide_together(
      lambda: found is not None and workdir_lib.check_config(found[1], config, workdir=wd,
                                                             step=found[0]),
      config_lib.ConfigError)

  mesh, tasks, tokenizer, tx, state, graphdef, shardings = _prepare(config, wd)
  train_step = step_lib.make_train_step(graphdef, tx, {t.name: t.kind for t in tasks}, config,
                                        shardings, mesh)
  predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  multi = distributed.multi_process()
  primary = distributed.is_primary()
  with _user_data_errors():
    records = {t.name: sources.load_records(t, "train", config.data) for t in tasks}
    rows = pipeline.batch_rows(config, {n: len(r) for n, r in records.items()})
  shards = sharding_lib.batch_shards(mesh, rules)
  uneven = {t: r for t, r in rows.items() if r % shards}
  if uneven:  # mixed batches: each task's rows must split over the batch shards
    raise config_lib.ConfigError(
        f"config keys 'data.mixture' / 'data.batch_size': the mixture gives rows per task "
        f"{dict(rows)}, and {uneven} do not divide over the {shards} batch shards "
        f"(mesh data x fsdp); change data.batch_size, the mixture, or the mesh")
  with _user_data_errors():
    # Each process reads only the rows of every global batch that its devices hold.
    data_iter = pipeline.train_iterator(
        config, tasks, tokenizer, local_rows=lambda n: distributed.local_rows(batch_sh, n),
        fixed_length=multi, records=records)
  fp = workdir_lib.fingerprint(
      config, data={n: workdir_lib.digest_records(r) for n, r in records.items()},
      tokenizer=workdir_lib.digest_text(tokenizer.backend.to_str()))
  del records
  eval_sets = _eval_sets(config, tasks, tokenizer)

  def check(step, meta):
    workdir_lib.check_config(meta, config, workdir=wd, step=step)
    workdir_lib.check_fingerprint(meta, fp, workdir=wd, step=step)

  # Bookkeeping that must survive a restart, saved as the checkpoint's `meta` item.
  meta: dict[str, Any] = {"val_metric": 0.0, "val_count": 0, "skipped": 0}
  window: list[dict[str, float]] = []  # host metrics of the steps since the last train line
  restored = ckpt.restore_latest(checkpoint_lib.abstract_like(state, shardings), check=check)
  start = 0
  if restored is not None:
    start, state, data_state, saved = restored
    workdir_lib.resume_warnings(saved, config, workdir=wd, step=start)
    data_iter.set_state(data_state)
    window = _decode_window(saved.pop("window", []))
    saved.pop("fingerprint", None)
    meta.update(saved)
    logging.info("resumed from step %d", start)
    if primary:
      print(f"resumed from checkpoint at step {start}", flush=True)
  _check_same_data(fp)

  # The workdir is this run's now: only from here on is anything written into it, and only
  # by process 0 (checkpoints are written by all processes, through Orbax).
  if primary:
    ckpt.remove_incomplete()
    workdir_lib.write_text_atomic(wd / "config.json", config_lib.to_json(config) + "\n")
    if not (wd / tokenizer_lib.TOKENIZER_FILE).exists():
      workdir_lib.write_text_atomic(wd / tokenizer_lib.TOKENIZER_FILE,
                                    tokenizer.backend.to_str())
  distributed.barrier("jmtl_workdir_ready")
  ckpt.reload()
  writer = (writers.MetricWriter(wd, purge_step=start + 1 if start else None) if primary
            else writers.NullWriter())
  closers.append(writer.close)

  # Batches are read ahead on a thread and copied to the devices while the step runs; the
  # prefetcher's state is the position of the batches the loop has taken (exact resume).
  held, global_rows = data_iter.local, data_iter.rows

  def put(b):
    if not multi:
      sharding_lib.check_batch(b, mesh, rules)  # rows that do not divide: a named error
      return jax.device_put(b, batch_sh)
    return distributed.global_batch(b, {t: held[t] for t in b}, batch_sh,
                                    {t: global_rows[t] for t in b})
  data_iter = prefetch.Prefetcher(data_iter, depth=2, put=put)
  closers.append(data_iter.close)
  # With several processes a signal may reach one host only: each step carries the maximum
  # signal number over the processes (an all-reduce dispatched with the step), and every
  # process stops at the first step whose drained value is set, so all save the same step.
  # The value is `distributed.stop_code` (signal and process), so the line names who got it.
  stop_flag = distributed.stop_flag_fn(mesh) if multi else None
  agreed = [0]  # multi: the largest stop code seen in drained steps

  total = config.train.steps
  split = config.data.eval_split

  def is_eval_step(step: int) -> bool:
    return (config.train.eval_every and step % config.train.eval_every == 0) or step == total

  # A checkpoint at an evaluation step was saved before that evaluation: evaluate there again.
  eval_again = bool(start) and is_eval_step(start)
  writer.truncate_after(start, eval_before=start if eval_again else None)

  pending: list[tuple[int, Any]] = []  # device metrics not yet fetched
  final_metrics: dict[str, float] = {}
  compile_s: float | None = None

  def drain(keep: int) -> None:
    """Fetches all but the newest `keep` pending steps' metrics into the window, in order;
    a non-finite step halts (train.on_nonfinite=halt) or is counted as skipped."""
    nonlocal pending
    if len(pending) <= keep:
      return
    todo, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
    for s, ms in jax.device_get(todo):
      host = {k: float(v) for k, v in ms.items()}
      agreed[0] = max(agreed[0], int(host.pop("stop", 0)))  # a stop_code
      if host["nonfinite"]:
        in_batch = {k.split("/")[1]: v for k, v in host.items()
                    if k.startswith("train/") and k.endswith("/loss") and k.count("/") == 2}
        bad = [t for t, v in in_batch.items() if not math.isfinite(v)] or list(in_batch)
        where = f" (task {', '.join(bad)})"
        if config.train.on_nonfinite == "halt":
          ckpt.wait()  # earlier (good) saves still in flight are committed first
          kept = ckpt.latest_step()
          raise NonFiniteError(
              f"non-finite loss or gradient at step {s}{where}; stopped "
              f"(train.on_nonfinite='halt'); last good checkpoint: "
              f"{'step ' + str(kept) if kept else 'none'} in {ckpt.directory}")
        meta["skipped"] += 1
        logging.warning("step %d: non-finite loss or gradient%s; update skipped", s, where)
        # A skipped step's losses stay out of the window means, even where finite.
        host = {k: (math.nan if k.startswith("train/") else v) for k, v in host.items()}
      window.append({k: v for k, v in host.items() if k.startswith("train/") or k == "grad_norm"})

  def save(step: int) -> None:
    try:
      ckpt.save(step, state, data_iter.get_state(),
                {**meta, "window": _encode_window(window), "fingerprint": fp})
    except CheckpointError:
      raise
    except OSError as e:
      raise CheckpointError(f"checkpoint save at step {step} failed: {e} "
                            f"({ckpt.directory})") from e

  def signal_now() -> int | None:
    """The signal this step stops for: the local flag (one process) or the value all processes
    agreed on through the drained steps (several); the one read of the stop flag per step."""
    if multi:
      return (distributed.stop_origin(agreed[0]) or (None,))[0]
    return stop.signal

  def signal_agreed() -> int | None:
    """Between evaluation tasks: the local flag, or a blocking all-reduce of it (several)."""
    if multi:
      agreed[0] = max(agreed[0], distributed.agree_max(distributed.stop_code(stop.signal)))
      return (distributed.stop_origin(agreed[0]) or (None,))[0]
    return stop.signal

  def announce(signum: int, rest: str) -> None:
    """The stop's line (`distributed.announce_stop`: which process received the signal)."""
    distributed.announce_stop(agreed[0] if multi else distributed.stop_code(signum, 0),
                              stop.signal, rest)

  def stop_now(step: int, signum: int) -> None:
    """After a signal: the checkpoint of `step` is issued; wait until it is on disk, say so."""
    ckpt.wait()
    if not ckpt.committed(step):
      raise CheckpointError(f"received signal {signum}, but the checkpoint at step {step} "
                            f"is not on disk (latest: {ckpt.latest_step()}) in {ckpt.directory}")
    announce(signum, f"saved checkpoint at step {step}, exiting")
    raise SystemExit(128 + signum)

  def evaluate(step: int) -> None:
    """Evaluates at `step` (its checkpoint is already issued); feeds the optimizers' score."""
    nonlocal final_metrics
    try:
      out = _run_eval(config, eval_sets, state, graphdef, predict, tokenizer, mesh,
                      should_stop=lambda: signal_agreed() is not None)
    except (config_lib.ConfigError, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 - named, with the traceback kept in W/errors.log
      where = _record_error(wd, step, "evaluation failed") if primary else ""
      ckpt.wait()  # the message says the step's checkpoint is kept: make it true first
      raise EvalError(f"evaluation at step {step} failed: {type(e).__name__}: {e}; the "
                      f"checkpoint at step {step} is kept, run again to evaluate{where}") from e
    if out is None:
      stop_now(step, signal_agreed())
    metrics, rows = out
    writer.write(step, "eval", metrics)
    val = _val_metric(config, tasks, metrics)
    if math.isfinite(val):
      meta["val_metric"] = val
      meta["val_count"] += 1
    elif metrics:
      logging.warning("step %d: validation score is not finite; not fed to the optimizer", step)
    if step == total:
      final_metrics = metrics
      if primary:
        _write_outputs(wd, split, metrics, rows, step)

  early = signal_agreed()
  if early is not None:  # a signal during set-up: nothing new to save
    announce(early, f"stopped before the first step, nothing to save (latest checkpoint: "
                    f"{start or 'none'}), exiting")
    raise SystemExit(128 + early)
  if eval_again:
    evaluate(start)
  progress = writers.Progress(total, start, config.train.progress if primary else "none")
  closers.append(progress.close)
  tokens, t_last, paused = 0, time.time(), 0.0  # paused: eval/checkpoint time, not step time
  for step in range(start + 1, total + 1):
    batch = next(data_iter)  # global arrays (see `put`)
    state, m = train_step(state, batch, jnp.float32(meta["val_metric"]),
                          jnp.int32(meta["val_count"]))
    if multi:
      m = {**m, "stop": stop_flag(distributed.stop_code(stop.signal))}
    pending.append((step, m))
    if compile_s is None:  # this process's first step: compilation + one step, timed apart
      jax.block_until_ready(m)
      compile_s = time.time() - t_last
      tokens, t_last = 0, time.time()
      progress.start_clock(step)
    else:
      tokens += _tokens(batch)
    drain(keep=1)  # the previous step's metrics: the device stays one step ahead
    ckpt.check()  # a failed background save stops the run now, naming its step

    signum = signal_now()
    stopping = signum is not None
    do_eval = is_eval_step(step)
    do_log = step % config.train.log_every == 0 or step == total
    do_save = step % config.train.checkpoint_every == 0 or do_eval or stopping
    if do_log or do_save:
      drain(keep=0)
    t_pause = time.time()
    if do_log:
      now = time.time()
      # NaN (written as null) for a window holding only the first, compiling step.
      tps = tokens / max(now - t_last - paused, 1e-9) if tokens else math.nan
      tokens, t_last, paused, t_pause = 0, now, 0.0, now
      row = writers.window_means(window)
      window = []
      row["train/tokens_per_s"] = tps
      row["train/skipped_steps"] = meta["skipped"]
      row["train/compilations"] = train_step.trace_count()  # step variants, this process
      if compile_s is not None and compile_s >= 0:
        row["train/compile_s"] = compile_s
        compile_s = -1.0  # logged once per process
      writer.write(step, "train", row)
      progress.update(step, row["train/loss"], tps)
    if do_save:
      save(step)
    if stopping:
      stop_now(step, signum)
    if do_eval:
      evaluate(step)
    paused += time.time() - t_pause
  return final_metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike[str]) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir`; writes the outputs of `data.eval_split`.

  Reads the checkpoints without touching them (a running job's in-flight save is left alone)
  and holds the workdir's lock while it writes its outputs.
  """
  wd = _workdir(workdir)
  ckpt_dir = wd / "checkpoints"
  if not ckpt_dir.is_dir():
    raise config_lib.ConfigError(f"--workdir {wd}: no checkpoints/ directory (train first)")
  with _lock(wd, "eval"), StopRequest() as stop:
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
    try:  # closed whatever happens (a refused checkpoint, a failed restore)
      found = ckpt.read_latest_meta()
      distributed.decide_together(  # a host that sees no checkpoint stops every process
          lambda: check_found(found, config, wd, ckpt_dir), config_lib.ConfigError)
      mesh, tasks, tokenizer, _, state, graphdef, shardings = _prepare(config, wd)
      vocab = workdir_lib.digest_text(tokenizer.backend.to_str())

      def check(step, meta):
        workdir_lib.check_config(meta, config, workdir=wd, step=step)
        workdir_lib.check_vocabulary(meta, vocab, workdir=wd, step=step)

      restored = ckpt.restore_latest(checkpoint_lib.abstract_like(state, shardings),
                                     check=check)
    finally:
      ckpt.close()
    step, state = restored[0], restored[1]
    predict = step_lib.make_predict_fn(graphdef, config, shardings, mesh)
    out = _run_eval(config, _eval_sets(config, tasks, tokenizer), state, graphdef, predict,
                    tokenizer, mesh, should_stop=eval_stop_check(stop))
    if out is None:
      eval_stopped(stop)
    metrics, rows = out
    if distributed.is_primary():
      _write_outputs(wd, config.data.eval_split, metrics, rows, step)
  return {"step": step, "split": config.data.eval_split, **metrics}


def check_found(found: tuple[int, dict] | None, config: ml_collections.ConfigDict,
                wd: epath.Path, ckpt_dir: epath.Path) -> None:
  """For `jmtl eval`: ConfigError when `found` (`Checkpointer.read_latest_meta`) is None or
  its config is another run's (`workdir_lib.check_config`)."""
  if found is None:
    raise config_lib.ConfigError(f"--workdir {wd}: no complete checkpoint in {ckpt_dir}")
  workdir_lib.check_config(found[1], config, workdir=wd, step=found[0])


def eval_stop_check(stop: StopRequest) -> Callable[[], bool]:
  """`should_stop` for `_run_eval` outside training (`jmtl eval`): whether a signal arrived,
  agreed by all processes (a collective per call, made between tasks on every process)."""
  return lambda: distributed.agree_max(distributed.stop_code(stop.signal)) > 0


def eval_stopped(stop: StopRequest) -> NoReturn:
  """`jmtl eval` stopped by SIGTERM/SIGINT: nothing to save (no outputs were written); one
  line, exit 128 + signal (the signal number agreed by all processes)."""
  code = distributed.agree_max(distributed.stop_code(stop.signal))
  distributed.announce_stop(code, stop.signal, "evaluation stopped, nothing to save (no outputs "
                            "written), exiting")
  raise SystemExit(128 + distributed.stop_origin(code)[0])


def load_metrics(workdir: str | os.PathLike[str]) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl`."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
