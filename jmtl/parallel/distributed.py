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
  `agree_max` (an all-reduce of a host value) and `broadcast_text` (process 0's text); a
  check that may fail on one host only (a checkpoint of other data) is decided together
  (`decide_together`), and a stop names the process that received the signal (`stop_code`).
- Only the primary process (`is_primary`, process 0) writes files other than checkpoints;
  Orbax saves and restores from all processes.
- Set-up mistakes (a duplicate `dist.process_id`, a `dist.num_processes` that differs or counts
  processes that never come, different configs) are named in one line before JAX's runtime
  starts, by a roll call on the coordinator's port (`check_coordinator`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

_log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
  """A broadcast value failed on process 0 (its message is carried to every process)."""


def initialize(dist_cfg: Any, config: dict[str, Any] | None = None) -> bool:
  """Joins the processes of a multi-host run; returns True when JAX's distributed runtime is on.

  `dist.initialize = False` (default): nothing (one process). True: `jax.distributed.initialize`
  with `dist.coordinator_address` ("host:port"), `dist.num_processes` and `dist.process_id`,
  each left to JAX's cluster detection when empty / 0 / -1 (TPU VMs, Slurm, Open MPI fill them
  in). With the address and the id given, `check_coordinator` runs first (a roll call of the
  processes when `dist.num_processes` is given too; `config`, the run's flat config without
  `dist.process_id`, is compared there). On CPU the collectives across processes use gloo.
  Must run before anything touches the devices. Raises SetupError (a whole error line naming
  the `dist.*` key) for a set-up mistake the roll call finds, otherwise whatever
  `jax.distributed.initialize` raises (a timeout), and RuntimeError when called twice.
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
                      float(dist_cfg.initialization_timeout_s or 300),
                      num_processes=kwargs.get("num_processes", 0), config=config)
  # Only the CPU client's cross-process collectives (harmless on TPU/GPU hosts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  global _first_run_timeout_s
  _first_run_timeout_s = float(dist_cfg.initialization_timeout_s or _DEFAULT_TIMEOUT_S)
  _log.info("distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count())
  return True


class SetupError(RuntimeError):
  """A multi-host set-up mistake found before JAX's runtime starts (`check_coordinator`). The
  message is the whole error line: it names the `dist.*` key and the values, and every process
  that took part in the roll call gets the same one."""


# The roll call's wire format: one line each way, `_MAGIC` + JSON object + b"\n".
_MAGIC = b"jmtl-roll-call/1 "
_MAX_LINE = 1 << 24
# After a mistake is found, process 0 keeps answering latecomers with it for this long (or
# until every process id any of them counts has come), so that they print the line too.
_ERROR_GRACE_S = 5.0
# The most a connection may take to send its line to process 0 (a silent one is dropped).
_READ_S = 5.0


class _NoAnswer(Exception):
  """The peer closed the connection before sending a byte (retry: e.g. a listener closing)."""


class _NotRollCall(Exception):
  """The peer answered, but not in the roll call's format (another program on the port)."""


def check_coordinator(address: str, process_id: int, timeout_s: float, *,
                      num_processes: int = 0, config: dict[str, Any] | None = None) -> None:
  """Checks a multi-host set-up before JAX's runtime, which answers the same mistakes with a
  C++ abort after its own timeout. Raises SetupError with one line naming the key and values.

  Without `num_processes` (0: detected by JAX), a probe: process 0 must be able to listen on the
  port of `address` ("host:port"), every other process must reach it (TCP connect, retried
  until `timeout_s` seconds).

  With `num_processes` N, a roll call over plain TCP on that port: process 0 listens; every
  other process connects (retried until `timeout_s`) and sends its id, N and `config` (a flat
  `{dotted key: JSON value}` dict, or None); process 0 waits, at most `timeout_s` s, until ids
  1..N-1 have come, checks in this order that every N equals its own
  (`dist.num_processes`), that the ids are in 0..N-1 and unique (`dist.process_id`; a second
  process 0, which cannot listen, joins as a client to be named), and that the configs equal its
  own (the line `check_same_config` gives); then it closes the port, which
  `jax.distributed.initialize` binds next, answers "ok" or the error line to every process and
  waits briefly for them to hang up (so that TIME_WAIT stays on their side). After an "ok" the
  others wait until the port listens again (`_wait_for_service`). Ids that never came by the
  timeout are named. After a mistake, process 0 answers at once and still answers latecomers for
  up to `_ERROR_GRACE_S` s. A process that meets something other than the roll call on the port
  (process 0 has started the run already, or another program uses the port) is told so.
  """
  host, port = _host_port(address)
  if process_id == 0:
    try:
      listener = _listen(port)
    except OSError as e:
      busy = (f"config key 'dist.coordinator_address': process 0 cannot listen on port {port} of "
              f"{address!r} ({e.strerror or e}); is another run using it, or is "
              f"dist.process_id = 0 given to two processes?")
      if num_processes > 0:  # perhaps another process 0 holds the roll call: it names us both
        _ask_as_second_process_0(host, port, num_processes, config)
      raise SetupError(busy) from e
    with listener:
      if num_processes > 0:
        _hold_roll_call(listener, num_processes, config, timeout_s)
    return
  message = {"process_id": int(process_id), "num_processes": int(num_processes),
             "config": config}
  deadline = time.monotonic() + max(timeout_s, 0.0)
  hung_up = ok = False
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=2.0)
    except OSError as e:
      last: BaseException = e
    else:
      with conn:
        if num_processes <= 0:
          return
        try:
          answer = _exchange(conn, message, timeout_s + _ERROR_GRACE_S + 10.0)
        except _NoAnswer as e:
          hung_up, last = True, e
        except _NotRollCall as e:
          raise SetupError(
              f"config key 'dist.process_id' = {process_id}: {address!r} answered, but not as "
              f"jmtl's roll call ({e}): process 0 has started the run already with its "
              f"dist.num_processes = {num_processes} processes (is this id given to two "
              f"processes?), or another program uses that port") from e
        except TimeoutError as e:
          raise SetupError(
              f"config key 'dist.coordinator_address': process 0 at {address!r} gave no answer "
              f"to the roll call within {timeout_s + _ERROR_GRACE_S + 10.0:g} s") from e
        else:
          if answer.get("error"):
            raise SetupError(str(answer["error"]))
          ok = True
    if ok:
      _wait_for_service(host, port, time.monotonic() + min(timeout_s, 10.0))
      return
    if time.monotonic() >= deadline:
      if hung_up:
        raise SetupError(
            f"config key 'dist.coordinator_address': {address!r} accepted connections but never "
            f"answered jmtl's roll call within {timeout_s:g} s: process 0 has started the run "
            f"already (is dist.process_id = {process_id} given to two processes?), or another "
            f"program uses that port") from last
      reason = getattr(last, "strerror", None) or last
      raise SetupError(
          f"config key 'dist.coordinator_address': the coordinator {address!r} (process 0) was "
          f"not reachable within {timeout_s:g} s ({reason}); start process 0 first, or check "
          f"the address and port") from last
    time.sleep(0.5)


def _wait_for_service(host: str, port: int, deadline: float) -> None:
  """After an "ok": polls the port (every 50 ms) until JAX's coordination service listens there,
  or until `deadline` (then JAX's own timeout applies), so that JAX's client does not meet a
  refused port, which its gRPC channel answers with a reconnect backoff (measured: ~1 s more to
  join)."""
  while True:
    try:
      socket.create_connection((host, port), timeout=1.0).close()
      return
    except OSError:
      if time.monotonic() >= deadline:
        return
      time.sleep(0.05)


def _host_port(address: str) -> tuple[str, int]:
  host, sep, port_text = address.rpartition(":")
  if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
    raise SetupError(f"config key 'dist.coordinator_address': {address!r} is not host:port")
  return host.strip("[]"), int(port_text)


def _listen(port: int) -> socket.socket:
  """A listening TCP socket on every address (IPv4 and IPv6 where the host has both), with
  SO_REUSEADDR (a port whose old connections linger in TIME_WAIT is free) but not SO_REUSEPORT
  (a port another program listens on is busy)."""
  dual = socket.has_dualstack_ipv6()
  return socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                              backlog=1024, dualstack_ipv6=dual)


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
  conn.sendall(_MAGIC + json.dumps(obj).encode() + b"\n")


def _read(conn: socket.socket, timeout_s: float) -> dict[str, Any]:
  """One roll-call line from `conn` within `timeout_s` s. Raises _NoAnswer (closed before a
  byte), _NotRollCall (other bytes, or a line that is not a JSON object), TimeoutError."""
  deadline = time.monotonic() + timeout_s
  buf = b""
  while b"\n" not in buf:
    left = deadline - time.monotonic()
    if left <= 0:
      raise TimeoutError("no answer")
    conn.settimeout(left)
    try:
      chunk = conn.recv(65536)
    except (ConnectionResetError, ConnectionAbortedError) as e:
      if not buf:
        raise _NoAnswer(str(e)) from e
      raise _NotRollCall(f"the connection was reset after {len(buf)} bytes") from e
    if not chunk:
      if not buf:
        raise _NoAnswer("closed")
      break
    buf += chunk
    if not _MAGIC.startswith(buf[:len(_MAGIC)]):
      raise _NotRollCall("it speaks another protocol")
    if len(buf) > _MAX_LINE:
      raise _NotRollCall("its line is too long")
  line = buf.split(b"\n", 1)[0]
  if not line.startswith(_MAGIC):
    raise _NotRollCall("it speaks another protocol")
  try:
    obj = json.loads(line[len(_MAGIC):])
  except ValueError as e:
    raise _NotRollCall("its line is not JSON") from e
  if not isinstance(obj, dict):
    raise _NotRollCall("its line is not a JSON object")
  return obj


def _exchange(conn: socket.socket, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Sends `message` and reads the answer (see `_read`); a reset while sending is _NoAnswer."""
  try:
    _send(conn, message)
  except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
    raise _NoAnswer(str(e)) from e
  return _read(conn, timeout_s)


def _ask_as_second_process_0(host: str, port: int, num_processes: int,
                             config: dict[str, Any] | None) -> None:
  """Process 0 could not listen: if another process 0 holds the roll call there, join it as id 0
  so that it names the duplicate to everybody (raises SetupError with its line); returns when
  the port holds something else."""
  try:
    with socket.create_connection((host, port), timeout=2.0) as conn:
      answer = _exchange(conn, {"process_id": 0, "num_processes": int(num_processes),
                                "config": config}, _READ_S)
  except (OSError, _NoAnswer, _NotRollCall):
    return
  if answer.get("error"):
    raise SetupError(str(answer["error"]))


def _ids(ids: list[int]) -> str:
  shown = ", ".join(str(i) for i in ids[:10])
  return shown + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")


def _roll_call_error(came: list[dict[str, Any]], num_processes: int,
                     config: dict[str, Any] | None) -> str | None:
  """The first mistake among the processes that came (their messages), or None."""
  other_n = [(m["process_id"], m["num_processes"]) for m in came
             if m["num_processes"] != num_processes]
  if other_n:
    shown = ", ".join(f"{n} on process {p}" for p, n in other_n[:5])
    return (f"config key 'dist.num_processes' differs between the processes of this run: "
            f"{num_processes} on process 0, {shown}; start every process with the same value")
  ids = [m["process_id"] for m in came]
  outside = sorted({p for p in ids if not 0 <= p < num_processes})
  if outside:
    return (f"config key 'dist.process_id' = {outside[0]} is not below dist.num_processes = "
            f"{num_processes}; the ids are 0..{num_processes - 1}")
  counts = collections.Counter([0, *ids])
  twice = sorted(p for p, k in counts.items() if k > 1)
  if twice:
    return (f"config key 'dist.process_id' = {twice[0]} is given to {counts[twice[0]]} "
            f"processes; each of the dist.num_processes = {num_processes} processes needs its "
            f"own id in 0..{num_processes - 1}")
  if config is not None:
    diffs = []
    for m in came:
      theirs = m.get("config")
      if isinstance(theirs, dict):
        diffs += [(m["process_id"], k, theirs.get(k)) for k in sorted(set(config) | set(theirs))
                  if config.get(k) != theirs.get(k)]
    if diffs:
      return _different_configs(config, diffs)
  return None


def _valid(message: dict[str, Any]) -> bool:
  return (isinstance(message.get("process_id"), int) and
          isinstance(message.get("num_processes"), int) and
          (message.get("config") is None or isinstance(message.get("config"), dict)))


def _hold_roll_call(listener: socket.socket, num_processes: int, config: dict[str, Any] | None,
                    timeout_s: float) -> None:
  """Process 0's side of `check_coordinator`'s roll call on `listener` (closed when everybody
  came or the time is up, before the answers go out)."""
  deadline = time.monotonic() + max(timeout_s, 0.0)
  until = deadline
  came: list[tuple[socket.socket, dict[str, Any]]] = []
  answered: set[int] = set()  # indices into `came`
  error: str | None = None

  def answer(i: int) -> None:
    try:
      _send(came[i][0], {"error": error} if error else {"ok": True})
    except OSError:
      pass  # it went away; it learns nothing more from us
    answered.add(i)

  try:
    while True:
      expected = num_processes if error is None else max(
          [num_processes] + [m["num_processes"] for _, m in came])
      if set(range(1, expected)) <= {m["process_id"] for _, m in came}:
        break
      left = until - time.monotonic()
      if left <= 0:
        break
      listener.settimeout(left)
      try:
        conn, _ = listener.accept()
      except TimeoutError:
        break
      try:
        message = _read(conn, min(_READ_S, left + 1.0))
      except (OSError, _NoAnswer, _NotRollCall):
        message = None
      if message is None or not _valid(message):
        conn.close()  # not one of ours (a port probe, a health check)
        continue
      came.append((conn, message))
      if error is None:
        error = _roll_call_error([m for _, m in came], num_processes, config)
        if error is not None:
          until = min(deadline, time.monotonic() + _ERROR_GRACE_S)
      if error is not None:
        for i in range(len(came)):
          if i not in answered:
            answer(i)
    listener.close()  # latecomers are refused from now on; JAX's service binds the port next
    if error is None and len(came) < num_processes - 1:
      seen = sorted({0} | {m["process_id"] for _, m in came})
      missing = [p for p in range(num_processes) if p not in seen]
      error = (f"config key 'dist.num_processes' = {num_processes}: process id"
               f"{'s' if len(missing) > 1 else ''} {_ids(missing)} never joined within "
               f"{timeout_s:g} s (dist.initialization_timeout_s; joined: {_ids(seen)}); start "
               f"every process, or lower dist.num_processes")
    for i in range(len(came)):
      if i not in answered:
        answer(i)
    # Let the others hang up first (their side keeps the TIME_WAIT), briefly.
    hang_up = time.monotonic() + 2.0
    for conn, _ in came:
      try:
        conn.settimeout(max(hang_up - time.monotonic(), 0.01))
        while conn.recv(4096):
          pass
      except OSError:
        pass
  finally:
    for conn, _ in came:
      conn.close()
  if error is not None:
    raise SetupError(error)


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
  reduce = first_run_sync(jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec())),
                          "stop_flag")

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


def decide_together(check: Callable[[], Any], error: type[Exception]) -> None:
  """Runs `check()` on every process and makes its verdict the run's: when it raised `error`
  on any process, every process raises `error` with one and the same message, the first
  refusing process's, prefixed with the processes that refused (`process 1: ...`).

  A verdict one process reaches alone (a checkpoint that does not match the data that host
  reads) would otherwise send it out of the run while the others wait in the next collective
  (Orbax's restore barrier) forever. A collective (an all-gather of the messages): every
  process must call it at the same point. One process: `check()` as is.
  """
  if not multi_process():
    check()
    return
  mine: Exception | None = None
  try:
    check()
  except error as e:
    mine = e
  texts = gather_text("" if mine is None else (str(mine) or type(mine).__name__))
  line = refusal_line(texts)
  if line is not None:
    raise error(line) from mine


def refusal_line(texts: list[str]) -> str | None:
  """The message `decide_together` raises for the processes' messages `texts` (in process
  order, "" where the check passed): the first refusing process's, prefixed with its id and
  the ids of the others that refused; None when none refused."""
  refused = [p for p, t in enumerate(texts) if t]
  if not refused:
    return None
  who = f"process {refused[0]}"
  if len(refused) > 1:
    who += (f" (also refused on process{'es' if len(refused) > 2 else ''} "
            f"{_ids(refused[1:])})")
  return f"{who}: {texts[refused[0]]}"


def differing_processes(value: str) -> list[int]:
  """The processes whose `value` differs from process 0's, in order (a collective: every
  process must call it at the same point, and all get the same list; [] with one process)."""
  if not multi_process():
    return []
  texts = gather_text(value)
  return [p for p, t in enumerate(texts) if t != texts[0]]


# An agreed stop carries which process received which signal: `stop_code` packs both into one
# int whose maximum over processes (`agree_max`, `stop_flag_fn`) is the largest signal number,
# and among the processes that received it the lowest id.
_STOP_IDS = 1 << 16


def stop_code(signum: int | None, process: int | None = None) -> int:
  """This process's stop value for an all-reduce max: 0 without a signal, else
  `signum * 65536 + (65535 - process)` (`process`: this process's index when None)."""
  if not signum:
    return 0
  process = jax.process_index() if process is None else process
  return int(signum) * _STOP_IDS + (_STOP_IDS - 1 - process)


def stop_origin(code: int) -> tuple[int, int] | None:
  """(signal number, process that received it) of an agreed `stop_code`; None for 0."""
  if not code:
    return None
  return code // _STOP_IDS, _STOP_IDS - 1 - code % _STOP_IDS


def announce_stop(code: int, own: int | None, rest: str) -> None:
  """The line of a stop agreed as `code` (`stop_code`, maxed over processes), `rest` being
  what was done (`saved checkpoint at step 4, exiting`).

  One process: `received signal N: rest` on stdout. Several: process 0 prints `process P
  received signal N: rest` on stdout (P received it, not necessarily process 0), and a process
  other than 0 that received signal `own` itself prints `process Q received signal own: rest`
  on its own stderr, so the host where the signal was sent says what became of it.
  """
  origin = stop_origin(code)
  if origin is None:
    return
  signum, process = origin
  if not multi_process():
    print(f"received signal {signum}: {rest}", flush=True)
    return
  if is_primary():
    print(f"process {process} received signal {signum}: {rest}", flush=True)
  elif own:
    print(f"process {jax.process_index()} received signal {own}: {rest}", file=sys.stderr,
          flush=True)


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
    raise ValueError(_different_configs(first, diffs))


def _different_configs(first: dict[str, Any], diffs: list[tuple[int, str, Any]]) -> str:
  """The error line for configs that differ from process 0's `first`: `diffs` holds
  (process, key, that process's value); the first 5 are shown. Shared by the roll call
  (`check_coordinator`) and `check_same_config`."""
  shown = "; ".join(f"{k}: {first.get(k)!r} on process 0, {v!r} on process {p}"
                    for p, k, v in diffs[:5])
  return (f"the processes of this run have different configs ({shown}); start every process "
          f"with the same config and overrides")


def abandon(code: int) -> None:
  """Ends this process of a multi-host run at once with exit status `code`, skipping the
  distributed runtime's shutdown barrier (which would wait for processes that are still inside
  a collective): the others then stop when the coordination service sees this one gone."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


# How long `first_run_sync` waits at its barrier: dist.initialization_timeout_s (set by
# `initialize`; 0 there = this default, JAX's own join timeout).
_DEFAULT_TIMEOUT_S = 300.0
_first_run_timeout_s = _DEFAULT_TIMEOUT_S
# How many new executables `first_run_sync` has met per name (the barriers' key suffix).
_first_runs: collections.Counter[str] = collections.Counter()


def _signature(args: tuple, kwargs: dict) -> Any:
  """What a jitted function's executable depends on: the pytree structure of the arguments and,
  per leaf, (shape, dtype, weak_type, sharding) for arrays, the value for anything else (a
  static argument; `repr` when it is not hashable)."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  sig = []
  for x in leaves:
    if isinstance(x, jax.Array):
      sig.append((x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding))  # key arrays: none
    elif isinstance(x, (np.ndarray, np.generic)):
      sig.append((np.shape(x), np.asarray(x).dtype))
    else:
      try:
        hash(x)
        sig.append((type(x), x))
      except TypeError:
        sig.append((type(x), repr(x)))
  return treedef, tuple(sig)


def first_run_sync(fn: Any, name: str) -> Callable[..., Any]:
  """`fn` (a `jax.jit` function) made safe against one process reaching a new executable's
  collectives much later than the others (a slow compile, a persistent-cache miss on one host,
  a slow first batch). Same call signature and results as `fn`.

  Why: on CPU, XLA's cross-process collectives use gloo. A gloo context belongs to a *clique*
  (the set of global devices of one collective's replica group), not to an executable: the
  first collective over a device set builds it (`connectFullMesh`), each rank publishing its
  address under the key `gloo/<device ids>/<rank>` in the coordination service's key-value
  store and reading the others' with a fixed 30 s `GetKeyValue` timeout (a failing key such as
  `cpu:gloo/0,1,2,3,2048,2049,2050,2051/4` names the 8 devices of the train step's all-reduce
  and rank 4, process 1's first device). Measured (jax 0.10, 2 processes x 4 CPU devices): a
  new executable whose collective runs over a device set an earlier executable already used
  waits 40 s for a late process without error (the context is reused and its operations have
  no such timeout), while a first collective over a new device set (the train step's 8-device
  all-reduce after the start-up checks' 2-device ones) fails after 30 s, and jax has no setting
  for that timeout. So the danger is the first run of an executable; this wrapper makes every
  process reach it together, through the coordination service's barrier (whose timeout is
  settable) instead of through gloo.

  How: with more than one process, a call whose signature (`_signature`: argument structure,
  shapes, dtypes, shardings, static values) this wrapper has not seen first compiles ahead
  (`fn.lower(...).compile()`; `fn`'s own cache then serves the call, with no second trace or
  compile), then waits at the barrier `jmtl/first-run/<name>/<i>` (the i-th new executable met
  under `name` in this process, the same on every process because they run the same program)
  from `orbax.checkpoint.multihost.get_barrier_sync_fn`, for at most dist.initialization_timeout_s
  seconds (a process that never comes: JaxRuntimeError DEADLINE_EXCEEDED, which the CLI
  reports as a lost process), then calls `fn`. With one process it calls `fn` directly (no
  ahead-of-time compile, no extra trace). `name` must be unique per function (e.g.
  "train_step"); the wrapper keeps `fn` as `.jitted`.
  """
  seen: set[Any] = set()

  def call(*args: Any, **kwargs: Any) -> Any:
    if jax.process_count() > 1:
      sig = _signature(args, kwargs)
      if sig not in seen:
        fn.lower(*args, **kwargs).compile()
        index = _first_runs[name]
        _first_runs[name] += 1
        _log.info("first run of %s #%d: waiting for every process", name, index)
        ocp_multihost.get_barrier_sync_fn()(key=f"jmtl/first-run/{name}/{index}",
                                            timeout_ms=int(_first_run_timeout_s * 1000))
        seen.add(sig)
    return fn(*args, **kwargs)

  call.jitted = fn  # type: ignore[attr-defined]
  return call


def barrier(name: str) -> None:
  """All processes wait here (no-op with one process)."""
  if multi_process():
    multihost_utils.sync_global_devices(name)
