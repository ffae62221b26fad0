"""Shared benchmark helpers: timing, the host's fp32 matmul peak, device description."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], Any], *, warmup: int, iters: int) -> tuple[float, list[float]]:
  """Median wall time of `fn()` over `iters` calls after `warmup` calls.

  `fn` must block until its work is done (e.g. end with `jax.block_until_ready`).
  Returns (median, all timings).
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


class MatmulPeak:
  """fp32 matmul throughput of one device: 2 n^3 FLOP / median time of a jitted `jnp.dot`.

  Build once (compiles), then call `measure()` as often as wanted: interleaving measurements
  with the work being benchmarked makes the ratio robust to a host whose load drifts.
  """

  def __init__(self, n: int = 1024, device: jax.Device | None = None):
    if n < 1:
      raise ValueError(f"matmul size must be positive, got {n}")
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    self.n = n
    self._a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32), device)
    self._b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32), device)
    self._dot = jax.jit(jnp.dot)
    self._dot(self._a, self._b).block_until_ready()

  def measure(self, runs: int = 5, warmup: int = 1) -> float:
    """GFLOP/s from the median time of `runs` products after `warmup` products."""
    seconds, _ = median_seconds(lambda: self._dot(self._a, self._b).block_until_ready(),
                                warmup=warmup, iters=runs)
    return 2.0 * self.n**3 / seconds / 1e9


def matmul_peak_gflops(n: int = 1024, *, runs: int = 20, warmup: int = 3,
                       device: jax.Device | None = None) -> float:
  """fp32 matmul peak in GFLOP/s: median of `runs` jitted n x n products (see MatmulPeak)."""
  return MatmulPeak(n, device).measure(runs, warmup)


def device_info() -> dict[str, Any]:
  """Backend, device kind and count, host CPU count and load (JSON-serialisable)."""
  devices = jax.devices()
  info: dict[str, Any] = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "host_cpus": os.cpu_count(),
  }
  try:
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)
  except OSError:  # not available on every platform
    pass
  return info
