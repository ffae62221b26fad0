"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963, Alg. 1).

With sites k = 1..S, participation m_k in {0, 1} (sites sampled at rate q, below), a site's
update Delta_k (its decoded update when `fed.compress` is on), clip norm C =
`fed.dp.clip_norm`, noise multiplier z = `fed.dp.noise_multiplier`:

  clip:   Delta_k' = Delta_k min(1, C / ||Delta_k||_2)     (norm over every leaf the site sends)
  sum:    Sigma = sum_k m_k Delta_k'                         (psum over the `site` axis)
  noise:  Sigma' = Sigma + N(0, (z C)^2 I)
  scale:  Delta = Sigma' / (q S_g)

S_g is the number of sites that hold the leaf's group (S for the shared trunk; a task's head is
averaged over the sites that hold that task), so q S_g is the *expected* number of participants
that send the leaf: the paper's fixed-denominator estimator (f~_f of Algorithm 1, with
flat clipping) with every weight w_k = 1. The paper allows weights min(n_k / w^, 1); jmtl
uses uniform weights, so FedAvg's example counts n_k do not enter. A fixed denominator and a
per-site norm bound make one site's influence on Delta at most C / (q S_g): the sensitivity the
noise is sized for. Clipping applies to what the aggregate receives, after any compression, so
the bound holds whatever the codec; the server is trusted to add the noise (central DP, the
paper's model).

Privacy accounting: each round is a Poisson-subsampled Gaussian mechanism with noise
multiplier z and sampling rate q = m / S, m = max(1, round(`fed.participation` x S)) the sites
drawn per round (q = `fed.participation` when that times S is whole). After T rounds, epsilon
at delta = `fed.dp.delta` comes from dp-accounting's RDP accountant (Mironov 2017; Mironov et
al. 2019) and its privacy-loss-distribution accountant (PLD; Koskela et al. 2020, Doroshenko
et al. 2022), add-or-remove-one adjacency of sites. Caveat: jmtl draws exactly m sites without
replacement each round, which these accountants analyse as Poisson sampling with rate q (the
usual approximation; exact for q = 1). Every round counts, also one whose sites were all
dropped by the deadline (conservative). With 4 sites epsilon is large: client-level DP needs
many sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """`fed.dp.*`: clip norm C > 0, noise multiplier z >= 0, delta in (0, 1), sampling rate q."""

  clip_norm: float
  noise_multiplier: float
  delta: float
  sampling_rate: float


def from_config(fed: Any, sampling_rate: float) -> DPConfig | None:
  """The DPConfig of a `fed` config section with the rate at which sites are sampled (the job
  passes m / S, m = the sites it samples per round: `fed.participation` when that times S is
  whole); None when `fed.dp.clip_norm` is 0 (DP off)."""
  if not float(fed.dp.clip_norm) > 0:
    return None
  return DPConfig(float(fed.dp.clip_norm), float(fed.dp.noise_multiplier), float(fed.dp.delta),
                  float(sampling_rate))


def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over every leaf (float32)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip(tree: Any, clip_norm: float) -> tuple[Any, jax.Array]:
  """(tree x min(1, C / ||tree||), ||tree||): the global-norm clip of one site's update."""
  norm = global_norm(tree)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree), norm


def noise_and_scale(total: Any, key: jax.Array, dp: DPConfig, holders: Any) -> Any:
  """(Sigma + N(0, (z C)^2)) / (q S_g) per leaf: `total` the clipped sum, `holders` a tree of
  S_g (sites holding each leaf; float). Leaf i draws jax.random.normal(fold_in(key, i))."""
  leaves, treedef = jax.tree.flatten(total)
  counts = jax.tree.leaves(holders)
  std = dp.noise_multiplier * dp.clip_norm
  out = []
  for i, (x, s) in enumerate(zip(leaves, counts)):
    n = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    den = dp.sampling_rate * s
    y = jnp.where(den > 0, (x.astype(jnp.float32) + std * n) / jnp.maximum(den, 1e-30), 0.0)
    out.append(y.astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


@contextlib.contextmanager
def _quiet_absl():
  """dp-accounting logs a warning per fractional RDP order it cannot evaluate (it then skips
  that order); those lines are noise to a user."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float
            ) -> tuple[float, float]:
  """(epsilon RDP, epsilon PLD) at `delta` after `rounds` Poisson-subsampled Gaussian rounds
  (dp-accounting, default settings); (inf, inf) when noise_multiplier is 0; (0, 0) at 0 rounds."""
  if rounds <= 0:
    return 0.0, 0.0
  if not noise_multiplier > 0:
    return math.inf, math.inf
  from dp_accounting import dp_event  # noqa: PLC0415  (the `fed` extra; imported when DP is on)
  from dp_accounting.pld import pld_privacy_accountant  # noqa: PLC0415
  from dp_accounting.rdp import rdp_privacy_accountant  # noqa: PLC0415
  event = dp_event.PoissonSampledDpEvent(
      float(sampling_rate), dp_event.GaussianDpEvent(float(noise_multiplier)))
  with _quiet_absl():
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, int(rounds))
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, int(rounds))
    return float(rdp.get_epsilon(float(delta))), float(pld.get_epsilon(float(delta)))
