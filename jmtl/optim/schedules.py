"""Learning-rate schedules: linear warmup, then constant, linear, cosine or exponential decay.

With `t` the update count (0 for the first update), `W = warmup_steps`, `T = total_steps`:

  warmup (t < W):   factor(t) = (t + 1) / W
  after warmup:     p = clip((t - W) / max(T - W, 1), 0, 1)
    constant:       factor = 1
    linear:         factor = 1 + (end_lr_factor - 1) * p
    cosine:         factor = end_lr_factor + (1 - end_lr_factor) * (1 + cos(pi * p)) / 2
    exponential:    factor = decay_rate ** p
  lr(t) = lr * factor(t)

`p` reaches 1 at `t = T` (the optax / HF convention), so the last update (`t = T - 1`) still
has a non-zero learning rate when `end_lr_factor = 0`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine", "exponential")


def lr_factor(
    count: jax.typing.ArrayLike,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
    end_lr_factor: float = 0.0,
    decay_rate: float = 0.1,
) -> jax.Array:
  """The schedule multiplier factor(t) from the module docstring (float32)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={schedule!r} is not one of {SCHEDULES}")
  t = jnp.asarray(count, jnp.float32)
  decay_len = float(max(total_steps - warmup_steps, 1))
  p = jnp.clip((t - warmup_steps) / decay_len, 0.0, 1.0)
  if schedule == "constant":
    after = jnp.ones_like(p)
  elif schedule == "linear":
    after = 1.0 + (end_lr_factor - 1.0) * p
  elif schedule == "cosine":
    after = end_lr_factor + (1.0 - end_lr_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
  else:
    after = jnp.power(jnp.float32(decay_rate), p)
  if warmup_steps > 0:
    warm = (t + 1.0) / float(warmup_steps)
    return jnp.where(t < warmup_steps, warm, after)
  return after


def build_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Returns `count -> lr * factor(count)` from the `optim` config keys."""
  check_total_steps(total_steps)
  lr = float(cfg["lr"])
  warmup = int(cfg["warmup_steps"])
  if lr < 0:
    raise ValueError(f"optim.lr must be >= 0, got {lr}")
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
  kwargs = dict(
      total_steps=int(total_steps),
      warmup_steps=warmup,
      schedule=str(cfg["schedule"]),
      end_lr_factor=float(cfg["end_lr_factor"]),
      decay_rate=float(cfg["decay_rate"]),
  )
  if kwargs["schedule"] not in SCHEDULES:
    raise ValueError(f"optim.schedule={kwargs['schedule']!r} is not one of {SCHEDULES}")
  if kwargs["schedule"] == "exponential" and not kwargs["decay_rate"] > 0:
    raise ValueError(f"optim.decay_rate must be > 0, got {kwargs['decay_rate']}")

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    return lr * lr_factor(count, **kwargs)

  return schedule


def check_total_steps(total_steps: int) -> None:
  """Raises ValueError unless `total_steps` is a positive integer."""
  if int(total_steps) != total_steps or total_steps < 1:
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
