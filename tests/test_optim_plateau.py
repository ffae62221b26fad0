"""The metric-driven multiplier against scripted metric sequences with hand-written scales."""

import jax
import jax.numpy as jnp
import pytest

from jmtl.defaults import base_config
from jmtl.optim import plateau

_NO_LATE = dict(late_decay_start=10.0)


def _scales(metrics, **kw):
  """Feeds one new validation per call through a jitted update; returns the scales."""
  pc = plateau.PlateauConfig(**kw)
  step = jax.jit(lambda s, x, n: plateau.plateau_update(s, x, n, pc))
  state = plateau.plateau_init(pc)
  out = []
  for i, x in enumerate(metrics, start=1):
    state = step(state, jnp.float32(x), jnp.int32(i))
    out.append(float(state.scale))
  return out


def test_plateau_patience_two_by_hand():
  got = _scales([50, 60, 60, 59, 61, 61, 61], patience=2, factor=0.5)
  assert got == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_raise_after_by_hand():
  # 10 baseline; 11, 12 -> two improvements -> x2; 13 one; 13, 13 -> patience 2 -> /2;
  # 14, 15 -> two improvements -> x2.
  got = _scales([10, 11, 12, 13, 13, 13, 14, 15], patience=2, factor=0.5, raise_after=2,
                raise_factor=2.0, max_scale=4.0)
  assert got == [1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 2.0]


def test_clamping_by_hand():
  got = _scales([5, 4, 3, 2, 1], patience=1, factor=0.5, min_scale=0.3)
  assert got == pytest.approx([1.0, 0.5, 0.3, 0.3, 0.3])
  got = _scales([1, 2, 3, 4, 5], patience=1, raise_after=1, raise_factor=2.0, max_scale=1.5)
  assert got == pytest.approx([1.0, 1.5, 1.5, 1.5, 1.5])


def test_min_delta_by_hand():
  # 10.5 is not > 10 + 1 (bad, lowered with patience 1); 12 > 10 + 1 improves.
  got = _scales([10, 10.5, 12, 12.5], patience=1, factor=0.5, min_delta=1.0)
  assert got == [1.0, 0.5, 0.5, 0.25]


def test_same_val_count_is_not_a_new_validation():
  pc = plateau.PlateauConfig(patience=1, factor=0.5)
  step = jax.jit(lambda s, x, n: plateau.plateau_update(s, x, n, pc))
  state = plateau.plateau_init(pc)
  state = step(state, jnp.float32(5.0), jnp.int32(1))
  for _ in range(3):  # the same validation seen on several steps, with a worse value
    state = step(state, jnp.float32(1.0), jnp.int32(1))
  assert float(state.scale) == 1.0 and float(state.best) == 5.0
  state = step(state, jnp.float32(1.0), jnp.int32(2))
  assert float(state.scale) == 0.5


def test_metric_schedule_transformation_no_retrace():
  traces = []
  pc = plateau.PlateauConfig(patience=1, factor=0.5, **_NO_LATE)
  tx = plateau.scale_by_metric_schedule(lambda t: 0.1, 100, pc)

  def step(u, s, x, n):
    traces.append(1)
    return tx.update(u, s, None, val_metric=x, val_count=n)

  step = jax.jit(step)
  u = {"a": jnp.ones((3,))}
  s = tx.init(u)
  seen = []
  for x, n in [(0.0, 0), (5.0, 1), (5.0, 1), (4.0, 2), (3.0, 3), (9.0, 4)]:
    out, s = step(u, s, jnp.float32(x), jnp.int32(n))
    seen.append(float(out["a"][0]))
  assert len(traces) == 1
  assert seen == pytest.approx([-0.1, -0.1, -0.1, -0.05, -0.025, -0.025])
  assert int(s.count) == 6
  assert plateau.find_metric_schedule_state((s,)) is not None


def test_from_config_and_validation():
  pc = plateau.PlateauConfig.from_config(base_config().optim)
  assert pc.patience == 2 and pc.factor == 0.5 and pc.late_decay_rate == 0.1
  with pytest.raises(ValueError, match="plateau_factor"):
    plateau.PlateauConfig(factor=0.0)
  with pytest.raises(ValueError, match="max_scale"):
    plateau.PlateauConfig(min_scale=0.5, max_scale=0.1)
  with pytest.raises(ValueError, match="plateau_patience"):
    plateau.PlateauConfig(patience=0)


def test_config_keys_are_the_keys_from_config_reads():
  from jmtl.defaults import base_config
  from jmtl.optim.plateau import PlateauConfig

  class Recorder(dict):
    def __getitem__(self, k):
      read.append(k)
      return dict.__getitem__(self, k)

  read = []
  PlateauConfig.from_config(Recorder(base_config().optim.to_dict()))
  assert tuple(read) == PlateauConfig.CONFIG_KEYS
