"""`jmtl bench scaling`: `jmtl bench step` across model sizes and mesh layouts, in one run.

Sizes (encoder + the config's task heads; parameters counted by `bench step`):

  tiny   2 layers, d_model 128, d_ff 512, 2 heads, vocab 8000
  small  4 layers, d_model 256, d_ff 1024, 4 heads, vocab 16000
  base   12 layers, d_model 768, d_ff 3072, 12 heads, vocab 50265 (~125M parameters: the
         GPT-2 small / RoBERTa-base shape)

Layouts over all devices: `data` (data=N), `fsdp` (fsdp=N: parameters and optimizer state split
over the devices, ZeRO-3 style), `tensor` (tensor=N, Megatron-style matmul splits) and `mixed`
(2 x 2 x N/4 when N >= 8). Each row is `bench_step` of that size and layout (tokens/s, MFU
against the matmul peak measured in the same call, per-device bytes of parameters and optimizer
state), plus `fsdp_param_ratio` = per-device parameter bytes / replicated bytes (the target for
fsdp over N devices is <= 1.05 / N).

Which sizes and layouts run: config keys `bench.sizes` and `bench.layouts`. Rows that would not
fit in the host's available memory are skipped with the reason (see `bench_scaling`).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jmtl.bench.step import bench_step
from jmtl.config import ConfigError

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "d_model": 128, "d_ff": 512, "heads": 2, "vocab": 8000},
    "small": {"layers": 4, "d_model": 256, "d_ff": 1024, "heads": 4, "vocab": 16000},
    "base": {"layers": 12, "d_model": 768, "d_ff": 3072, "heads": 12, "vocab": 50265},
}


def layouts(n: int) -> dict[str, tuple[int, int, int]]:
  """(data, fsdp, tensor) per layout name for `n` devices."""
  out = {"data": (n, 1, 1), "fsdp": (1, n, 1), "tensor": (1, 1, n)}
  if n >= 8 and n % 4 == 0:
    out["mixed"] = (2, 2, n // 4)
  return out


# Host memory one row may take, as a multiple of what its devices hold of parameters,
# gradients and optimizer state (`layout_bytes`): as much again for what the step holds at once
# (the updated state before the old one is freed, XLA's buffers, activations). A margin chosen,
# not measured: the guard only has to keep a row from swapping the host or being killed by the
# OOM killer, and a killed bench keeps its finished rows anyway (`out`).
HEADROOM = 2.0


def layout_bytes(config: Any) -> int:
  """~host bytes one row (`config` from `sized`) needs when every device lives in this host's
  RAM (CPU devices): HEADROOM x the devices' sum of parameters, gradients (sharded as the
  parameters) and optimizer state, per device as the trainer shards them under the row's mesh
  (`jmtl.bench.compile.compile_check` without compiling: shapes only, nothing allocated). So a
  dimension the tensor axis does not divide (12 heads over 8 devices), which the trainer
  replicates, counts as replicated."""
  from jmtl.bench import compile as compile_lib  # noqa: PLC0415 - imports the trainer
  r = compile_lib.compile_check(config, compile_lib.local_target(), compile_step=False)
  per_device = 2 * r["params_bytes_per_device"] + r["opt_state_bytes_per_device"]
  return int(HEADROOM * r["devices"] * per_device)


def available_bytes() -> int:
  """Memory available to a new allocation now, in bytes: MemAvailable of /proc/meminfo (Linux;
  the kernel's estimate of what can be allocated without swapping), else psutil's
  `virtual_memory().available` when psutil is installed, else the physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # the file counts kB (KiB)
  except OSError:
    pass
  try:
    import psutil  # noqa: PLC0415 - optional
    return int(psutil.virtual_memory().available)
  except ImportError:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (getrusage ru_maxrss: KiB on Linux)."""
  import resource  # noqa: PLC0415 - POSIX only
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def sized(config: Any, size: str, layout: tuple[int, int, int]) -> Any:
  """A copy of `config` with the model of `size` and the mesh `layout`."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
  c = copy.deepcopy(config)
  s = SIZES[size]
  c.model.layers, c.model.d_model, c.model.d_ff, c.model.heads = (
      s["layers"], s["d_model"], s["d_ff"], s["heads"])
  c.data.vocab_size = s["vocab"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout
  return c


def bench_scaling(config: Any, *, sizes: Sequence[str] | None = None,
                  layout_names: Sequence[str] | None = None, warmup: int = 1,
                  iters: int = 3, out: str | os.PathLike[str] | None = None,
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs `bench_step` for every size x layout; returns {"rows": [...], ...} (JSON-ready).

  sizes / layout_names: default `config.bench.sizes` / `config.bench.layouts` (() = every
  layout of `layouts(jax.device_count())`). Before each row the memory guard compares
  `layout_bytes` with `available_bytes()`; a row that does not fit is recorded with a
  "skipped" reason instead of being run. With `out`, the JSON (the same dict, "complete":
  false until the last row) is rewritten after every row, so a killed bench keeps the rows it
  finished; `echo` gets one line per row. Each finished row records `peak_rss_bytes` (this
  process's peak so far). Raises ConfigError for a layout the device count does not allow.
  """
  n = jax.device_count()
  table = layouts(n)
  sizes = list(config.bench.sizes if sizes is None else sizes)
  names = list(layout_names if layout_names is not None else config.bench.layouts or table)
  missing = [x for x in names if x not in table]
  if missing:
    raise ConfigError(f"config key 'bench.layouts' = {tuple(names)}: {', '.join(missing)} is "
                      f"not a layout of {n} devices (layouts: {', '.join(table)})")
  result: dict[str, Any] = {"device_count": n, "sizes": sizes, "layouts": names,
                            "warmup": warmup, "iters": iters, "rows": [], "complete": False}
  rows = result["rows"]

  def record(row: dict[str, Any]) -> None:
    rows.append(row)
    if out is not None:
      tmp = pathlib.Path(f"{out}.tmp")
      tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
      os.replace(tmp, out)  # atomic: a kill leaves the previous or the new file, whole
    if echo is not None:
      echo(f"[bench scaling] {row['size']} {row['layout']}: " + (
          f"skipped ({row['skipped']})" if "skipped" in row else
          f"{row['tokens_per_s']:.0f} tokens/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"))

  for size in sizes:
    for name in names:
      gc.collect()
      jax.clear_caches()  # the previous row's executables and their buffers
      row_config = sized(config, size, table[name])
      need, free = layout_bytes(row_config), available_bytes()
      if need > free:
        record({"size": size, "layout": name, "needs_bytes": need, "available_bytes": free,
                "skipped": (f"needs ~{need / 2**30:.1f} GiB of host memory (parameters, "
                            f"gradients and optimizer state of all {n} devices x {HEADROOM:g}), "
                            f"{free / 2**30:.1f} GiB available")})
        continue
      r = bench_step(row_config, warmup=warmup, iters=iters)
      r.update(size=size, layout=name,
               fsdp_param_ratio=r["params_bytes_per_device"] / r["params_bytes_replicated"],
               opt_state_ratio=r["opt_state_bytes_per_device"] / r["opt_state_bytes_replicated"],
               needs_bytes=need, peak_rss_bytes=_peak_rss_bytes())
      record(r)
  result["complete"] = True
  if out is not None:
    pathlib.Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  return result
