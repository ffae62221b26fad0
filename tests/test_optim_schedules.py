"""Learning-rate schedules and late decay against hand-computed values."""

import math

import jax
import pytest

from jmtl.defaults import base_config
from jmtl.optim import plateau, schedules


def _factors(schedule, steps, **kw):
  return [float(schedules.lr_factor(t, schedule=schedule, **kw)) for t in steps]


def test_linear_with_warmup_by_hand():
  # T=10, W=2: warmup (t+1)/2, then 1 - (t-2)/8.
  got = _factors("linear", [0, 1, 2, 6, 9, 10, 12], total_steps=10, warmup_steps=2)
  assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125, 0.0, 0.0], abs=1e-7)


def test_linear_end_factor_and_constant():
  got = _factors("linear", [0, 5, 10], total_steps=10, end_lr_factor=0.2)
  assert got == pytest.approx([1.0, 0.6, 0.2], abs=1e-7)
  got = _factors("constant", [0, 1, 7, 30], total_steps=10, warmup_steps=4)
  assert got == pytest.approx([0.25, 0.5, 1.0, 1.0], abs=1e-7)


def test_cosine_by_hand():
  # p = 0.5 -> end + (1 - end) * 0.5 = 0.1 + 0.45
  got = _factors("cosine", [2, 6, 10], total_steps=10, warmup_steps=2, end_lr_factor=0.1)
  assert got == pytest.approx([1.0, 0.55, 0.1], abs=1e-6)
  got = _factors("cosine", [4], total_steps=8, end_lr_factor=0.0)  # p=0.5
  assert got == pytest.approx([0.5], abs=1e-6)
  got = _factors("cosine", [2], total_steps=8, end_lr_factor=0.0)  # p=0.25
  assert got == pytest.approx([0.5 * (1 + math.cos(math.pi / 4))], abs=1e-6)


def test_exponential_by_hand():
  got = _factors("exponential", [2, 6, 10], total_steps=10, warmup_steps=2, decay_rate=0.1)
  assert got == pytest.approx([1.0, 0.31622776601683794, 0.1], rel=1e-6)


def test_build_schedule_scales_lr_and_jits():
  cfg = base_config().optim
  cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.end_lr_factor = 0.2, 1, "linear", 0.0
  sched = schedules.build_schedule(cfg, 5)  # t=0: 0.2, then 0.2 * (1 - (t-1)/4)
  got = [float(jax.jit(sched)(t)) for t in range(5)]
  assert got == pytest.approx([0.2, 0.2, 0.15, 0.1, 0.05], abs=1e-7)


def test_late_decay_by_hand():
  # T=10, start 0.5: s0 = 5, reaches the rate at the last update t = 9.
  got = [float(plateau.late_decay(t, 10, 0.5, 0.1)) for t in (0, 3, 5, 7, 9, 20)]
  assert got == pytest.approx([1.0, 1.0, 1.0, 0.31622776601683794, 0.1, 0.1], rel=1e-6)
  # T=100, start 0.8 (the defaults): s0 = 80, span 19.
  got = [float(plateau.late_decay(t, 100, 0.8, 0.1)) for t in (79, 80, 99)]
  assert got == pytest.approx([1.0, 1.0, 0.1], rel=1e-6)
  assert float(plateau.late_decay(89, 100, 0.8, 0.1)) == pytest.approx(0.1 ** (9 / 19), rel=1e-6)
  # start >= 1: never decays.
  assert float(plateau.late_decay(99, 100, 1.0, 0.1)) == 1.0


@pytest.mark.parametrize("key,value,exc", [
    ("schedule", "polynomial", ValueError),
    ("warmup_steps", -1, ValueError),
    ("lr", -0.1, ValueError),
])
def test_bad_schedule_values(key, value, exc):
  cfg = base_config().optim
  cfg[key] = value
  with pytest.raises(exc, match=key):
    schedules.build_schedule(cfg, 10)


def test_bad_total_steps():
  with pytest.raises(ValueError, match="total_steps"):
    schedules.build_schedule(base_config().optim, 0)
