"""Multi-host runs on JAX's multi-controller runtime: one Python process per host, one mesh.

Every process runs the same program; `jax.distributed.initialize` joins them (`dist.*` keys, or
the cluster environment JAX detects by itself: Cloud TPU pods, Slurm, Open MPI). What jmtl does
on top, so that a run gives the same numbers whatever the process count:

- A batch is defined globally (the same rows in the same order as a one-process run); each
  process featurizes only the rows its devices hold under the batch sharding (`local_rows`,
  derived from the sharding, not from the process index, so any device order works) and
  `global_array` assembles one global `jax.Array` from those rows.
- Outputs are fetched with `to_host` (an all-gather when other processes hold parts).
- Decisions that must agree (stop after a signal, the tokenizer of a run) are made once:
  `agree_max` (an all-reduce of a host value) and `broadcast_text` (process 0's text).
- Only the primary process (`is_primary`, process 0) writes files other than checkpoints;
  Orbax saves and restores from all processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

_log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
  """A broadcast value failed on process 0 (its message is carried to every process)."""


def initialize(dist_cfg: Any) -> bool:
  """Joins the processes of a multi-host run; returns True when JAX's distributed runtime is on.

  `dist.initialize = False` (default): nothing (one process). True: `jax.distributed.initialize`
  with `dist.coordinator_address` ("host:port"), `dist.num_processes` and `dist.process_id`,
  each left to JAX's cluster detection when empty / 0 / -1 (TPU VMs, Slurm, Open MPI fill them
  in). On CPU the collectives across processes use gloo. Must run before anything touches the
  devices. Raises whatever `jax.distributed.initialize` raises (a coordinator that cannot be
  reached, a timeout), and RuntimeError when called twice.
  """
  if not dist_cfg.initialize:
    return False
  kwargs: dict[str, Any] = {}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs["num_processes"] = int(dist_cfg.num_processes)
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = int(dist_cfg.process_id)
  if dist_cfg.initialization_timeout_s > 0:
    kwargs["initialization_timeout"] = int(dist_cfg.initialization_timeout_s)
  if "coordinator_address" in kwargs and "process_id" in kwargs:
    check_coordinator(kwargs["coordinator_address"], kwargs["process_id"],
                      float(dist_cfg.initialization_timeout_s or 300))
  # Only the CPU client's cross-process collectives (harmless on TPU/GPU hosts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  _log.info("distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count())
  return True


def check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
  """Before JAX's runtime (which aborts the process from C++ on these mistakes): process 0 must
  be able to listen on the address's port; every other process must reach it (TCP connect,
  retried until `timeout_s`). Raises RuntimeError naming the address otherwise, or for an
  address that is not host:port."""
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415
  host, sep, port_text = address.rpartition(":")
  if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
    raise RuntimeError(f"coordinator address {address!r} is not host:port")
  port = int(port_text)
  if process_id == 0:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind(("", port))
      except OSError as e:
        raise RuntimeError(f"process 0 cannot listen on port {port} of {address!r} "
                           f"({e.strerror or e}); is another run using it?") from e
    return
  deadline = time.monotonic() + max(timeout_s, 0.0)
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(f"the coordinator {address!r} (process 0) was not reachable within "
                           f"{timeout_s:g} s ({e.strerror or e}); start process 0 first, or "
                           f"check the address and port") from e
      time.sleep(0.5)


def is_primary() -> bool:
  """True on the process that writes the run's files (process 0)."""
  return jax.process_index() == 0


def multi_process() -> bool:
  return jax.process_count() > 1


def local_rows(sharding: NamedSharding, rows: int) -> np.ndarray:
  """Sorted indices of the rows (leading dimension, of `rows`) this process's devices hold.

  From `sharding.addressable_devices_indices_map`: a row replicated on several local devices
  appears once; with one process, every row. Raises ValueError when the sharding splits the
  rows unevenly (the caller checks divisibility first, with a message naming the config key).
  """
  rows = int(rows)
  held: set[int] = set()
  for index in sharding.addressable_devices_indices_map((rows,)).values():
    held.update(range(*index[0].indices(rows)))
  return np.array(sorted(held), dtype=np.int64)


def global_array(local: np.ndarray, rows: np.ndarray, sharding: NamedSharding,
                 global_rows: int) -> jax.Array:
  """One global array of shape (global_rows, *local.shape[1:]) from this process's rows.

  `local[i]` is global row `rows[i]` (`rows` from `local_rows`). Each local device gets its
  slice; other processes fill theirs. With one process this is `device_put`.
  """
  local = np.asarray(local)
  if len(rows) == global_rows:
    return jax.device_put(local, sharding)
  where = {int(r): i for i, r in enumerate(rows)}
  shape = (int(global_rows),) + local.shape[1:]

  def piece(index):
    start, stop, step = index[0].indices(global_rows)
    return local[[where[r] for r in range(start, stop, step)]][(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback(shape, sharding, piece)


def global_batch(batch: dict, rows: dict[str, np.ndarray] | None, sharding: NamedSharding,
                 global_rows: dict[str, int] | None = None) -> dict:
  """`{task: {key: local array}}` -> `{task: {key: global jax.Array}}` over `sharding`.

  `rows[task]` says which global rows the local arrays hold (None: all rows, every process holds
  the whole batch, as in evaluation); `global_rows[task]` the global row count.
  """
  out = {}
  for task, arrays in batch.items():
    out[task] = {}
    for key, x in arrays.items():
      x = np.asarray(x)
      if rows is None:  # every process holds the whole batch: keep only its rows
        n = x.shape[0]
        held = local_rows(sharding, n)
        x = x if len(held) == n else x[held]
      else:
        n, held = int(global_rows[task]), rows[task]
      out[task][key] = global_array(x, held, sharding, n)
  return out


def to_host(tree: Any) -> Any:
  """Numpy copies of every array in `tree`, gathering the parts other processes hold."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def agree_max(value: int) -> int:
  """The maximum of an int over all processes (every process must call it at the same point).

  One process: `value`. Blocks until every process has contributed (a collective).
  """
  if not multi_process():
    return int(value)
  got = multihost_utils.process_allgather(np.array([int(value)], np.int32))
  return int(np.max(got))


def gather_int(value: int) -> list[int]:
  """Every process's int, in process order (a collective: every process must call it at the
  same point; `[value]` with one process)."""
  if not multi_process():
    return [int(value)]
  got = multihost_utils.process_allgather(np.array([int(value)], np.int32))
  return [int(v) for v in np.asarray(got).reshape(-1)]


def stop_flag_fn(mesh: jax.sharding.Mesh) -> Callable[[int], jax.Array]:
  """`fn(local_value) -> int32 scalar` (replicated): the max over processes, dispatched
  asynchronously like a train step (no host wait), so a per-step stop flag can ride along with
  the step's metrics and be read when they are."""
  axes = tuple(mesh.axis_names)
  sh = NamedSharding(mesh, PartitionSpec(axes))
  n = mesh.size
  reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def fn(local_value: int) -> jax.Array:
    x = jax.make_array_from_callback(
        (n,), sh, lambda index: np.full((len(range(*index[0].indices(n))),), local_value,
                                        np.int32))
    return reduce(x)

  return fn


def broadcast_text(make: Callable[[], str]) -> str:
  """Process 0 calls `make()`; every process returns its result (bytes via
  `broadcast_one_to_all`). A failure on process 0 is re-raised there and raised as
  DistributedError with its message on the others, so no process waits forever.
  """
  if not multi_process():
    return make()
  error: BaseException | None = None
  text = ""
  if is_primary():
    try:
      text = make()
    except Exception as e:  # noqa: BLE001 - re-raised below after telling the others
      error, text = e, f"{type(e).__name__}: {e}"
  flag_and_len = np.array([1 if error is not None else 0, len(text.encode())], np.int64)
  flag, length = (int(v) for v in multihost_utils.broadcast_one_to_all(flag_and_len))
  buf = np.frombuffer(text.encode(), np.uint8) if is_primary() else np.zeros((length,), np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  if error is not None:
    raise error
  message = buf.tobytes().decode()
  if flag:
    raise DistributedError(f"process 0: {message}")
  return message


def check_same(what: str, value: str) -> None:
  """Raises ValueError on every process when `value` differs from process 0's (e.g. a relative
  workdir resolving to different paths on different hosts); no-op with one process."""
  if not multi_process():
    return
  first = broadcast_text(lambda: value)
  if agree_max(int(first != value)):
    if first != value:
      raise ValueError(f"{what} is {value!r} on process {jax.process_index()} but {first!r} on "
                       f"process 0; every process must name the same one")
    raise ValueError(f"{what} differs between processes (process 0: {first!r}); every "
                     f"process must name the same one")


def gather_text(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective; `[text]` with one process)."""
  if not multi_process():
    return [text]
  data = text.encode()
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64)))
  buf = np.zeros((max(int(np.max(lengths)), 1),), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [rows[i, :int(n)].tobytes().decode() for i, n in enumerate(lengths.reshape(-1))]


def check_same_config(flat: dict[str, Any]) -> None:
  """Raises ValueError on every process when the processes' configs (`{dotted key: value}`,
  JSON values) differ, naming the differing keys and the processes; no-op with one process.
  Processes with different configs would compute different programs and wait on each other's
  collectives forever."""
  if not multi_process():
    return
  first = json.loads(broadcast_text(lambda: json.dumps(flat, sort_keys=True)))
  keys = sorted(k for k in set(first) | set(flat) if first.get(k) != flat.get(k))
  mine = json.dumps({k: flat.get(k) for k in keys}, sort_keys=True, default=str)
  per_process = [json.loads(t) for t in gather_text(mine)]
  diffs = [(p, k, v) for p, d in enumerate(per_process) for k, v in d.items()]
  if diffs:
    shown = "; ".join(f"{k}: {first.get(k)!r} on process 0, {v!r} on process {p}"
                      for p, k, v in diffs[:5])
    raise ValueError(f"the processes of this run have different configs ({shown}); start "
                     f"every process with the same config and overrides")


def abandon(code: int) -> None:
  """Ends this process of a multi-host run at once with exit status `code`, skipping the
  distributed runtime's shutdown barrier (which would wait for processes that are still inside
  a collective): the others then stop when the coordination service sees this one gone."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def barrier(name: str) -> None:
  """All processes wait here (no-op with one process)."""
  if multi_process():
    multihost_utils.sync_global_devices(name)
