"""Secure aggregation by pairwise additive masks (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS; the parameter names of Flower's
SecAgg+ workflow: `clipping_range`, `quantization_range`, modulus 2^32).

The aggregation only ever sees masked payloads; their sum mod 2^32 is the sum of the sites'
fixed-point updates, because every pair's masks cancel.

Fixed point (`FixedPoint`, clipping range c, quantization range Q):
  step  d = 2c / (Q - 1)                          (Q levels span [-c, c], Flower's convention)
  encode(x) = clip(floor(clip(x, -c, c) / d + u), -L, L) as int32, viewed as uint32
              (two's complement), u ~ U[0, 1) per value: unbiased stochastic rounding,
              |encode(x) d - clip(x)| < d (plus float32 rounding of x / d: 2^-24 |x / d| levels)
  L = floor(Q / 2), so |encode(x)| <= L. The sum of S encoded values lies in [-S L, S L]; with
  S L <= 2^31 - 1 (`FixedPoint.check_sites`) it never wraps modulo 2^32, and
  decode(sum) = int32(sum) * d is exact up to the S roundings: |decode - sum_k clip(x_k)| < S d.

Pairwise masks. Each round r, site i has an X25519 key pair (RFC 7748) derived from the run's
seed; for every pair i < j the shared secret X25519(sk_i, pk_j) = X25519(sk_j, pk_i) goes
through HKDF-SHA256 (RFC 5869) to a 128-bit pair seed s_ij, which a counter-based PRG expands
(JAX's threefry2x32, Salmon et al. 2011, keyed by the seed's words; one stream per secure sum
of a round, its counters running over the parameter leaves in tree order): p_ij = PRG(s_ij).
Site i sends

  y_i = encode(x_i) + sum_{j > i} c_ijg p_ij - sum_{j < i} c_jig p_ij   (mod 2^32)

where c_ijg = m_i m_j h_ig h_jg (both take part in the round and both hold the leaf's group g;
`pair_coefficients`). Summed over i every p_ij appears once with + and once with -, so
sum_i y_i = sum_i encode(x_i) (mod 2^32).

Dropout after masking (Bonawitz et al. 2017, sec. 4): when site d's payload never arrives, the
sum of the survivors' payloads still holds their masks with d. Each survivor i reveals s_id
(in the paper the survivors reveal Shamir shares of d's key, from which the server rebuilds
s_id; here they hand over s_id itself), and the server removes +-p_id (`unmask_sum`): the
result is exactly sum over survivors of encode(x_i).

Weights (FedAvg and the other rules of `jmtl.federated.aggregation`): a secure sum only sums,
so each site scales its update by its public coefficient w_k h_kg / sum_j w_j h_jg before
encoding (`secure_grouped_mean`); the weights, the participants and which site holds which
head are public, as in Flower's SecAgg+ (which uploads [w, w x params]).

What this simulation protects and what it does not: the aggregation code in the compiled
round (`server_sum`, a psum over `site`) receives only masked uint32 payloads, each of which is
uniformly distributed given the update (one-time pad over Z_2^32) as long as one other
participant's pair seed is unknown. It is a simulation: every site runs in one process on one
host, the private keys come from the run's seed (`site_private_key`: HKDF of (seed, round,
site)) so a run is reproducible and a resumed run derives the same masks, and therefore anyone
holding the config can recompute every mask; there is no network, no key exchange messages,
no authentication, no Shamir sharing and no self-mask b_i (the paper's double masking, which
protects a site that is only late rather than gone); the threat model is an honest-but-curious
server that follows the protocol. Threefry is a counter-based PRG made for simulation, not a
vetted stream cipher (a deployment would use AES-CTR or ChaCha20 keyed by s_ij).
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = 2**31 - 1
CRYPTOGRAPHY_REQUIREMENT = "cryptography>=42"  # the `fed` extra; imported only when keys are made


def _crypto():
  """(hashes, x25519, HKDF) from `cryptography`, imported when first needed so that jmtl
  without the `fed` extra runs everything but secure aggregation; ImportError names the pin."""
  try:
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import x25519  # noqa: PLC0415
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f"secure aggregation needs {CRYPTOGRAPHY_REQUIREMENT} (pip install "
                      f"'jmtl[fed]'): {e}") from e
  return hashes, x25519, HKDF


@dataclasses.dataclass(frozen=True)
class FixedPoint:
  """The encoding of updates in Z_2^32: values clipped to [-clipping_range, clipping_range],
  `quantization_range` levels over that interval (Flower's SecAgg+ parameter names)."""

  clipping_range: float
  quantization_range: int

  def __post_init__(self):
    if not self.clipping_range > 0:
      raise ValueError(f"clipping_range must be > 0, got {self.clipping_range}")
    if not 2 <= int(self.quantization_range) <= 2**32:
      raise ValueError(f"quantization_range must be in [2, 2^32], got {self.quantization_range}")

  @property
  def step(self) -> float:
    """The quantization step d = 2c / (Q - 1) (units of the update)."""
    return 2.0 * float(self.clipping_range) / (int(self.quantization_range) - 1)

  @property
  def max_level(self) -> int:
    """L = floor(Q / 2): every encoded value lies in [-L, L]."""
    return int(self.quantization_range) // 2

  def check_sites(self, n_sites: int) -> None:
    """ValueError unless the sum of `n_sites` encoded values cannot wrap: S L <= 2^31 - 1."""
    if n_sites * self.max_level > _INT32_MAX:
      raise ValueError(
          f"{n_sites} sites x quantization_range / 2 = {n_sites * self.max_level} exceeds "
          f"2^31 - 1: the sum of the sites' encoded updates could wrap modulo 2^32; use "
          f"quantization_range <= {2 * (_INT32_MAX // n_sites) + 1}")


def max_quantization_range(n_sites: int) -> int:
  """The largest Q whose sum over `n_sites` cannot wrap (S floor(Q/2) <= 2^31 - 1)."""
  return 2 * (_INT32_MAX // int(n_sites)) + 1


# ------------------------------------------------------------------ keys and pair seeds
def site_private_key(seed: int, round_index: int, site: int) -> Any:
  """Site `site`'s X25519 private key for round `round_index`: 32 bytes of HKDF-SHA256 of the
  run's `seed` (deterministic, so a run is reproducible and resumable; see the module
  docstring for what that means for security). Returns an X25519PrivateKey."""
  hashes, x25519, HKDF = _crypto()
  ikm = struct.pack("<q", int(seed))
  info = b"jmtl secagg site key|%d|%d" % (int(round_index), int(site))
  raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"jmtl-secagg-v1", info=info).derive(ikm)
  return x25519.X25519PrivateKey.from_private_bytes(raw)


def pair_seed(private_key: Any, peer_public: Any, round_index: int, i: int, j: int
              ) -> np.ndarray:
  """s_ij: HKDF-SHA256 (128 bits) of the X25519 shared secret of sites i and j (an
  X25519PrivateKey and the peer's X25519PublicKey), as uint32[4]; symmetric (i's key with j's
  public key gives what j's with i's gives)."""
  hashes, _, HKDF = _crypto()
  shared = private_key.exchange(peer_public)
  lo, hi = sorted((int(i), int(j)))
  info = b"jmtl secagg pair seed|%d|%d|%d" % (int(round_index), lo, hi)
  raw = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(shared)
  return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def pair_seeds(seed: int, round_index: int, n_sites: int) -> np.ndarray:
  """uint32 [S, S, 4]: row i holds s_ij for every j (what site i knows; the diagonal is 0)."""
  keys = [site_private_key(seed, round_index, k) for k in range(n_sites)]
  public = [k.public_key() for k in keys]
  out = np.zeros((n_sites, n_sites, 4), np.uint32)
  for i in range(n_sites):
    for j in range(i + 1, n_sites):
      out[i, j] = out[j, i] = pair_seed(keys[i], public[j], round_index, i, j)
  return out


def pair_coefficients(mask: Any, holds: Any = None) -> np.ndarray:
  """int32 [S, S, G]: c[i, j, g] = +1 (i < j, site i adds p_ij) or -1 (i > j, it subtracts)
  times m_i m_j h_ig h_jg; 0 on the diagonal. `mask` [S] 0/1, `holds` [S, G] 0/1 (None: all
  sites hold the one group 0)."""
  m = np.asarray(mask, np.float64).reshape(-1)
  h = np.ones((m.size, 1)) if holds is None else np.asarray(holds, np.float64)
  active = (m[:, None] * h)  # [S, G]
  sign = np.sign(np.arange(m.size)[None, :] - np.arange(m.size)[:, None])  # +1 for j > i
  return (sign[:, :, None] * (active[:, None, :] * active[None, :, :] > 0)).astype(np.int32)


# ------------------------------------------------------------------ PRG, encode, decode
def prg_bits(seed: jax.Array, size: int, stream: int) -> jax.Array:
  """PRG(s)[stream]: `size` uint32 words from threefry2x32 keyed by the 4 seed words (words 0-1
  the key; words 2-3 and the stream folded in); word t is the PRG at counter t. Works under
  jit; the words do not depend on sharding (JAX's partitionable threefry)."""
  seed = jnp.asarray(seed, jnp.uint32)
  key = jax.random.wrap_key_data(seed[:2], impl="threefry2x32")
  for word in (seed[2], seed[3], jnp.uint32(stream)):
    key = jax.random.fold_in(key, word)
  # The barrier materialises the words: without it XLA fuses the generator into each slice or
  # concatenated piece that reads it and compiles one copy per parameter leaf.
  return jax.lax.optimization_barrier(jax.random.bits(key, (int(size),), jnp.uint32))


def uniform(key: jax.Array, size: int) -> jax.Array:
  """`size` U[0, 1) float32 draws from `key` (materialised, see `prg_bits`): the stochastic
  rounding of `encode`, one draw per value of the leaves concatenated in tree order."""
  return jax.lax.optimization_barrier(jax.random.uniform(key, (int(size),), jnp.float32))


def encode(x: jax.Array, fp: FixedPoint, u: jax.Array) -> jax.Array:
  """uint32 fixed point of `x` (any float shape): clip to [-c, c], stochastic rounding
  floor(x / d + u) with `u` U[0, 1) draws of x's shape (`uniform`), two's complement (module
  docstring)."""
  scaled = jnp.clip(x.astype(jnp.float32), -fp.clipping_range, fp.clipping_range) / fp.step
  q = jnp.floor(scaled + u)
  q = jnp.clip(q, -fp.max_level, fp.max_level).astype(jnp.int32)
  return jax.lax.bitcast_convert_type(q, jnp.uint32)


def decode(total: jax.Array, fp: FixedPoint) -> jax.Array:
  """float32 value of a uint32 sum of encoded values (int32 x d; exact when it did not wrap)."""
  return jax.lax.bitcast_convert_type(jnp.asarray(total, jnp.uint32), jnp.int32
                                      ).astype(jnp.float32) * jnp.float32(fp.step)


def _signed(bits: jax.Array, c: jax.Array) -> jax.Array:
  """c * bits mod 2^32 for c in {-1, 0, 1}."""
  zero = jnp.zeros_like(bits)
  return jnp.where(c > 0, bits, zero) - jnp.where(c < 0, bits, zero)


def _split(flat: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """Consecutive pieces of a materialised vector, reshaped (slices, no concatenation: XLA
  would copy a concatenation into every slice that reads it)."""
  out, at = [], 0
  for shape, n in zip(shapes, _sizes(shapes)):
    out.append(flat[at:at + n].reshape(shape))
    at += n
  return out


def _sizes(shapes: Sequence[tuple[int, ...]]) -> list[int]:
  return [int(np.prod(s, dtype=np.int64)) for s in shapes]


def _group_leaves(leaves: Sequence[Any], groups: Any) -> list[int]:
  return [0] * len(leaves) if groups is None else [int(g) for g in jax.tree.leaves(groups)]


def pair_mask(shapes: Sequence[tuple[int, ...]], group_leaves: Sequence[int], seed: jax.Array,
              coef: jax.Array, stream: int) -> list[jax.Array]:
  """One pair's signed mask per leaf (uint32, shaped as `shapes`): leaf n (group g) takes the
  words of PRG(s)[stream] at counters [o_n, o_n + size_n) (o_n: the sizes of the leaves
  before it in tree order) times coef[g] in {-1, 0, 1} (mod 2^32). `coef` [G]."""
  bits = _split(prg_bits(seed, sum(_sizes(shapes)), stream), shapes)
  return [_signed(b, coef[g]) for b, g in zip(bits, group_leaves)]


def site_mask(like: Any, groups: Any, seeds_row: jax.Array, coef_row: jax.Array,
              stream: int = 0) -> Any:
  """Site i's total mask, a tree of uint32 shaped like `like`: sum_j c[i, j, g] p_ij per leaf
  (`pair_mask`, mod 2^32). `seeds_row` [S, 4] (row i of `pair_seeds`), `coef_row` [S, G] (row
  i of `pair_coefficients`); `groups` None = all 0. A loop over j (one PRG in the program)."""
  leaves, tree = jax.tree.flatten(like)
  shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
  return jax.tree.unflatten(tree, _site_mask(
      jnp.asarray(seeds_row, jnp.uint32), jnp.asarray(coef_row, jnp.int32), shapes=shapes,
      group_leaves=tuple(_group_leaves(leaves, groups)), stream=int(stream)))


@functools.partial(jax.jit, static_argnames=("shapes", "group_leaves", "stream"))
def _site_mask(seeds_row, coef_row, *, shapes, group_leaves, stream):
  def body(j, acc):
    return [a + m for a, m in zip(acc, pair_mask(shapes, group_leaves, seeds_row[j],
                                                 coef_row[j], stream))]

  # The first pair starts the carry (inside shard_map it then varies over sites like the rest).
  first = pair_mask(shapes, group_leaves, seeds_row[0], coef_row[0], stream)
  return jax.lax.fori_loop(1, seeds_row.shape[0], body, first)


# ------------------------------------------------------------------ site side / server side
class MaskedPayload(NamedTuple):
  """What a site sends: its index and a tree of uint32 leaves (encoded update + masks)."""

  site: int
  values: Any


def site_payload(update: Any, site: int, seeds_row: Any, coef_row: Any, fp: FixedPoint,
                 key: jax.Array, groups: Any = None, stream: int = 0) -> MaskedPayload:
  """Site side: encode(update) + site_mask(...) mod 2^32, per leaf (float leaves of any shape;
  `key` draws the stochastic rounding of all leaves, concatenated in tree order). The plain
  update stays here."""
  leaves, tree = jax.tree.flatten(update)
  out = _payload(leaves, jnp.asarray(seeds_row, jnp.uint32), jnp.asarray(coef_row, jnp.int32),
                 key, fp=fp, group_leaves=tuple(_group_leaves(leaves, groups)),
                 stream=int(stream))
  return MaskedPayload(int(site), jax.tree.unflatten(tree, out))


@functools.partial(jax.jit, static_argnames=("fp", "group_leaves", "stream"))
def _payload(leaves, seeds_row, coef_row, key, *, fp, group_leaves, stream):
  shapes = tuple(tuple(x.shape) for x in leaves)
  u = _split(uniform(key, sum(_sizes(shapes))), shapes)
  mask = _site_mask(seeds_row, coef_row, shapes=shapes, group_leaves=group_leaves,
                    stream=stream)
  return [encode(x, fp, v) + m for x, v, m in zip(leaves, u, mask)]


def payload_bytes(payload: MaskedPayload, groups: Any = None, holds_row: Any = None) -> bytes:
  """The bytes a site sends: its uint32 leaves of the groups it holds (`holds_row` [G], None =
  all), little-endian, in tree order: 4 bytes per value, what `bytes_up` counts."""
  leaves = jax.tree.leaves(payload.values)
  held = (lambda g: True) if holds_row is None else (lambda g: bool(np.asarray(holds_row)[g]))
  return b"".join(np.asarray(x, "<u4").tobytes()
                  for x, g in zip(leaves, _group_leaves(leaves, groups)) if held(g))


def unmask_sum(payloads: Sequence[MaskedPayload], revealed: Mapping[tuple[int, int], Any]
               | None = None, coef: Any = None, groups: Any = None, stream: int = 0) -> Any:
  """Server side: sum_i y_i mod 2^32 over the payloads that arrived (a tree of uint32), minus
  the masks survivor i shared with a dropped site d, from `revealed[(i, d)] = s_id` and the
  public coefficients `coef` [S, S, G] used when masking. Takes no plain update: when every
  participant arrived, or every dropped pair is revealed, the result is sum_i encode(x_i).
  ValueError for no payload, or a revealed pair whose first site did not arrive or second did."""
  if not payloads:
    raise ValueError("no payload arrived")
  total = payloads[0].values
  for p in payloads[1:]:
    total = jax.tree.map(jnp.add, total, p.values)
  arrived = {p.site for p in payloads}
  if revealed:
    if coef is None:
      raise ValueError("revealed seeds need the coefficients used when masking (coef)")
    coef = np.asarray(coef)
    leaves, tree = jax.tree.flatten(total)
    shapes = tuple(tuple(x.shape) for x in leaves)
    group_leaves = tuple(_group_leaves(leaves, groups))
    for (i, d), s in sorted(revealed.items()):
      if i not in arrived or d in arrived:
        raise ValueError(f"revealed seed ({i}, {d}): site {i} must have arrived and {d} not")
      masks = _pair_mask(shapes, group_leaves, jnp.asarray(s, jnp.uint32),
                         jnp.asarray(coef[i, d], jnp.int32), int(stream))
      leaves = [x - m for x, m in zip(leaves, masks)]
    total = jax.tree.unflatten(tree, leaves)
  return total


_pair_mask = jax.jit(pair_mask, static_argnums=(0, 1, 4))


# ------------------------------------------------------------------ inside the jitted round
def server_sum(payload: Any, axis_name: str) -> Any:
  """The compiled round's aggregation: psum of each site's uint32 payload over `axis_name`
  (integer sums wrap: mod 2^32). It receives the masked payload only."""
  return jax.tree.map(lambda y: jax.lax.psum(y, axis_name), payload)


def secure_grouped_mean(deltas: Any, groups: Any, weight: jax.Array, holds: jax.Array,
                        seeds_row: jax.Array, coef_row: jax.Array, fp: FixedPoint,
                        key: jax.Array, axis_name: str, stream: int = 0) -> tuple[Any, jax.Array]:
  """`aggregation.grouped_mean` through the secure sum, for one site inside shard_map.

  Site side: x_k = (w_k h_kg / sum_j w_j h_jg) clip(Delta_k, -c, c) per leaf of group g (the
  weights are public; the denominators are psums of public scalars), y_k = encode(x_k) +
  masks. Server side: decode(server_sum(y)). Returns (the aggregate, float32 leaves cast to
  the deltas' dtypes; the number of this site's values that clipping changed, float32 scalar,
  0 for a site with weight 0). Differs from grouped_mean by < S d per value plus clipping.
  """
  leaves, tree = jax.tree.flatten(deltas)
  group_leaves = jax.tree.leaves(groups)
  w = weight.astype(jnp.float32)
  contrib, clipped = [], jnp.float32(0.0)
  for x, g in zip(leaves, group_leaves):
    wg = w * holds[g].astype(jnp.float32)
    den = jax.lax.psum(wg, axis_name)
    share = jnp.where(den > 0, wg / jnp.where(den > 0, den, 1.0), 0.0)
    x = x.astype(jnp.float32)
    clipped = clipped + jnp.where(share > 0, jnp.sum(jnp.abs(x) > fp.clipping_range), 0)
    contrib.append(share * jnp.clip(x, -fp.clipping_range, fp.clipping_range))
  payload = site_payload(jax.tree.unflatten(tree, contrib), 0, seeds_row, coef_row, fp, key,
                         groups, stream).values
  total = server_sum(payload, axis_name)
  out = jax.tree.map(lambda t, d: decode(t, fp).astype(d.dtype), total, deltas)
  return out, clipped.astype(jnp.float32)
