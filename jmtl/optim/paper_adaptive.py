"""`paper_adaptive`: Adam with a validation-driven learning rate (arXiv 2412.04718).

Update rule, for step `t = 0, 1, ...` (gradient `g`, parameters `w`):

  1. g  <- g * min(1, grad_clip / ||g||_global)            (only if grad_clip > 0)
  2. m  <- b1 * m + (1 - b1) * g
     v  <- b2 * v + (1 - b2) * g**2
     u  <- (m / (1 - b1**(t+1))) / (sqrt(v / (1 - b2**(t+1))) + eps)
  3. u  <- u + weight_decay * w   (decoupled; 0 = plain Adam; masked by optim.weight_decay_mask)
  4. scale_t <- plateau rule on a new validation (see `jmtl.optim.plateau`)
     lr_t    = lr * factor(t) * scale_t * late(t)          (factor: `jmtl.optim.schedules`)
  5. w  <- w - lr_t * u                                     (returned update: -lr_t * u)

The metric arrives only through the extra args `val_metric` / `val_count` of `update`.
Set `optim.schedule = "constant"` for the paper's setting (no other schedule than warmup).
"""

from __future__ import annotations

from typing import Any

import optax

from jmtl.optim import clipping
from jmtl.optim import masks
from jmtl.optim import plateau as plateau_lib
from jmtl.optim import schedules


def paper_adaptive(
    learning_rate: optax.Schedule,
    *,
    total_steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: Any = None,
    grad_clip: float = 0.0,
    plateau: plateau_lib.PlateauConfig = plateau_lib.PlateauConfig(),
) -> optax.GradientTransformationExtraArgs:
  """Adam + decoupled weight decay + metric-driven lr; the rule is in the module docstring."""
  schedules.check_total_steps(total_steps)
  parts = []
  if grad_clip > 0:
    parts.append(clipping.clip_by_global_norm(grad_clip))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  parts.append(plateau_lib.scale_by_metric_schedule(learning_rate, total_steps, plateau))
  return optax.chain(*parts)


def from_config(cfg: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """Builds `paper_adaptive` from the `optim` config section."""
  return paper_adaptive(
      schedules.build_schedule(cfg, total_steps),
      total_steps=total_steps,
      b1=float(cfg["b1"]),
      b2=float(cfg["b2"]),
      eps=float(cfg["eps"]),
      weight_decay=float(cfg["weight_decay"]),
      decay_mask=masks.decay_mask(cfg),
      grad_clip=float(cfg["grad_clip"]),
      plateau=plateau_lib.PlateauConfig.from_config(cfg),
  )
