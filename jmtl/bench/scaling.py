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
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import jax

from jmtl.bench.step import bench_step

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


MEMORY_SHARE = 0.4  # of host RAM that the replicated state of one layout may take


def replicated_state_bytes(size: str) -> int:
  """~bytes of one full copy of the encoder's parameters, gradients and two Adam moments
  (16 bytes per float32 parameter; parameters ~ vocab d + layers (4 d^2 + 2 d d_ff))."""
  s = SIZES[size]
  d = s["d_model"]
  params = s["vocab"] * d + s["layers"] * (4 * d * d + 2 * d * s["d_ff"])
  return 16 * params


def _host_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def bench_scaling(config: Any, *, sizes: Sequence[str] = ("tiny", "small", "base"),
                  layout_names: Sequence[str] | None = None, warmup: int = 1,
                  iters: int = 3) -> dict[str, Any]:
  """Runs `bench_step` for every size x layout; returns {"rows": [...], ...} (JSON-ready)."""
  n = jax.device_count()
  table = layouts(n)
  names = list(table) if layout_names is None else list(layout_names)
  rows = []
  for size in sizes:
    for name in names:
      need = replicated_state_bytes(size) * table[name][0]
      if need > MEMORY_SHARE * _host_bytes():  # every data-parallel copy lives in host RAM here
        rows.append({"size": size, "layout": name, "skipped": (
            f"{table[name][0]} replicated copies of parameters, gradients and Adam moments "
            f"need ~{need / 2**30:.1f} GiB, over {MEMORY_SHARE:.0%} of this host's memory")})
        continue
      r = bench_step(sized(config, size, table[name]), warmup=warmup, iters=iters)
      r.update(size=size, layout=name,
               fsdp_param_ratio=r["params_bytes_per_device"] / r["params_bytes_replicated"],
               opt_state_ratio=r["opt_state_bytes_per_device"] / r["opt_state_bytes_replicated"])
      rows.append(r)
  return {"device_count": n, "sizes": list(sizes), "layouts": names, "warmup": warmup,
          "iters": iters, "rows": rows}
