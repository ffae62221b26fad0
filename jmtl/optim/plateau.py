"""Metric-driven learning rate: plateau/raise multiplier and late exponential decay.

Shared by `paper_adaptive` and `jmtl_adaptive`. The validation metric reaches the optimizer only
through Optax extra args (`val_metric`, higher is better; `val_count`, number of validations so
far). A validation is *new* when `val_count` differs from the count stored in the state. On a new
validation with metric `x` (all jnp, no Python branching on traced values):

  improved = x > best + min_delta          (always true for the first validation)
  best     = x if improved else best
  bad      = 0 if improved else bad + 1
  good     = good + 1 if improved and a previous validation exists else 0
  if bad >= patience:                        scale *= factor;       bad = 0
  if raise_after > 0 and good >= raise_after: scale *= raise_factor; good = 0
  scale    = clip(scale, min_scale, max_scale)

Late decay, with `t` the update count, `T = total_steps`, `s0 = late_decay_start * T`:

  late(t) = late_decay_rate ** clip((t - s0) / max(T - 1 - s0, 1), 0, 1)

so late(t) = 1 before `s0` and equals `late_decay_rate` at the last update `t = T - 1`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  """Hyper-parameters of the metric-driven multiplier and late decay (see module docstring)."""

  patience: int = 2
  factor: float = 0.5
  min_delta: float = 0.0
  raise_after: int = 0
  raise_factor: float = 1.1
  min_scale: float = 0.01
  max_scale: float = 1.0
  late_decay_start: float = 0.8
  late_decay_rate: float = 0.1

  def __post_init__(self):
    checks = [
        ("plateau_patience", self.patience, self.patience >= 1, ">= 1"),
        ("plateau_factor", self.factor, 0.0 < self.factor <= 1.0, "in (0, 1]"),
        ("plateau_min_delta", self.min_delta, self.min_delta >= 0.0, ">= 0"),
        ("raise_after", self.raise_after, self.raise_after >= 0, ">= 0"),
        ("raise_factor", self.raise_factor, self.raise_factor >= 1.0, ">= 1"),
        ("min_scale", self.min_scale, self.min_scale > 0.0, "> 0"),
        ("max_scale", self.max_scale, self.max_scale >= self.min_scale, ">= min_scale"),
        ("late_decay_start", self.late_decay_start, self.late_decay_start >= 0.0, ">= 0"),
        ("late_decay_rate", self.late_decay_rate, 0.0 < self.late_decay_rate <= 1.0,
         "in (0, 1]"),
    ]
    for key, value, ok, rule in checks:
      if not ok:
        raise ValueError(f"optim.{key} must be {rule}, got {value!r}")

  # the `optim` keys `from_config` reads
  CONFIG_KEYS = ("plateau_patience", "plateau_factor", "plateau_min_delta", "raise_after",
                 "raise_factor", "min_scale", "max_scale", "late_decay_start", "late_decay_rate")

  @classmethod
  def from_config(cls, cfg: Any) -> "PlateauConfig":
    """Reads the `optim.plateau_*`, `raise_*`, `*_scale` and `late_decay_*` keys."""
    return cls(
        patience=int(cfg["plateau_patience"]),
        factor=float(cfg["plateau_factor"]),
        min_delta=float(cfg["plateau_min_delta"]),
        raise_after=int(cfg["raise_after"]),
        raise_factor=float(cfg["raise_factor"]),
        min_scale=float(cfg["min_scale"]),
        max_scale=float(cfg["max_scale"]),
        late_decay_start=float(cfg["late_decay_start"]),
        late_decay_rate=float(cfg["late_decay_rate"]),
    )


class PlateauState(NamedTuple):
  """Multiplier `scale`, best metric, bad/good validation streaks, last seen `val_count`."""

  scale: jax.Array
  best: jax.Array
  bad: jax.Array
  good: jax.Array
  last_count: jax.Array


def plateau_init(pc: PlateauConfig) -> PlateauState:
  """Initial state: scale = clip(1, min_scale, max_scale), best = -inf, no validation seen."""
  return PlateauState(
      scale=jnp.asarray(min(max(1.0, pc.min_scale), pc.max_scale), jnp.float32),
      best=jnp.asarray(-jnp.inf, jnp.float32),
      bad=jnp.zeros([], jnp.int32),
      good=jnp.zeros([], jnp.int32),
      last_count=jnp.zeros([], jnp.int32),
  )


def plateau_update(
    state: PlateauState,
    val_metric: jax.typing.ArrayLike | None,
    val_count: jax.typing.ArrayLike | None,
    pc: PlateauConfig,
) -> PlateauState:
  """Applies the rule of the module docstring when `val_count != state.last_count`."""
  if val_metric is None or val_count is None:
    return state  # no validation information (e.g. a server optimizer without eval)
  x = jnp.asarray(val_metric, jnp.float32)
  n = jnp.asarray(val_count, jnp.int32)
  is_new = n != state.last_count
  improved = x > state.best + pc.min_delta
  had_best = jnp.isfinite(state.best)
  best = jnp.where(improved, x, state.best)
  bad = jnp.where(improved, 0, state.bad + 1)
  good = jnp.where(improved & had_best, state.good + 1, 0)
  scale = state.scale
  lower = bad >= pc.patience
  scale = jnp.where(lower, scale * pc.factor, scale)
  bad = jnp.where(lower, 0, bad)
  if pc.raise_after > 0:
    up = good >= pc.raise_after
    scale = jnp.where(up, scale * pc.raise_factor, scale)
    good = jnp.where(up, 0, good)
  scale = jnp.clip(scale, pc.min_scale, pc.max_scale)
  new = PlateauState(scale.astype(jnp.float32), best, bad.astype(jnp.int32),
                     good.astype(jnp.int32), n)
  return jax.tree.map(lambda a, b: jnp.where(is_new, a, b), new, state)


def late_decay(count: jax.typing.ArrayLike, total_steps: int, start: float,
               rate: float) -> jax.Array:
  """late(t) = rate ** clip((t - s0) / max(T - 1 - s0, 1), 0, 1), s0 = start * T."""
  t = jnp.asarray(count, jnp.float32)
  s0 = float(start) * float(total_steps)
  span = max(float(total_steps) - 1.0 - s0, 1.0)
  return jnp.power(jnp.float32(rate), jnp.clip((t - s0) / span, 0.0, 1.0))


class MetricScheduleState(NamedTuple):
  """Update count and plateau state of `scale_by_metric_schedule`."""

  count: jax.Array
  plateau: PlateauState


def scale_by_metric_schedule(
    schedule: optax.Schedule, total_steps: int, pc: PlateauConfig
) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by `-lr_t`, lr_t = schedule(t) * scale_t * late(t).

  `scale_t` is the plateau multiplier after this call's validation (if new) is applied;
  `t` is the number of previous updates. Extra args: `val_metric`, `val_count`.
  """

  def init_fn(params):
    del params
    return MetricScheduleState(jnp.zeros([], jnp.int32), plateau_init(pc))

  def update_fn(updates, state, params=None, *, val_metric=None, val_count=None, **extra):
    del params, extra
    plateau = plateau_update(state.plateau, val_metric, val_count, pc)
    lr = (schedule(state.count) * plateau.scale
          * late_decay(state.count, total_steps, pc.late_decay_start, pc.late_decay_rate))
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    count = optax.safe_increment(state.count)
    return updates, MetricScheduleState(count, plateau)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_metric_schedule_state(opt_state: Any) -> MetricScheduleState | None:
  """The first `MetricScheduleState` inside an optimizer state (for logging `scale`), or None."""
  for node in jax.tree.leaves(opt_state,
                              is_leaf=lambda x: isinstance(x, MetricScheduleState)):
    if isinstance(node, MetricScheduleState):
      return node
  return None
