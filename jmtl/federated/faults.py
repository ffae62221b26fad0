"""Simulated faults of a federated run (`fed.faults.*`): random dropout and Byzantine sites.

Dropout (issue 14, requirement 9): after the round's participants are sampled (and the late ones
dropped by `fed.deadline_s`), each remaining site drops out independently with probability
p = `fed.faults.dropout`, drawn from a generator seeded by (seed, round), so a resumed run drops
the same sites. Dropped sites get mask 0: the aggregation weights renormalise over the
survivors; a round with no survivor is skipped (server unchanged, `applied` = 0) and logged.

Byzantine sites: the sites named in `fed.faults.byzantine`, or round(fraction x S) sites drawn
once from a generator seeded by `seed` (`fed.faults.byzantine_fraction`), fixed for the run.
Each round, the delta a Byzantine participant sends is corrupted inside the jitted round, per
site, from a per-site mode input (one compilation for every pattern):

  none       Delta' = Delta
  sign_flip  Delta' = -Delta                        (the update pushed the other way)
  scale      Delta' = a Delta,  a = fed.faults.scale (default 10)
  noise      Delta' = sigma z,  z ~ N(0, I),  sigma = ||Delta||_2 / sqrt(d)
             (the Gaussian attack of Xie et al. 2018, arXiv 1802.10116, at the honest update's
             scale: E||Delta'||^2 = ||Delta||^2), d = the number of values of the delta

The noise key of site k in round r is fold_in(fold_in(fold_in(key(seed), NOISE_TAG), r), k):
seeded per round and site, the same on resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jmtl.config import ConfigError

MODES = ("none", "sign_flip", "scale", "noise")  # index = the per-site mode code
ATTACKS = MODES[1:]
NOISE_TAG = 0xB12A


@dataclasses.dataclass(frozen=True)
class Faults:
  """A run's faults: dropout probability, Byzantine site indices, attack, scale factor."""

  dropout: float = 0.0
  byzantine: tuple[int, ...] = ()
  attack: str = "sign_flip"
  scale: float = 10.0

  def modes(self, n_sites: int) -> np.ndarray:
    """int32 [S]: MODES.index(attack) for a Byzantine site, 0 for an honest one."""
    out = np.zeros(n_sites, np.int32)
    out[list(self.byzantine)] = MODES.index(self.attack)
    return out


def byzantine_sites(names: Any, fraction: float, site_names: list[str], seed: int
                    ) -> tuple[int, ...]:
  """Indices (sorted) of the Byzantine sites: those named, else round(fraction x S) drawn
  without replacement from a generator seeded by (seed, NOISE_TAG). ValueError for a name that
  is not a site."""
  names = tuple(names)
  for n in names:
    if n not in site_names:
      raise ValueError(f"names {n!r}, which is not a site of fed.sites ({', '.join(site_names)})")
  if names:
    return tuple(sorted(site_names.index(n) for n in names))
  count = int(round(float(fraction) * len(site_names)))
  if not count:
    return ()
  rng = np.random.default_rng([int(seed), NOISE_TAG])
  return tuple(sorted(int(i) for i in rng.choice(len(site_names), size=count, replace=False)))


def from_config(config: ml_collections.ConfigDict, site_names: list[str]) -> Faults:
  """The `fed.faults.*` of a validated config; ConfigError (one line naming the key) for a
  Byzantine name that is not a site."""
  f = config.fed.faults
  try:
    byz = byzantine_sites(f.byzantine, f.byzantine_fraction, site_names, int(config.seed))
  except ValueError as e:
    raise ConfigError(f"config key 'fed.faults.byzantine' = {tuple(f.byzantine)} {e}") from e
  return Faults(float(f.dropout), byz, str(f.attack), float(f.scale))


def dropout(mask: np.ndarray, rate: float, seed: int, round_index: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """(mask after dropout, 0/1 of the sites that dropped out): each site with mask 1 drops with
  probability `rate`, uniforms from a generator seeded by (seed, round, 0xD0); float32 [S]."""
  mask = np.asarray(mask, np.float32)
  if rate <= 0:
    return mask.copy(), np.zeros_like(mask)
  u = np.random.default_rng([int(seed), int(round_index), 0xD0]).random(mask.shape[0])
  lost = ((mask > 0) & (u < rate)).astype(np.float32)
  return mask * (1 - lost), lost


def noise_key(base_key: jax.Array, round_index: jax.Array, site: jax.Array) -> jax.Array:
  """The noise key of `site` in `round_index` (module docstring), from key(seed)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key, NOISE_TAG),
                                               round_index), site)


def corrupt(delta: Any, mode: jax.Array, scale: float, key: jax.Array) -> Any:
  """One site's sent delta under `mode` (int32 scalar, index into MODES; traced, so one
  compilation serves every mode): the module docstring's rules; leaves keep dtype and shape."""
  leaves, treedef = jax.tree.flatten(delta)
  size = sum(x.size for x in leaves)

  def none(ls):
    return list(ls)

  def flip(ls):
    return [-x for x in ls]

  def scaled(ls):
    return [(x.astype(jnp.float32) * float(scale)).astype(x.dtype) for x in ls]

  def noise(ls):
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in ls)
    sigma = jnp.sqrt(sq / max(size, 1))
    keys = jax.random.split(key, max(len(ls), 1))
    return [(sigma * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for k, x in zip(keys, ls)]

  out = jax.lax.switch(jnp.clip(mode, 0, len(MODES) - 1), (none, flip, scaled, noise), leaves)
  return jax.tree.unflatten(treedef, out)
