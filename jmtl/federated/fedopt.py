"""FedOpt (Reddi et al. 2021, arXiv 2003.00295): client SGD, any Optax server optimizer.

One round from server parameters `x` with sites k = 1..S (weights `w_k >= 0`, e.g. example counts):

  client k:  x_k <- x;  for t < local_steps:  x_k <- x_k - client_lr * grad loss_fn(x_k, b_k,t)
  server:    Delta = sum_k w_k (x - x_k) / sum_k w_k          (psum over the `site` mesh axis)
             updates, s = server_tx.update(Delta, s, x, **extra);  x <- x + updates

With `server_tx = optax.sgd(1.0)` this is FedAvg (x <- weighted mean of the x_k). Extra args
(`val_metric`, `val_count`, ...) go to the server optimizer unchanged, so the metric-driven
`paper_adaptive` / `jmtl_adaptive` of `jmtl.optim.build` work as server optimizers.

Layout: every leaf of `site_batches` is `[S, local_steps, B, ...]`, sharded over `site` (and, on
a mesh with more axes, its batch dim `B` over the other axes when they divide it). Parameters
and server state are replicated. The client function runs under `jax.shard_map` manual over
`site` only, so each site may be a sub-mesh whose other axes stay under the compiler's control.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SITE = "site"

LossFn = Callable[[Any, Any], jax.Array]


class FedOptState(NamedTuple):
  """Server parameters, server optimizer state, number of rounds done."""

  params: Any
  opt_state: Any
  round: jax.Array


def init(params: Any, server_tx: optax.GradientTransformation) -> FedOptState:
  """Server state at round 0: `server_tx.init(params)`."""
  return FedOptState(params, server_tx.init(params), jnp.zeros([], jnp.int32))


def _site_count(mesh: Mesh) -> int:
  if SITE not in mesh.axis_names:
    raise ValueError(f"the mesh needs a {SITE!r} axis; its axes are {mesh.axis_names}")
  if mesh.axis_names[0] != SITE:
    raise ValueError(f"{SITE!r} must be the outermost mesh axis; the axes are {mesh.axis_names}")
  return mesh.shape[SITE]


def _batch_sharding(mesh: Mesh, leaf: Any) -> NamedSharding:
  """P(site, None, <other axes>) when the other mesh axes divide dim 2, else P(site)."""
  inner = tuple(a for a in mesh.axis_names if a != SITE)
  size = math.prod(mesh.shape[a] for a in inner)
  if inner and size > 1 and np.ndim(leaf) >= 3 and np.shape(leaf)[2] % size == 0:
    return NamedSharding(mesh, P(SITE, None, inner))
  return NamedSharding(mesh, P(SITE))


def _check_inputs(site_batches: Any, site_weights: Any, n_sites: int, local_steps: int):
  if not jax.tree.leaves(site_batches):
    raise ValueError("site_batches is empty")
  for path, leaf in jax.tree_util.tree_leaves_with_path(site_batches):
    shape = np.shape(leaf)
    if len(shape) < 2 or shape[0] != n_sites or shape[1] != local_steps:
      raise ValueError(
          f"site_batches{jax.tree_util.keystr(path)} has shape {shape}; expected "
          f"[sites={n_sites} (the mesh's {SITE!r} axis), local_steps={local_steps}, ...]")
  w = np.asarray(site_weights)
  if w.shape != (n_sites,):
    raise ValueError(f"site_weights has shape {w.shape}; expected ({n_sites},), one per site")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"site_weights must be finite and >= 0, got {w.tolist()}")
  if not np.any(w > 0):
    raise ValueError(f"site_weights are all zero ({w.tolist()}); at least one site must count")


def make_round(
    loss_fn: LossFn,
    server_tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    local_steps: int,
    client_lr: float,
) -> Callable[..., tuple[FedOptState, dict[str, jax.Array]]]:
  """Returns `round_fn(state, site_batches, site_weights, **extra) -> (state, metrics)`.

  `loss_fn(params, batch) -> scalar` is one client's loss on one local batch. `round_fn` is
  the module docstring's round, jitted with explicit shardings (the input state is donated).
  Metrics: `loss` (sum_k w_k L_k / sum_k w_k, with L_k = site k's loss at the round's server
  parameters on its first local batch), `site_loss` [S] (the L_k), `delta_norm` (||Delta||_2).
  Raises ValueError for a mesh without an outermost `site` axis, a site count or step count
  that does not match, or weights that are negative, non-finite or all zero.
  """
  n_sites = _site_count(mesh)
  local_steps = int(local_steps)
  if local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}")
  client_lr = float(client_lr)
  if not client_lr > 0:
    raise ValueError(f"client_lr must be > 0, got {client_lr}")
  tx = optax.with_extra_args_support(server_tx)
  grad_fn = jax.value_and_grad(loss_fn)

  def client(params, batches, weight):
    """One site (inside shard_map): local SGD, then its weighted delta, summed over sites."""
    batches = jax.tree.map(lambda b: b[0], batches)  # drop the per-site leading dim of 1

    def sgd_step(x, batch):
      loss, g = grad_fn(x, batch)
      x = jax.tree.map(lambda p, gi: (p - client_lr * gi).astype(p.dtype), x, g)
      return x, loss

    start = jax.lax.pcast(params, SITE, to="varying")
    local, losses = jax.lax.scan(sgd_step, start, batches)
    w = weight[0].astype(jnp.float32)
    total = jax.lax.psum(w, SITE)
    delta = jax.tree.map(
        lambda p, q: (jax.lax.psum(w * (p - q).astype(jnp.float32), SITE) / total).astype(p.dtype),
        params, local)
    return delta, losses[:1]

  per_site = jax.shard_map(client, mesh=mesh, in_specs=(P(), P(SITE), P(SITE)),
                           out_specs=(P(), P(SITE)), axis_names={SITE})

  def round_body(state, site_batches, site_weights, extra):
    delta, site_loss = per_site(state.params, site_batches, site_weights)
    updates, opt_state = tx.update(delta, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    w = site_weights.astype(jnp.float32)
    metrics = {"loss": jnp.sum(w * site_loss) / jnp.sum(w), "site_loss": site_loss,
               "delta_norm": optax.tree.norm(delta)}
    return FedOptState(params, opt_state, state.round + 1), metrics

  replicated = NamedSharding(mesh, P())
  site_sharded = NamedSharding(mesh, P(SITE))
  compiled = {}

  def round_fn(state: FedOptState, site_batches: Any, site_weights: Any,
               **extra: Any) -> tuple[FedOptState, dict[str, jax.Array]]:
    _check_inputs(site_batches, site_weights, n_sites, local_steps)
    batch_sh = jax.tree.map(lambda b: _batch_sharding(mesh, b), site_batches)
    state_sh = jax.tree.map(lambda _: replicated, state)
    extra_sh = jax.tree.map(lambda _: replicated, extra)
    key = (jax.tree.structure(state), jax.tree.structure(site_batches),
           tuple(jax.tree.leaves(batch_sh)), jax.tree.structure(extra))
    if key not in compiled:
      compiled[key] = jax.jit(
          round_body,
          in_shardings=(state_sh, batch_sh, site_sharded, extra_sh),
          out_shardings=(state_sh, {"loss": replicated, "site_loss": site_sharded,
                                    "delta_norm": replicated}),
          donate_argnums=0)
    args = jax.device_put((state, site_batches, jnp.asarray(site_weights, jnp.float32), extra),
                          (state_sh, batch_sh, site_sharded, extra_sh))
    return compiled[key](*args)

  return round_fn
