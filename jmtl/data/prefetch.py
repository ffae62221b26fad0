"""Background prefetch of training batches, with an exactly resumable position.

`Prefetcher(iterator, depth=2, put=None)` runs `next(iterator)` (and `put(batch)`, e.g. a
`jax.device_put` to the batch sharding, so the host->device copy overlaps the running step) on
one daemon thread and keeps at most `depth` finished batches in a buffer; the caller's
`next(prefetcher)` takes the oldest.

The state rule (why resume stays exact): the worker produces batch k with `next(iterator)` and
then, before producing anything else, reads `s_k = iterator.get_state()` and stores `s_k` in the
buffer beside batch k. When the caller takes batch k, the prefetcher's own state becomes `s_k`.
So `prefetcher.get_state()` is always the underlying state as of the batches the *caller* has
consumed -- exactly what the plain iterator's `get_state()` would return after the same number
of `next()` calls -- and never the read-ahead position of the thread. Before any batch is
consumed (and right after `set_state(s)`) it is the state the underlying iterator had then.
Saving that state in a checkpoint and restoring it with `set_state` into a fresh iterator (with
or without a prefetcher, any `depth`) replays the same stream from the next unconsumed batch.

Errors: an exception raised by `next(iterator)` or `put` while producing batch k is stored in
the buffer in place of batch k and raised again, the same exception object (original type and
message), by the caller's `next()` that would have returned batch k -- not earlier, however far
the thread has read ahead. The thread stops there; every later `next()` raises it again (so a
`StopIteration` ends iteration for good), and `get_state()` stays at the last good batch.

Threading: the wrapped iterator is touched only by the worker thread while it runs (and by
`set_state`/`close` after they have stopped it). `jmtl.data.pipeline.TrainIterator` is not
thread-safe -- `__next__` mutates `step`/`taken`, and `EpochShuffle` keeps a per-epoch
permutation cache (a dict it evicts from) -- so while a Prefetcher wraps an iterator, use the
iterator only through the Prefetcher: no direct `next()`, `get_state()` or `set_state()`
until `close()`, which sets it back to the consumed position. (grain `MapDataset` random access, numpy and the `tokenizers` library are safe off the main
thread.) The worker waits on a condition variable, never in a polling loop; `close()` (also
`__exit__`, and an interpreter-exit hook for prefetchers never closed) stops and joins it.
"""

from __future__ import annotations

import atexit
import collections
import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol


class StatefulIterator(Protocol):
  """What a Prefetcher wraps: an iterator whose position is a (JSON-like) state value."""

  def __next__(self) -> Any: ...

  def get_state(self) -> Any: ...

  def set_state(self, state: Any) -> None: ...


class _Run:
  """One worker thread's buffer and flags, all guarded by `cond`. A fresh `_Run` per thread
  start, so a thread being stopped can never write into its successor's buffer."""

  def __init__(self):
    self.cond = threading.Condition()
    # Items: (batch, state after producing it, None) or (None, None, exception).
    self.items: collections.deque[tuple[Any, Any, BaseException | None]] = collections.deque()
    self.stop = False
    self.done = False  # the worker has exited (after an error, or when stopped)


def _work(run: _Run, iterator: StatefulIterator, depth: int,
          put: Callable[[Any], Any] | None) -> None:
  """The worker thread: produce (batch, state) items into `run.items` (at most `depth`) until
  stopped, or until an exception, which is buffered as the last item."""
  try:
    while True:
      with run.cond:
        while len(run.items) >= depth and not run.stop:
          run.cond.wait()
        if run.stop:
          return
      try:
        batch = next(iterator)
        if put is not None:
          batch = put(batch)
        item = (batch, copy.deepcopy(iterator.get_state()), None)
      except BaseException as e:  # noqa: BLE001  (handed to the caller, StopIteration too)
        item = (None, None, e)
      with run.cond:
        if run.stop:
          return
        run.items.append(item)
        run.cond.notify_all()
      if item[2] is not None:
        return
  finally:
    with run.cond:
      run.done = True
      run.cond.notify_all()


_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
  """At interpreter exit, stop every prefetcher still running (bounded wait per thread)."""
  for p in list(_LIVE):
    p._halt(timeout=5.0)


class Prefetcher:
  """Iterates `iterator` through a background thread that reads `depth` batches ahead.

  Args:
    iterator: anything with `__next__`, `get_state()` and `set_state(state)` (e.g.
      `jmtl.data.pipeline.TrainIterator`); `get_state()` must return a snapshot, not a live
      view. From construction until `close()`, use it only through this object.
    depth: the most finished batches held in the buffer (>= 1). The thread holds at most one
      more in progress, so `depth + 1` batches (on device, when `put` copies them) at most.
    put: applied to every batch on the worker thread before it is buffered, e.g.
      `lambda b: jax.device_put(b, batch_sharding)`; None keeps batches as produced.

  Raises:
    ValueError: `depth` < 1.
  """

  def __init__(self, iterator: StatefulIterator, *, depth: int = 2,
               put: Callable[[Any], Any] | None = None):
    if int(depth) < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._it = iterator
    self._depth = int(depth)
    self._put = put
    self._state = copy.deepcopy(iterator.get_state())
    self._error: BaseException | None = None
    self._closed = False
    self._run: _Run | None = None
    self._thread: threading.Thread | None = None
    self._start()
    _LIVE.add(self)

  # -- the worker --------------------------------------------------------------------------

  def _start(self) -> None:
    run = _Run()
    # The thread gets the iterator, not `self`, so an unreferenced Prefetcher can be collected
    # (and its __del__ stop the thread).
    thread = threading.Thread(target=_work, args=(run, self._it, self._depth, self._put),
                              name="jmtl-prefetch", daemon=True)
    self._run, self._thread = run, thread
    thread.start()

  def _halt(self, timeout: float | None = None) -> None:
    """Stops the worker and waits for it (at most `timeout` s); drops what it buffered."""
    run, thread = self._run, self._thread
    if run is None or thread is None:
      return
    with run.cond:
      run.stop = True
      run.items.clear()
      run.cond.notify_all()
    thread.join(timeout)
    self._run = self._thread = None

  # -- the caller's side -------------------------------------------------------------------

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Any:
    """The next batch (after `put`). Raises, at the batch where it happened, any exception the
    worker met producing it; RuntimeError when closed."""
    if self._closed:
      raise RuntimeError("Prefetcher is closed")
    if self._error is not None:
      raise self._error
    run = self._run
    assert run is not None
    with run.cond:
      while not run.items and not run.done:
        run.cond.wait()
      if not run.items:  # the worker exited without an item: only after a stop, never here
        raise RuntimeError("prefetch thread exited without producing a batch")
      batch, state, error = run.items.popleft()
      run.cond.notify_all()
    if error is not None:
      self._error = error
      raise error
    self._state = state
    return batch

  def get_state(self) -> Any:
    """The underlying iterator's state as of the batches consumed through `next()` (a copy)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Any) -> None:
    """Repositions the stream: stops the thread, drops read-ahead batches, calls the
    underlying `set_state(state)`, restarts. If that raises, the prefetcher is left at its
    previous position (running) and the exception propagates.

    Raises:
      RuntimeError: the prefetcher is closed.
    """
    if self._closed:
      raise RuntimeError("Prefetcher is closed")
    self._halt()
    try:
      self._it.set_state(state)
    except BaseException:
      self._it.set_state(self._state)
      self._start()
      raise
    self._state = copy.deepcopy(self._it.get_state())
    self._error = None
    self._start()

  def close(self) -> None:
    """Stops and joins the worker thread, drops read-ahead batches and sets the underlying
    iterator back to `get_state()` (so it may be used directly again). Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._halt()
    _LIVE.discard(self)
    self._it.set_state(self._state)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __del__(self) -> None:
    try:
      run = self._run
    except AttributeError:  # __init__ failed early
      return
    if run is not None:  # never joins here: only tell the worker to stop
      with run.cond:
        run.stop = True
        run.cond.notify_all()
