"""Optimizer update cost: jitted `tx.update` time per step of every optimizer, relative to AdamW.

All optimizers are timed in one run on the same parameters and gradients, interleaved round by
round (so drifting machine load affects all alike); the reported time is the median over rounds
after warm-up. `ratio` divides by the registry's `adamw` (same config: schedule, grad_clip);
`ratio_vs_optax_adamw` divides by a plain `optax.adamw` without clipping or schedule.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl import defaults
from jmtl import optim


def bert_small_shapes(layers: int = 4, d_model: int = 512, d_ff: int = 2048,
                      vocab: int = 16000, max_len: int = 512) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of a BERT-style encoder (about 21M parameters with the defaults)."""
  shapes = {
      "embed/token": (vocab, d_model),
      "embed/position": (max_len, d_model),
      "embed/type": (2, d_model),
      "embed/norm_scale": (d_model,),
      "embed/norm_bias": (d_model,),
  }
  for i in range(layers):
    p = f"layer{i}/"
    for name in ("q", "k", "v", "o"):
      shapes[p + f"attn_{name}/kernel"] = (d_model, d_model)
      shapes[p + f"attn_{name}/bias"] = (d_model,)
    shapes[p + "mlp_in/kernel"] = (d_model, d_ff)
    shapes[p + "mlp_in/bias"] = (d_ff,)
    shapes[p + "mlp_out/kernel"] = (d_ff, d_model)
    shapes[p + "mlp_out/bias"] = (d_model,)
    for n in ("norm1", "norm2"):
      shapes[p + f"{n}_scale"] = (d_model,)
      shapes[p + f"{n}_bias"] = (d_model,)
  shapes["head/kernel"] = (d_model, 2)
  shapes["head/bias"] = (2,)
  return shapes


def _optim_section(config: Any) -> Any:
  if config is None:
    return defaults.base_config().optim
  try:
    return config["optim"]
  except (KeyError, TypeError):
    return config


def bench_optimizer(
    config: Any = None,
    *,
    params_shape: Mapping[str, Sequence[int]] | None = None,
    iters: int = 20,
    warmup: int = 3,
    names: Sequence[str] | None = None,
    total_steps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
  """Median jitted update time (ms) per optimizer and its ratio to AdamW.

  `config` is a full config or its `optim` section (None = defaults); each optimizer uses it
  with only `name` changed. Returns {"params", "iters", "backend", "device_count",
  "ms": {name: ms}, "ratio": {name: ms / ms[adamw]}, "ratio_vs_optax_adamw": {...}}.
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
  base = _optim_section(config)
  names = list(names) if names is not None else list(optim.NAMES)
  for n in names:
    if n not in optim.NAMES:
      raise KeyError(f"unknown optimizer {n!r}; known: {', '.join(optim.NAMES)}")
  if "adamw" not in names:
    names.insert(0, "adamw")
  shapes = dict(params_shape) if params_shape is not None else bert_small_shapes()
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(0.0, 0.02, size=tuple(s)), jnp.float32)
            for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.normal(0.0, 1e-3, size=tuple(s)), jnp.float32)
           for k, s in shapes.items()}
  n_params = int(sum(int(np.prod(s)) for s in shapes.values()))

  txs: dict[str, optax.GradientTransformationExtraArgs] = {}
  for n in names:
    cfg = base.copy_and_resolve_references() if hasattr(base, "copy_and_resolve_references") \
        else dict(base)
    cfg["name"] = n
    txs[n] = optim.build(cfg, total_steps)
  txs["optax_adamw"] = optax.with_extra_args_support(optax.adamw(
      float(base["lr"]), b1=float(base["b1"]), b2=float(base["b2"]), eps=float(base["eps"]),
      weight_decay=float(base["weight_decay"])))

  val_metric, val_count = jnp.float32(50.0), jnp.int32(1)
  steps, states = {}, {}
  for n, tx in txs.items():
    def step(g, s, p, tx=tx):
      return tx.update(g, s, p, val_metric=val_metric, val_count=val_count)
    steps[n] = jax.jit(step, donate_argnums=1)
    states[n] = jax.jit(tx.init)(params)
    for _ in range(max(warmup, 1)):  # the first call compiles
      u, states[n] = steps[n](grads, states[n], params)
      jax.block_until_ready(u)

  times: dict[str, list[float]] = {n: [] for n in txs}
  for _ in range(iters):
    for n in txs:
      t0 = time.perf_counter()
      u, states[n] = steps[n](grads, states[n], params)
      jax.block_until_ready((u, states[n]))
      times[n].append(time.perf_counter() - t0)

  ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
  return {
      "params": n_params,
      "iters": iters,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "ms": ms,
      "ratio": {n: v / ms["adamw"] for n, v in ms.items()},
      "ratio_vs_optax_adamw": {n: v / ms["optax_adamw"] for n, v in ms.items()},
  }
