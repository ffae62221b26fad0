"""Uplink compression of a site's update: `fed.compress` specs, exact byte counts, payload bytes.

A spec is one optional sparsifier and one optional value codec joined by `+`:

  ""                 off: float32 values (4 bytes each)
  "bf16" / "fp16"    cast to bfloat16 / float16 (2 bytes each; fp16 saturates at +-65504)
  "int8"             symmetric 8-bit with one float32 scale per block of `block` values:
                     s = max|v| / 127 over the block, q = round(v / s) in [-127, 127],
                     v' = q s (|v - v'| <= s / 2; NVFlare's blockwise 8-bit message quantization)
  "q<b>" / "stochastic:<b>"   unbiased stochastic b-bit quantization, b = 1..8 (QSGD, Alistarh et
                     al. 2017, arXiv 1610.02132; FedJAX's uniform stochastic quantization): per
                     block lo = min v, hi = max v, L = 2^b - 1 intervals of width d = (hi - lo) / L;
                     u = (v - lo) / d, q = floor(u) + [U < u - floor(u)] with U ~ U[0, 1), so
                     E[lo + q d] = v exactly; b bits per value + two float32 (lo, hi) per block
  "topk:<f>"         per leaf, the k = max(1, ceil(f n)) entries of largest magnitude (values +
                     indices; an index takes 1, 2 or 4 bytes: the fewest that address the leaf's
                     n entries), with error feedback (Stich et al. 2018, arXiv 1809.07599;
                     Karimireddy et al. 2019, arXiv 1901.09847): the site compresses
                     x = Delta_k + e_k and keeps e_k <- x - decode(encode(x)) for the next round
                     it takes part in; the kept values go through the value codec, e.g.
                     "topk:0.01+int8"

Every leaf the site sends is flattened and encoded on its own (blocks never span leaves). The
encoding runs per site inside the jitted round (`apply`); the aggregate uses the decoded values.
`leaf_bytes` counts the bytes of one leaf's encoding (values, indices, scales), and `to_bytes` /
`from_bytes` (numpy, host) write and read exactly those bytes, so a multi-process backend can
send them as they are: per leaf in tree order, [indices (little-endian uint8/16/32)] [values:
float32 / bf16 / fp16 little-endian, int8, or b-bit codes packed little-endian bit order]
[int8: float32 scales per block | q<b>: float32 (lo, hi) per block]. No header: both ends know
the spec and the leaf sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class Codec:
  """A parsed `fed.compress` spec: `topk` (fraction in (0, 1], or None), `values` ("f32",
  "bf16", "fp16", "int8" or "q"), `bits` (b of "q<b>"), `block` (values per scale block)."""

  topk: float | None = None
  values: str = "f32"
  bits: int = 0
  block: int = 256

  @property
  def enabled(self) -> bool:
    return self.topk is not None or self.values != "f32"

  @property
  def error_feedback(self) -> bool:
    """Error feedback is kept with top-k (the residual of the whole encoding)."""
    return self.topk is not None


_Q = re.compile(r"^(?:q|stochastic:)(\d+)$")
_TOPK = re.compile(r"^topk:(.+)$")


def parse(spec: str, block: int = 256) -> Codec:
  """The Codec of `spec` (module docstring grammar); ValueError naming the bad part."""
  if int(block) < 1:
    raise ValueError(f"block size must be >= 1, got {block}")
  spec = str(spec).strip()
  if spec in ("", "none", "f32", "float32"):
    return Codec(block=int(block))
  topk, values, bits = None, "f32", 0
  for i, part in enumerate(p.strip() for p in spec.split("+")):
    m = _TOPK.match(part)
    if m:
      if i != 0:
        raise ValueError(f"{part!r} must come first (top-k, then one value codec)")
      try:
        topk = float(m.group(1))
      except ValueError:
        raise ValueError(f"{part!r}: the fraction must be a number") from None
      if not 0 < topk <= 1:
        raise ValueError(f"{part!r}: the fraction must be in (0, 1]")
      continue
    if values != "f32":
      raise ValueError(f"{part!r}: only one value codec (bf16, fp16, int8, q<b>) may follow")
    m = _Q.match(part)
    if part in ("bf16", "fp16", "int8"):
      values = part
    elif m:
      values, bits = "q", int(m.group(1))
      if not 1 <= bits <= 8:
        raise ValueError(f"{part!r}: bits must be in 1..8")
    else:
      raise ValueError(f"unknown part {part!r} (topk:<f>, bf16, fp16, int8, q<b>, "
                       f"stochastic:<b>)")
  return Codec(topk=topk, values=values, bits=bits, block=int(block))


def check_spec(spec: str) -> bool:
  """Whether `spec` parses (the config check of `fed.compress`)."""
  try:
    parse(spec)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------ sizes
def kept(codec: Codec, n: int) -> int:
  """Values sent for a leaf of n entries: k = max(1, ceil(f n)) under top-k, else n."""
  if codec.topk is None:
    return int(n)
  return min(int(n), max(1, math.ceil(codec.topk * n - 1e-9)))


def index_width(n: int) -> int:
  """Bytes of one index into a leaf of n entries: 1 (n <= 2^8), 2 (n <= 2^16) or 4."""
  return 1 if n <= 1 << 8 else 2 if n <= 1 << 16 else 4


def _blocks(codec: Codec, m: int) -> int:
  return -(-m // codec.block)


def leaf_bytes(codec: Codec, n: int) -> int:
  """Exact bytes of one encoded leaf of n entries (indices + values + scales)."""
  m = kept(codec, n)
  idx = m * index_width(n) if codec.topk is not None else 0
  if codec.values == "f32":
    vals = 4 * m
  elif codec.values in ("bf16", "fp16"):
    vals = 2 * m
  elif codec.values == "int8":
    vals = m + 4 * _blocks(codec, m)
  else:
    vals = -(-m * codec.bits // 8) + 8 * _blocks(codec, m)
  return idx + vals


# ------------------------------------------------------------------ in-jit encode / decode
def _pad_blocks(v: jax.Array, codec: Codec) -> jax.Array:
  m = v.shape[0]
  nb = _blocks(codec, m)
  return jnp.pad(v, (0, nb * codec.block - m)).reshape(nb, codec.block)


def encode(codec: Codec, x: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
  """One flat float32 leaf x [n] -> its encoding: `idx` int32 [k] (top-k), and `v` float32 /
  bfloat16 / float16 [m], or `q` int8 [m] + `scale` float32 [blocks], or `q` uint8 [m] + `lo`,
  `hi` float32 [blocks]. `key` is needed by the stochastic codec."""
  x = x.astype(jnp.float32).reshape(-1)
  out: dict[str, jax.Array] = {}
  if codec.topk is not None:
    k = kept(codec, x.shape[0])
    _, idx = jax.lax.top_k(jnp.abs(x), k)
    out["idx"] = idx.astype(jnp.int32)
    x = x[idx]
  m = x.shape[0]
  if codec.values == "f32":
    out["v"] = x
  elif codec.values == "bf16":
    out["v"] = x.astype(jnp.bfloat16)
  elif codec.values == "fp16":
    out["v"] = jnp.clip(x, -FP16_MAX, FP16_MAX).astype(jnp.float16)
  elif codec.values == "int8":
    b = _pad_blocks(x, codec)
    scale = jnp.max(jnp.abs(b), axis=1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(b / safe[:, None]), -127, 127).astype(jnp.int8)
    out["q"], out["scale"] = q.reshape(-1)[:m], scale
  else:
    if key is None:
      raise ValueError("stochastic quantization needs a PRNG key")
    levels = (1 << codec.bits) - 1
    b = _pad_blocks(x, codec)
    valid = _pad_blocks(jnp.ones_like(x, dtype=bool), codec)
    lo = jnp.min(jnp.where(valid, b, jnp.inf), axis=1)
    hi = jnp.max(jnp.where(valid, b, -jnp.inf), axis=1)
    step = (hi - lo) / levels
    safe = jnp.where(step > 0, step, 1.0)
    u = jnp.where(step[:, None] > 0, (b - lo[:, None]) / safe[:, None], 0.0)
    f = jnp.floor(u)
    q = f + (jax.random.uniform(key, u.shape) < (u - f))
    q = jnp.clip(q, 0, levels).astype(jnp.uint8)
    out["q"], out["lo"], out["hi"] = q.reshape(-1)[:m], lo, hi
  return out


def decode(codec: Codec, enc: dict[str, jax.Array], n: int) -> jax.Array:
  """The float32 leaf [n] an encoding stands for (zeros where top-k dropped entries)."""
  if codec.values in ("f32", "bf16", "fp16"):
    v = enc["v"].astype(jnp.float32)
  elif codec.values == "int8":
    m = enc["q"].shape[0]
    s = jnp.repeat(enc["scale"], codec.block)[:m]
    v = enc["q"].astype(jnp.float32) * s
  else:
    m = enc["q"].shape[0]
    levels = (1 << codec.bits) - 1
    lo = jnp.repeat(enc["lo"], codec.block)[:m]
    hi = jnp.repeat(enc["hi"], codec.block)[:m]
    v = lo + enc["q"].astype(jnp.float32) * ((hi - lo) / levels)
  if codec.topk is None:
    return v
  return jnp.zeros([n], jnp.float32).at[enc["idx"]].set(v)


def roundtrip(codec: Codec, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """decode(encode(x)) with x's shape (float32)."""
  return decode(codec, encode(codec, x.reshape(-1), key), x.size).reshape(x.shape)


def apply(codec: Codec, delta: Any, residual: Any, key: jax.Array, sent: Any,
          take_part: jax.Array) -> tuple[Any, Any]:
  """One site's update through the codec: (decoded update, new residual).

  `delta`: the site's float32 update tree; `residual`: its error-feedback tree (same leaves;
  None without top-k); `sent`: per leaf 0/1, whether the site sends that leaf (unsent leaves
  decode to 0 and keep a zero residual); `take_part`: scalar 0/1, the residual of a site that
  does not take part stays as it was. Leaf i uses the key fold_in(key, i).
  """
  leaves, treedef = jax.tree.flatten(delta)
  res = jax.tree.leaves(residual) if residual is not None else [None] * len(leaves)
  flags = jax.tree.leaves(sent)
  dec, new_res = [], []
  for i, (d, e, s) in enumerate(zip(leaves, res, flags)):
    x = (d + e if e is not None else d) * s
    y = roundtrip(codec, x, jax.random.fold_in(key, i)) * s
    dec.append(y)
    if e is not None:
      new_res.append(jnp.where(take_part > 0, x - y, e))
  return (jax.tree.unflatten(treedef, dec),
          jax.tree.unflatten(treedef, new_res) if residual is not None else None)


# ------------------------------------------------------------------ payload bytes (host)
def _le(dtype: Any) -> np.dtype:
  return np.dtype(dtype).newbyteorder("<")


def _idx_dtype(n: int) -> np.dtype:
  return _le({1: np.uint8, 2: np.uint16, 4: np.uint32}[index_width(n)])


def to_bytes(codec: Codec, encodings: list[dict[str, Any]], sizes: list[int]) -> bytes:
  """The payload of one site: its leaves' encodings (`encode` outputs, in tree order, of
  leaves of `sizes` entries) as bytes; len == sum(leaf_bytes(codec, n) for n in sizes)."""
  out = bytearray()
  for enc, n in zip(encodings, sizes):
    enc = {k: np.asarray(v) for k, v in enc.items()}
    if codec.topk is not None:
      out += enc["idx"].astype(_idx_dtype(n)).tobytes()
    if codec.values == "f32":
      out += enc["v"].astype(_le(np.float32)).tobytes()
    elif codec.values == "bf16":
      out += enc["v"].astype(ml_dtypes.bfloat16).view(_le(np.uint16)).tobytes()
    elif codec.values == "fp16":
      out += enc["v"].astype(_le(np.float16)).tobytes()
    elif codec.values == "int8":
      out += enc["q"].astype(np.int8).tobytes() + enc["scale"].astype(_le(np.float32)).tobytes()
    else:
      q = enc["q"].astype(np.uint8)
      bits = ((q[:, None] >> np.arange(codec.bits, dtype=np.uint8)) & 1).reshape(-1)
      out += np.packbits(bits, bitorder="little").tobytes()
      out += np.stack([enc["lo"], enc["hi"]], axis=1).astype(_le(np.float32)).tobytes()
  return bytes(out)


def from_bytes(codec: Codec, data: bytes, sizes: list[int]) -> list[dict[str, np.ndarray]]:
  """The inverse of `to_bytes`: the encodings (numpy) of leaves of `sizes` entries.
  ValueError when `data` is not exactly that long."""
  want = sum(leaf_bytes(codec, n) for n in sizes)
  if len(data) != want:
    raise ValueError(f"payload has {len(data)} bytes; the spec and leaf sizes need {want}")
  buf, pos, out = memoryview(data), 0, []

  def take(count: int, dtype: Any) -> np.ndarray:
    nonlocal pos
    dt = np.dtype(dtype)
    a = np.frombuffer(buf[pos:pos + count * dt.itemsize], dtype=dt, count=count)
    pos += count * dt.itemsize
    return a

  for n in sizes:
    m, enc = kept(codec, n), {}
    if codec.topk is not None:
      enc["idx"] = take(m, _idx_dtype(n)).astype(np.int32)
    if codec.values == "f32":
      enc["v"] = take(m, _le(np.float32)).astype(np.float32)
    elif codec.values == "bf16":
      enc["v"] = take(m, _le(np.uint16)).astype(np.uint16).view(ml_dtypes.bfloat16)
    elif codec.values == "fp16":
      enc["v"] = take(m, _le(np.float16)).astype(np.float16)
    elif codec.values == "int8":
      enc["q"] = take(m, np.int8)
      enc["scale"] = take(_blocks(codec, m), _le(np.float32)).astype(np.float32)
    else:
      packed = take(-(-m * codec.bits // 8), np.uint8)
      bits = np.unpackbits(packed, bitorder="little")[:m * codec.bits].reshape(m, codec.bits)
      enc["q"] = (bits.astype(np.uint8) << np.arange(codec.bits, dtype=np.uint8)).sum(
          axis=1).astype(np.uint8)
      pairs = take(2 * _blocks(codec, m), _le(np.float32)).astype(np.float32).reshape(-1, 2)
      enc["lo"], enc["hi"] = pairs[:, 0].copy(), pairs[:, 1].copy()
    out.append(enc)
  return out


def decode_host(codec: Codec, enc: dict[str, np.ndarray], n: int) -> np.ndarray:
  """`decode` in numpy (the receiving side of a payload): float32 [n]."""
  if codec.values in ("f32", "bf16", "fp16"):
    v = np.asarray(enc["v"]).astype(np.float32)
  elif codec.values == "int8":
    m = enc["q"].shape[0]
    v = enc["q"].astype(np.float32) * np.repeat(enc["scale"], codec.block)[:m]
  else:
    m = enc["q"].shape[0]
    levels = np.float32((1 << codec.bits) - 1)
    lo = np.repeat(enc["lo"], codec.block)[:m]
    hi = np.repeat(enc["hi"], codec.block)[:m]
    v = lo + enc["q"].astype(np.float32) * ((hi - lo) / levels)
  if codec.topk is None:
    return v.astype(np.float32)
  out = np.zeros(n, np.float32)
  out[enc["idx"]] = v
  return out
