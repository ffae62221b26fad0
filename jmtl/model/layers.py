"""Building blocks shared by the trunks and heads: sharded params, dense, norm, attention, FFN.

Every parameter is created through `param_init`, which attaches logical axis names
(`nnx.with_partitioning`); `constrain` puts logical sharding constraints on activations. Both
map logical names to mesh axes with the rules active in `nnx.logical_axis_rules(...)` and do
nothing mesh-specific when no mesh is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

from flax import nnx
import flax.core.spmd as core_spmd
import jax
import jax.numpy as jnp

# Logical axis names used by jmtl parameters and activations (see `mesh.rules`).
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "labels")
# Added to attention scores / span logits at masked positions.
NEG_INF = -1e9
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Names = Sequence[str | None]


def cfg_get(cfg: Any, key: str) -> Any:
  """Reads `key` from a ConfigDict or mapping; a missing key raises a KeyError naming it."""
  try:
    return cfg[key]
  except (KeyError, AttributeError) as e:
    raise KeyError(f"model config is missing key {key!r}") from e


def cfg_choice(cfg: Any, key: str, allowed: Sequence[str]) -> str:
  """Reads a string option and checks it is one of `allowed` (ValueError otherwise)."""
  value = cfg_get(cfg, key)
  if value not in allowed:
    raise ValueError(f"model.{key}={value!r} is not one of {tuple(allowed)}")
  return value


def compute_dtype(cfg: Any) -> jnp.dtype:
  """The activation dtype named by `model.dtype` (parameters stay float32)."""
  return DTYPES[cfg_choice(cfg, "dtype", tuple(DTYPES))]


def _mesh_and_rules():
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None, None
  return mesh, dict(rules)


def sharding_active() -> bool:
  """True when a mesh is set and logical axis rules are active."""
  return _mesh_and_rules()[0] is not None


def logical_to_spec(names: Names) -> jax.sharding.PartitionSpec | None:
  """Maps logical names to a PartitionSpec for the current mesh and rules (None: no mesh/rules).

  Mesh axes that the rules name but the mesh lacks, or that are Manual (inside shard_map),
  are dropped; a mesh axis already used by an earlier dimension is not reused.
  """
  mesh, rules = _mesh_and_rules()
  if mesh is None:
    return None
  usable = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
            if t != jax.sharding.AxisType.Manual}
  if not usable:
    return None
  used: set[str] = set()
  spec = []
  for name in names:
    target = rules.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a in usable and a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*spec)


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op without mesh + rules."""
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match an array of rank {x.ndim}")
  spec = logical_to_spec(names)
  if spec is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def param_init(init_fn: Callable[..., jax.Array], names: Names) -> Callable[..., jax.Array]:
  """`init_fn` annotated with logical axis names.

  Without an active mesh and logical rules only the names are recorded (read them with
  `nnx.get_partition_spec`); with both, flax's eager-sharding setting decides whether the value
  is placed at creation (`nnx.use_eager_sharding`).
  """
  bad = [n for n in names if n is not None and n not in LOGICAL_AXES]
  if bad:
    raise ValueError(f"unknown logical axis names {bad}; known: {LOGICAL_AXES}")
  mesh, _ = _mesh_and_rules()
  if mesh is None:
    return nnx.with_partitioning(init_fn, tuple(names), eager_sharding=False)
  return nnx.with_partitioning(init_fn, tuple(names))


def kernel_init(stddev: float = 0.02) -> Callable[..., jax.Array]:
  """BERT initialisation: normal(0, stddev) truncated at two standard deviations."""
  return jax.nn.initializers.truncated_normal(stddev)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):
  """y = x . W + b, contracting the trailing `in_shape` dims of x; W has shape in_shape + out_shape.

  `names` gives the logical axis names of W (one per dim); the bias takes the output names.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
               names: Names, *, dtype: Any = jnp.float32, use_bias: bool = True,
               init: Callable[..., jax.Array] | None = None, rngs: nnx.Rngs):
    self.in_shape = _as_tuple(in_shape)
    self.out_shape = _as_tuple(out_shape)
    if len(names) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(f"Dense names {tuple(names)} do not match {self.in_shape}+{self.out_shape}")
    self.dtype = dtype
    init = init or kernel_init()
    self.kernel = nnx.Param(param_init(init, names)(
        rngs.params(), self.in_shape + self.out_shape, jnp.float32))
    if use_bias:
      out_names = tuple(names)[len(self.in_shape):]
      self.bias = nnx.Param(param_init(jax.nn.initializers.zeros, out_names)(
          rngs.params(), self.out_shape, jnp.float32))
    else:
      self.bias = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if tuple(x.shape[x.ndim - n_in:]) != self.in_shape:
      raise ValueError(f"Dense expects trailing dims {self.in_shape}, got {x.shape}")
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel,
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis (statistics in float32)."""

  def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps = float(eps)
    self.dtype = dtype
    self.scale = nnx.Param(param_init(jax.nn.initializers.ones, ("embed",))(
        rngs.params(), (features,), jnp.float32))
    self.bias = nnx.Param(param_init(jax.nn.initializers.zeros, ("embed",))(
        rngs.params(), (features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class Dropout(nnx.Module):
  """Inverted dropout whose keep decisions come from 8-bit random numbers.

  One 32-bit draw gives four decisions (threefry bits are the costly part of dropout on CPU):
  keep where u8 >= t with t = round(rate * 256), survivors scaled by 256 / (256 - t), so
  E[output] = x exactly. The effective rate is t / 256 (the rate quantised to 1/256; 0.1 ->
  0.1016). Bits are drawn in x's shape (last axis packed by 4), so masks do not depend on the
  mesh. Called as nnx.Dropout: `drop(x, deterministic=..., rngs=nnx.Rngs(dropout=key))`.
  """

  def __init__(self, rate: float):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    self.threshold = int(round(rate * 256))

  def __call__(self, x: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if deterministic or self.threshold == 0:
      return x
    if rngs is None:
      raise ValueError("dropout with deterministic=False needs rngs=nnx.Rngs(dropout=key)")
    last = x.shape[-1]
    words = jax.random.bits(rngs.dropout(), (*x.shape[:-1], -(-last // 4)), jnp.uint32)
    u8 = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(*x.shape[:-1], -1)[..., :last]
    scale = jnp.asarray(256.0 / (256 - self.threshold), x.dtype)
    return jnp.where(u8 >= self.threshold, x * scale, jnp.zeros((), x.dtype))


def gelu_exact(x: jax.Array) -> jax.Array:
  """gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2))) (BERT's exact form)."""
  return jax.nn.gelu(x, approximate=False)


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form) on x [B, L, H, Dh] at `positions` [B, L].

  Pairs (x_i, x_{i+Dh/2}) are rotated by angle pos * base^(-2i/Dh), so q.k depends only on the
  relative offset of the two positions.
  """
  dh = x.shape[-1]
  if dh % 2:
    raise ValueError(f"rope needs an even head size, got {dh}")
  half = dh // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dh)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SelfAttention(nnx.Module):
  """Multi-head self-attention: softmax(q k^T / sqrt(Dh) + mask) v, then an output dense.

  Padded keys (attention_mask == 0) get NEG_INF added to their scores. Scores and softmax are
  computed in float32. With `use_rope`, q and k are rotated by `rope` before the product.
  """

  def __init__(self, d_model: int, heads: int, *, attention_dropout: float, use_rope: bool,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % heads:
      raise ValueError(f"model.d_model={d_model} is not divisible by model.heads={heads}")
    self.heads = heads
    self.head_dim = d_model // heads
    self.use_rope = use_rope
    self.dtype = dtype
    qkv_names = ("embed", "heads", "kv")
    shape = (heads, self.head_dim)
    self.query = Dense(d_model, shape, qkv_names, dtype=dtype, rngs=rngs)
    self.key = Dense(d_model, shape, qkv_names, dtype=dtype, rngs=rngs)
    self.value = Dense(d_model, shape, qkv_names, dtype=dtype, rngs=rngs)
    self.out = Dense(shape, d_model, ("heads", "kv", "embed"), dtype=dtype, rngs=rngs)
    self.dropout = Dropout(attention_dropout)

  def __call__(self, x: jax.Array, attention_mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    names = ("batch", "length", "heads", "kv")
    q = constrain(self.query(x), names)
    k = constrain(self.key(x), names)
    v = constrain(self.value(x), names)
    if self.use_rope:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q, k = rope(q, positions), rope(k, positions)
    scores = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    key_mask = attention_mask[:, None, None, :].astype(bool)
    scores = scores + jnp.where(key_mask, 0.0, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs).astype(self.dtype)
    ctx = constrain(jnp.einsum("bhlm,bmhd->blhd", probs, v), names)
    return self.out(ctx)


class FeedForward(nnx.Module):
  """FFN: gelu -> dense2(gelu(dense1 x)); swiglu -> wo(silu(x wi_0) * (x wi_1))."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str, dtype: Any, rngs: nnx.Rngs):
    self.activation = activation
    self.wi = Dense(d_model, d_ff, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    if activation == "swiglu":
      self.wi_gate = Dense(d_model, d_ff, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    elif activation == "gelu":
      self.wi_gate = nnx.data(None)
    else:
      raise ValueError(f"model.activation={activation!r} is not one of ('gelu', 'swiglu')")
    self.wo = Dense(d_ff, d_model, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation == "swiglu":
      h = jax.nn.silu(self.wi_gate(x)) * self.wi(x)
    else:
      h = gelu_exact(self.wi(x))
    h = constrain(h, ("batch", "length", "mlp"))
    return self.wo(h)


def embed_lookup(embed: nnx.Embed, ids: jax.Array, dtype: Any) -> jax.Array:
  """Rows `ids` of an embedding table, result [..., D] constrained to (batch, length, embed).

  The table is gathered whole first (as FSDP does for any weight) so the lookup partitions
  along the batch instead of rematerialising a vocab- or embed-sharded gather.
  """
  table = constrain(embed.embedding[...], (None, None))
  out = jnp.take(table, ids, axis=0).astype(dtype)
  return constrain(out, ("batch", "length", "embed")) if ids.ndim == 2 else out
