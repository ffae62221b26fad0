"""Optimizers by name: `build(optim_cfg, total_steps)` for the trainer and studies.

Every optimizer returned by `build`:
  * is an `optax.GradientTransformationExtraArgs` whose `update` accepts (and, unless it adapts
    to the metric, ignores) `val_metric` and `val_count`;
  * uses the warmup + decay schedule of `jmtl.optim.schedules` (schedule-free: warmup only);
  * clips gradients to global norm `grad_clip` first (0 = off; `jmtl.optim.clipping`);
  * decays the parameters `optim.weight_decay_mask` selects, if it has weight decay
    (`jmtl.optim.masks`);
  * has an `init` whose parameter-shaped state leaves follow the parameters' sharding when run
    under `jax.jit` (each such leaf is tied to its parameter through a no-op `where`), as in
    `jmtl.train.state.like_param`.

Schedule-free AdamW evaluates at different parameters than it trains: before evaluation or
saving a model for inference, call `eval_params(opt_state, params)` (a wrapper around
`optax.contrib.schedule_free_eval_params`; the identity for every other optimizer).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jmtl.optim import clipping
from jmtl.optim import jmtl_adaptive as jmtl_adaptive_lib
from jmtl.optim import masks
from jmtl.optim import paper_adaptive as paper_adaptive_lib
from jmtl.optim import plateau as plateau_lib
from jmtl.optim import schedules

Builder = Callable[[Any, int], optax.GradientTransformation]


def _sched(cfg: Any, total_steps: int) -> optax.Schedule:
  return schedules.build_schedule(cfg, total_steps)


def _sgd(cfg, total_steps):
  return optax.sgd(_sched(cfg, total_steps))


def _momentum(cfg, total_steps):
  return optax.sgd(_sched(cfg, total_steps), momentum=float(cfg["momentum"]))


def _nesterov(cfg, total_steps):
  return optax.sgd(_sched(cfg, total_steps), momentum=float(cfg["momentum"]), nesterov=True)


def _adagrad(cfg, total_steps):
  return optax.adagrad(_sched(cfg, total_steps), eps=float(cfg["eps"]))


def _rmsprop(cfg, total_steps):
  # decay of the squared-gradient average = b2.
  return optax.rmsprop(_sched(cfg, total_steps), decay=float(cfg["b2"]), eps=float(cfg["eps"]))


def _adam(cfg, total_steps):
  return optax.adam(_sched(cfg, total_steps), b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                    eps=float(cfg["eps"]))


def _adamw(cfg, total_steps):
  return optax.adamw(_sched(cfg, total_steps), b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                     eps=float(cfg["eps"]), weight_decay=float(cfg["weight_decay"]),
                     mask=masks.decay_mask(cfg))


def _lion(cfg, total_steps):
  return optax.lion(_sched(cfg, total_steps), b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                    weight_decay=float(cfg["weight_decay"]), mask=masks.decay_mask(cfg))


def _lamb(cfg, total_steps):
  return optax.lamb(_sched(cfg, total_steps), b1=float(cfg["b1"]), b2=float(cfg["b2"]),
                    eps=float(cfg["eps"]), weight_decay=float(cfg["weight_decay"]),
                    mask=masks.decay_mask(cfg))


def _adafactor(cfg, total_steps):
  wd = float(cfg["weight_decay"])
  return optax.adafactor(_sched(cfg, total_steps), weight_decay_rate=wd or None,
                         weight_decay_mask=masks.decay_mask(cfg))


def _schedule_free_adamw(cfg, total_steps):
  schedules.check_total_steps(total_steps)
  warmup = int(cfg["warmup_steps"])
  mask = masks.decay_mask(cfg)
  if mask is None:
    return optax.contrib.schedule_free_adamw(
        float(cfg["lr"]), warmup_steps=warmup or None, b1=float(cfg["b1"]), b2=float(cfg["b2"]),
        eps=float(cfg["eps"]), weight_decay=float(cfg["weight_decay"]))
  # optax.contrib.schedule_free_adamw has no mask: the same construction (schedule_free around
  # an AdamW with b1 = 0), with the mask on the AdamW.
  lr = float(cfg["lr"])
  if warmup:
    lr = optax.warmup_constant_schedule(0.0, lr, warmup)
  return optax.contrib.schedule_free(
      optax.adamw(lr, b1=0.0, b2=float(cfg["b2"]), eps=float(cfg["eps"]),
                  weight_decay=float(cfg["weight_decay"]), mask=mask),
      learning_rate=lr, b1=float(cfg["b1"]))


# name -> (builder, clips gradients itself)
_OPTIMIZERS: dict[str, tuple[Builder, bool]] = {
    "sgd": (_sgd, False),
    "momentum": (_momentum, False),
    "nesterov": (_nesterov, False),
    "adagrad": (_adagrad, False),
    "rmsprop": (_rmsprop, False),
    "adam": (_adam, False),
    "adamw": (_adamw, False),
    "lion": (_lion, False),
    "lamb": (_lamb, False),
    "adafactor": (_adafactor, False),
    "schedule_free_adamw": (_schedule_free_adamw, False),
    "paper_adaptive": (paper_adaptive_lib.from_config, True),
    "jmtl_adaptive": (jmtl_adaptive_lib.from_config, True),
}
NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)
ADAPTIVE: tuple[str, ...] = ("paper_adaptive", "jmtl_adaptive")
# Config keys read only by some optimizers: they do not change a run of any other optimizer.
_METRIC_KEYS = ("train.val_metric",) + tuple(
    f"optim.{k}" for k in plateau_lib.PlateauConfig.CONFIG_KEYS)
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "paper_adaptive": _METRIC_KEYS,
    "jmtl_adaptive": _METRIC_KEYS + ("optim.belief", "optim.belief_eps", "optim.cautious",
                                     "optim.block_nu", "optim.trust_ratio", "optim.update_clip",
                                     "optim.metric_schedule"),
}


def build(optim_cfg: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """The optimizer `optim_cfg["name"]` configured from the `optim` config section."""
  name = _get(optim_cfg, "name")
  if name not in _OPTIMIZERS:
    raise KeyError(f"unknown optimizer optim.name={name!r}; known: {', '.join(NAMES)}")
  schedules.check_total_steps(total_steps)
  builder, clips_itself = _OPTIMIZERS[name]
  try:
    tx = builder(optim_cfg, int(total_steps))
  except KeyError as e:
    raise KeyError(f"optim config for {name!r} lacks key {e}") from None
  if name not in ADAPTIVE:
    tx = _drop_extra_args(tx)
  grad_clip = float(_get(optim_cfg, "grad_clip"))
  if grad_clip < 0:
    raise ValueError(f"optim.grad_clip must be >= 0, got {grad_clip}")
  if grad_clip > 0 and not clips_itself:
    tx = optax.chain(clipping.clip_by_global_norm(grad_clip), tx)
  return state_follows_params(optax.with_extra_args_support(tx))


def _get(cfg: Any, key: str) -> Any:
  try:
    return cfg[key]
  except KeyError:
    raise KeyError(f"optim config lacks key optim.{key}") from None


def _drop_extra_args(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` with an `update` that accepts and ignores `val_metric`, `val_count` and the like."""

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def broadcast_axes(shape: tuple[int, ...],
                   param_shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The axes over which a state leaf of `shape` is broadcast against its parameter: same rank,
  every axis the parameter's size or 1 (e.g. block_nu's (1, ..., outputs)); the size-1 axes
  where the parameter's is larger. None when `shape` is not such a statistic."""
  shape, param_shape = tuple(shape), tuple(param_shape)
  if len(shape) != len(param_shape) or not all(a in (1, b) for a, b in zip(shape, param_shape)):
    return None
  return tuple(i for i, (a, b) in enumerate(zip(shape, param_shape)) if a != b)


def _tie(state_leaf: Any, source: Any) -> Any:
  """`state_leaf` unchanged, but data-dependent on `source` so it inherits its sharding.

  `source` is the matching parameter or a scalar taken from a parameter. Same shape: the leaf
  gets the parameter's sharding. A leaf broadcast over some of the parameter's axes (same rank,
  size 1 there, e.g. block_nu's one second moment per output neuron) is tied to the parameter
  summed over those axes, so it keeps the parameter's sharding on the other axes (the rule of
  `jmtl.train.state.like_param`). Anything else is tied to a scalar: replicated on the
  parameters' devices instead of placed on device 0.
  """
  if not hasattr(state_leaf, "shape") or not hasattr(state_leaf, "dtype"):
    return state_leaf
  source = jnp.asarray(source)
  if source.shape != state_leaf.shape and source.ndim:
    axes = broadcast_axes(state_leaf.shape, source.shape)
    if axes is not None:
      source = jnp.sum(source, axis=axes, keepdims=True)
    else:
      source = jnp.ravel(source)[0]
  never = jnp.zeros(state_leaf.shape, bool)
  return jnp.where(never, source.astype(state_leaf.dtype), state_leaf)


def state_follows_params(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """`tx` whose `init` ties its state to the parameters (a no-op `where`).

  Under `jax.jit(tx.init)` with sharded parameters, XLA's sharding propagation then gives each
  parameter-shaped leaf its parameter's sharding (a plain `zeros_like` would not), each leaf
  broadcast over some parameter axes that sharding on its other axes, and every other leaf
  (counts, factored moments) a replicated sharding on the same devices.
  """

  def init_fn(params):
    state = tx.init(params)
    leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "shape")]
    if not leaves:
      return state
    anchor = jnp.ravel(min(leaves, key=lambda x: x.size))[0]
    return optax.tree_map_params(tx, _tie, state, params,
                                 transform_non_params=lambda s: _tie(s, anchor))

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def eval_params(opt_state: Any, params: Any) -> Any:
  """Parameters to evaluate with: schedule-free's averaged point, else `params` unchanged."""
  is_sf = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)
  for node in jax.tree.leaves(opt_state, is_leaf=is_sf):
    if is_sf(node):
      return optax.contrib.schedule_free_eval_params(node, params)
  return params
