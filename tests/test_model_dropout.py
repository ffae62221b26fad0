"""layers.Dropout: 8-bit keep decisions, checked against a numpy unpacking of the same bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmtl.model import layers


def test_mask_matches_numpy_byte_unpacking():
  x = jnp.arange(1, 2 * 3 * 10 + 1, dtype=jnp.float32).reshape(2, 3, 10)
  key = jax.random.key(7)
  out = np.asarray(layers.Dropout(0.1)(x, deterministic=False, rngs=nnx.Rngs(dropout=key)))
  # the same draw the module makes: Rngs(dropout=key).dropout() -> a key, then 3 words per row
  words = np.asarray(jax.random.bits(nnx.Rngs(dropout=key).dropout(), (2, 3, 3), jnp.uint32))
  u8 = words.astype("<u4").view(np.uint8).reshape(2, 3, 12)[..., :10]  # little-endian bytes
  t = round(0.1 * 256)
  expected = np.where(u8 >= t, np.asarray(x) * 256.0 / (256 - t), 0.0)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_rate_and_mean_are_kept():
  x = jnp.ones((64, 4096), jnp.float32)
  out = np.asarray(layers.Dropout(0.1)(x, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  dropped = (out == 0).mean()
  t = round(0.1 * 256)
  sigma = np.sqrt(t / 256 * (1 - t / 256) / out.size)
  assert abs(dropped - t / 256) < 4 * sigma
  assert abs(out.mean() - 1.0) < 4 * sigma * 256 / (256 - t)


def test_deterministic_zero_rate_and_errors():
  x = jnp.ones((3, 5))
  drop = layers.Dropout(0.5)
  assert drop(x, deterministic=True) is x
  assert layers.Dropout(0.0)(x, deterministic=False) is x
  with pytest.raises(ValueError, match="needs rngs"):
    drop(x, deterministic=False)
  with pytest.raises(ValueError, match="in \\[0, 1\\)"):
    layers.Dropout(1.0)
  a = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
  assert not np.array_equal(np.asarray(a), np.asarray(b))
