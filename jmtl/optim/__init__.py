"""Optimizers as Optax transformations: our adaptive ones, the baselines, schedules."""

from jmtl.optim.plateau import find_metric_schedule_state
from jmtl.optim.registry import (ADAPTIVE, NAMES, OWN_KEYS, broadcast_axes, build,
                                 eval_params, state_follows_params)

__all__ = ["ADAPTIVE", "NAMES", "OWN_KEYS", "broadcast_axes", "build", "eval_params", "find_metric_schedule_state",
           "state_follows_params"]
