"""A federated round as one jitted SPMD program over the `site` mesh axis (FedOpt / DiLoCo).

An algorithm is `init` + `round` (FedJAX's shape). One round from server parameters x, sites
k = 1..S with examples n_k, participation m_k in {0, 1} and held groups h_kg:

  client k (inside jax.shard_map over `site`; the site's other mesh axes stay automatic):
    x_k <- x;  for t < H (lax.scan):  g = grad [loss_fn(x_k, b_k,t, key_k,t)
                                               + mu/2 ||x_k - x||^2]      (FedProx term)
                                      u, c_k <- client_tx.update(g, c_k, x_k);  x_k <- x_k + u
    Delta_k = x - x_k                                   (the pseudo-gradient, float32 sums)
  aggregate (collectives over `site`, `jmtl.federated.aggregation`):
    w = fedavg_weights(n, m), dynamic_weights(L, P, n, tau, m, T) or alignment_weights(
        cos(Delta_k, FedAvg mean over the trunk), n, m, T)
    Delta = grouped_mean(Delta_k, groups, w, h)        (trunk over all, heads over holders)
  server:  u, s <- server_tx.update(Delta, s, x, **extra);  x <- x + u

`client_tx` and `server_tx` come from `jmtl.optim.build`: client sgd + server sgd(1.0) is FedAvg
(McMahan et al. 2017; x <- sum_k w_k x_k), client AdamW whose state c_k each site keeps across
rounds + server Nesterov is DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1: inner
AdamW, outer Nesterov on the averaged pseudo-gradient), client sgd + server adam is FedAdam
(Reddi et al. 2021, arXiv 2003.00295); mu > 0 adds FedProx's proximal term (Li et al. 2020,
arXiv 1812.06127, eq. 2). A site with m_k = 0 runs the same program (shapes never
change, so a new participation pattern never recompiles) but its weight is 0 and its client
state is kept as it was. With `reset_client_state` c_k is re-initialised every round.
A round where no site takes part leaves the server unchanged (`metrics["applied"] = 0`).

Two hooks (the math lives in their modules): with `codec`, each site's Delta_k goes through
`jmtl.federated.compression.apply` right after it is computed (the aggregate uses the decoded
values; a top-k codec keeps each site's error-feedback residual e_k in ClientState.residual);
with `dp`, DP-FedAvg replaces the weighted mean: each site's (decoded) update is clipped to
norm C and summed, and the server adds Gaussian noise and divides by the expected participant
count (`jmtl.federated.privacy`).

L_k (`site_loss`) is site k's loss on its first local batch at the server parameters x (before
any local step): the loss of the model being trained, on that site's data.
Layout: every leaf of `site_batches` is [S, H, B, ...], sharded P(site, None, batch axes);
server state follows `param_shardings` (replicated over `site`); client state leaves are
[S, ...] sharded P(site, *their parameter's spec).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmtl.federated import aggregation
from jmtl.federated import compression
from jmtl.federated import privacy
from jmtl.parallel.mesh import SITE_AXIS

SITE = SITE_AXIS
LossFn = Callable[[Any, Any, jax.Array], jax.Array]


class ServerState(NamedTuple):
  """Server parameters and optimizer state, rounds done, and per-site memory ([S] float32 /
  int32, replicated): each site's loss when it last took part (0 = never) and that round (-1)."""

  params: Any
  opt_state: Any
  round: jax.Array
  prev_loss: jax.Array
  last_round: jax.Array


class ClientState(NamedTuple):
  """Each site's client optimizer state and its compression residual (float32 like the
  parameters; None without error feedback), leaves stacked [S, ...] along `site`."""

  opt_state: Any
  residual: Any = None


def site_count(mesh: Mesh) -> int:
  """Size of the outermost `site` axis; ValueError when the mesh has none or not outermost."""
  if SITE not in mesh.axis_names:
    raise ValueError(f"the mesh needs a {SITE!r} axis; its axes are {mesh.axis_names}")
  if mesh.axis_names[0] != SITE:
    raise ValueError(f"{SITE!r} must be the outermost mesh axis; the axes are {mesh.axis_names}")
  return mesh.shape[SITE]


def stacked(sharding: NamedSharding) -> NamedSharding:
  """The sharding of a per-site stack [S, ...] of a leaf sharded as `sharding`."""
  return NamedSharding(sharding.mesh, P(SITE, *sharding.spec))


def init(params: Any, server_tx: optax.GradientTransformation,
         client_tx: optax.GradientTransformation, mesh: Mesh, *,
         param_shardings: Any = None, error_feedback: bool = False
         ) -> tuple[ServerState, ClientState]:
  """Round-0 states: `server_tx.init(params)`; every site's `client_tx.init(params)` stacked;
  with `error_feedback`, every site's residual zeros (float32, stacked like the parameters)."""
  n = site_count(mesh)
  rep = NamedSharding(mesh, P())
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda _: rep, params)
  params = jax.device_put(params, param_shardings)
  server_sh = _opt_shardings(server_tx, params, param_shardings, rep)
  client_sh = jax.tree.map(stacked, _opt_shardings(client_tx, params, param_shardings, rep))
  server_opt = jax.jit(server_tx.init, out_shardings=server_sh)(params)
  clients = jax.jit(lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape),
                                           client_tx.init(p)), out_shardings=client_sh)(params)
  server = ServerState(params, server_opt, jnp.zeros([], jnp.int32),
                       jnp.zeros([n], jnp.float32), jnp.full([n], -1, jnp.int32))
  residual = None
  if error_feedback:
    residual = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, jnp.float32), p),
        out_shardings=jax.tree.map(stacked, param_shardings))(params)
  return jax.device_put(server, state_shardings(server, param_shardings, server_sh, mesh)), \
      ClientState(clients, residual)


def _opt_shardings(tx, params, param_shardings, rep):
  """Optimizer-state shardings: a leaf shaped like its parameter takes its sharding, else
  replicated (the rule of `jmtl.train.state.like_param`, reused)."""
  from jmtl.train.state import like_param  # noqa: PLC0415  (train/ is beside federated/)
  abstract = jax.eval_shape(tx.init, params)
  mesh = rep.mesh
  return optax.tree_map_params(
      tx, lambda s, p, sh: like_param(s.shape, p.shape, sh, mesh), abstract,
      jax.eval_shape(lambda p: p, params), param_shardings, transform_non_params=lambda s: rep)


def state_shardings(server: ServerState, param_shardings: Any, opt_shardings: Any,
                    mesh: Mesh) -> ServerState:
  rep = NamedSharding(mesh, P())
  return ServerState(param_shardings, opt_shardings, rep, rep, rep)


def _batch_sharding(mesh: Mesh, leaf: Any, batch_axes: tuple[str, ...]) -> NamedSharding:
  """P(site, None, batch axes) when those axes divide dim 2, else P(site)."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  size = math.prod(mesh.shape[a] for a in axes)
  if axes and np.ndim(leaf) >= 3 and np.shape(leaf)[2] % size == 0:
    return NamedSharding(mesh, P(SITE, None, axes))
  return NamedSharding(mesh, P(SITE))


def make_round(loss_fn: LossFn, client_tx: optax.GradientTransformation,
               server_tx: optax.GradientTransformation, mesh: Mesh, *, local_steps: int,
               groups: Any = None, aggregator: str = "fedavg", temperature: float = 1.0,
               reset_client_state: bool = False, batch_axes: tuple[str, ...] = ("data", "fsdp"),
               seed: int = 0, prox_mu: float = 0.0, codec: compression.Codec | None = None,
               dp: privacy.DPConfig | None = None
               ) -> Callable[..., tuple[ServerState, ClientState, dict]]:
  """Returns `round_fn(server, clients, site_batches, examples, mask, holds=None, **extra)`.

  `loss_fn(params, batch, key) -> scalar` is one site's loss on one local batch (`key`: the
  dropout key of site k, local step t, round r: fold_in(fold_in(fold_in(key(seed), r), k), t)).
  `prox_mu`: FedProx's mu (0 = off); `site_loss` and `site_train_loss` are loss_fn without it.
  `groups`: a tree like the parameters of ints (0 = shared; g >= 1 = group g), None = all 0.
  `examples` [S] (n_k >= 0), `mask` [S] (0/1), `holds` [S, G] (0/1; column 0 is forced to 1;
  None = ones [S, 1]). `extra` goes to `server_tx.update` (the metric-driven optimizers'
  `val_metric`, `val_count`). Returns (server, clients, metrics): `loss` (sum_k m_k n_k L_k /
  sum_k m_k n_k), `site_loss` [S] (the L_k), `site_train_loss` [S] (mean loss over the local
  steps), `weights` [S] (the aggregation weights), `delta_norm` (||Delta||_2), `applied`.
  `codec`: compression of each site's update (None or a disabled Codec = float32 as is; with
  top-k, `clients` must come from `init(..., error_feedback=True)`). `dp`: DP-FedAvg (weights
  become m_k / (q S), the aggregator must be fedavg). `round_fn.trace_count()` counts
  compilations (one per shape). ValueError for a mesh without an outermost `site` axis, inputs
  whose leading dims are not [S, H], bad weights/masks, or dp with another aggregator.
  """
  n_sites = site_count(mesh)
  local_steps = int(local_steps)
  if local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}")
  if aggregator not in ("fedavg", "dynamic", "gradient"):
    raise ValueError(f"aggregator must be fedavg, dynamic or gradient, got {aggregator!r}")
  server_tx = optax.with_extra_args_support(server_tx)
  if codec is not None and not codec.enabled:
    codec = None
  if dp is not None and aggregator != "fedavg":
    raise ValueError(f"DP-FedAvg uses uniform weights; aggregator must be fedavg, got "
                     f"{aggregator!r}")
  prox_mu = float(prox_mu)
  if prox_mu < 0:
    raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")

  def objective(x, batch, key, anchor):
    loss = loss_fn(x, batch, key)
    if not prox_mu:
      return loss, loss
    sq = sum(jnp.sum(jnp.square((a - b).astype(jnp.float32)))
             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(anchor)))
    return loss + 0.5 * prox_mu * sq, loss

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  base_key = jax.random.key(int(seed))
  traces = [0]

  def client(params, opt, residual, batches, examples, mask, holds, prev_loss, last_round, rnd):
    """One site (inside shard_map): H local steps, then its weighted delta psum'ed over sites."""
    site = jax.lax.axis_index(SITE)
    batches = jax.tree.map(lambda b: b[0], batches)
    opt0 = jax.tree.map(lambda c: c[0], opt)
    start = jax.lax.pcast(params, SITE, to="varying")
    if reset_client_state:
      opt0 = jax.tree.map(lambda a, b: jnp.zeros_like(a) + b, opt0, client_tx.init(start))
    key = jax.random.fold_in(jax.random.fold_in(base_key, rnd), site)

    def local_step(carry, xs):
      x, c = carry
      batch, t = xs
      (_, loss), g = grad_fn(x, batch, jax.random.fold_in(key, t), start)
      u, c = client_tx.update(g, c, x)
      return (optax.apply_updates(x, u), c), loss

    (local, opt1), losses = jax.lax.scan(local_step, (start, opt0),
                                         (batches, jnp.arange(local_steps)))
    m, n = mask[0], examples[0]
    stale = (rnd - last_round[0] - 1).astype(jnp.float32)
    delta = jax.tree.map(lambda p, q: (p - q).astype(jnp.float32), start, local)
    sent = jax.tree.map(lambda g: holds[0][g], groups_tree)  # 0/1: does this site send the leaf
    res1 = None
    if codec is not None:  # per-site hook: the update as the aggregate decodes it
      res0 = None if residual is None else jax.tree.map(lambda e: e[0], residual)
      delta, res1 = compression.apply(codec, delta, res0, jax.random.fold_in(key, _CODEC_KEY),
                                      sent, m)
      res1 = None if res1 is None else jax.tree.map(lambda e: e[None], res1)
    if dp is not None:  # DP-FedAvg: clipped sum here, noise and scale on the server
      w = m / (dp.sampling_rate * n_sites)
      clipped, _ = privacy.clip(jax.tree.map(lambda d, s: d * s, delta, sent), dp.clip_norm)
      agg = jax.tree.map(lambda d: jax.lax.psum(m * d, SITE), clipped)
    elif aggregator == "dynamic":
      w = aggregation.dynamic_weights(losses[0], prev_loss[0], n, jnp.maximum(stale, 0.0), m,
                                      temperature, axis_name=SITE)
    elif aggregator == "gradient":
      f = aggregation.fedavg_weights(n, m, axis_name=SITE)
      mean = aggregation.grouped_mean(delta, groups_tree, f, holds[0], axis_name=SITE)
      cos = aggregation.trunk_cosine(delta, groups_tree, mean)
      w = aggregation.alignment_weights(cos, n, m, temperature, axis_name=SITE)
    else:
      w = aggregation.fedavg_weights(n, m, axis_name=SITE)
    if dp is None:
      agg = aggregation.grouped_mean(delta, groups_tree, w, holds[0], axis_name=SITE)
      agg = jax.tree.map(lambda a, p: a.astype(p.dtype), agg, params)
    keep = m > 0
    opt1 = jax.tree.map(lambda new, old: jnp.where(keep, new, old), opt1, opt0)
    return (agg, jax.tree.map(lambda c: c[None], opt1), res1, losses[:1],
            jnp.mean(losses)[None], w[None])

  groups_tree = None  # set per parameter structure in round_body

  def round_body(server, clients, site_batches, examples, mask, holds, extra):
    nonlocal groups_tree
    traces[0] += 1  # Python side effect: once per trace (= per compilation)
    groups_tree = (jax.tree.map(lambda _: 0, server.params) if groups is None else groups)
    per_site = jax.shard_map(
        client, mesh=mesh,
        in_specs=(P(), P(SITE), P(SITE), P(SITE), P(SITE), P(SITE), P(SITE), P(SITE), P(SITE),
                  P()),
        out_specs=(P(), P(SITE), P(SITE), P(SITE), P(SITE), P(SITE)), axis_names={SITE})
    delta, opt, residual, site_loss, train_loss, w = per_site(
        server.params, clients.opt_state, clients.residual, site_batches, examples, mask, holds,
        server.prev_loss, server.last_round, server.round)
    if dp is not None:  # server-side hook: Gaussian noise on the clipped sum, expected count
      holders = jax.tree.map(lambda g: jnp.sum(holds[:, g]), groups_tree)
      noise_key = jax.random.fold_in(jax.random.fold_in(base_key, _NOISE_KEY), server.round)
      delta = privacy.noise_and_scale(delta, noise_key, dp, holders)
      delta = jax.tree.map(lambda a, p: a.astype(p.dtype), delta, server.params)
    applied = jnp.sum(mask) > 0
    updates, opt_state = server_tx.update(delta, server.opt_state, server.params, **extra)
    params = optax.apply_updates(server.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
    took = mask > 0
    fw = mask.astype(jnp.float32) * examples.astype(jnp.float32)
    new_server = ServerState(
        keep(params, server.params), keep(opt_state, server.opt_state), server.round + 1,
        jnp.where(took, site_loss, server.prev_loss),
        jnp.where(took, server.round, server.last_round))
    metrics = {"loss": jnp.sum(fw * site_loss) / jnp.maximum(jnp.sum(fw), 1e-30),
               "site_loss": site_loss, "site_train_loss": train_loss, "weights": w,
               "delta_norm": optax.tree.norm(delta), "applied": applied.astype(jnp.int32)}
    return new_server, ClientState(opt, residual), metrics

  compiled = {}
  rep = NamedSharding(mesh, P())
  site_sh = NamedSharding(mesh, P(SITE))

  def round_fn(server: ServerState, clients: ClientState, site_batches: Any, examples: Any,
               mask: Any, holds: Any = None, **extra: Any):
    _check_inputs(site_batches, examples, mask, n_sites, local_steps)
    if holds is None:
      holds = np.ones((n_sites, 1), np.float32)
    holds = np.array(holds, np.float32)
    if holds.ndim != 2 or holds.shape[0] != n_sites:
      raise ValueError(f"holds has shape {holds.shape}; expected ({n_sites}, groups)")
    holds[:, 0] = 1.0
    batch_sh = jax.tree.map(lambda b: _batch_sharding(mesh, b, batch_axes), site_batches)
    server_sh = jax.tree.map(lambda x: x.sharding, server)
    client_sh = jax.tree.map(lambda x: x.sharding, clients)
    extra = {k: jnp.asarray(v, jnp.int32 if k == "val_count" else jnp.float32)
             for k, v in extra.items()}
    extra_sh = jax.tree.map(lambda _: rep, extra)
    key = (jax.tree.structure(server), jax.tree.structure(site_batches),
           tuple(jax.tree.leaves(batch_sh)), holds.shape, tuple(sorted(extra)))
    if key not in compiled:
      metric_sh = {"loss": rep, "site_loss": site_sh, "site_train_loss": site_sh,
                   "weights": site_sh, "delta_norm": rep, "applied": rep}
      compiled[key] = jax.jit(
          round_body,
          in_shardings=(server_sh, client_sh, batch_sh, site_sh, site_sh, site_sh, extra_sh),
          out_shardings=(server_sh, client_sh, metric_sh), donate_argnums=(0, 1))
    args = jax.device_put(
        (site_batches, jnp.asarray(examples, jnp.float32), jnp.asarray(mask, jnp.float32),
         jnp.asarray(holds), extra), (batch_sh, site_sh, site_sh, site_sh, extra_sh))
    return compiled[key](server, clients, *args)

  round_fn.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
  return round_fn


_CODEC_KEY = 0x7FFFFFFE  # fold_in tags: never a local step index (t < H) or a round number
_NOISE_KEY = 0x7FFFFFFF


def _check_inputs(site_batches: Any, examples: Any, mask: Any, n_sites: int, local_steps: int):
  if not jax.tree.leaves(site_batches):
    raise ValueError("site_batches is empty")
  for path, leaf in jax.tree_util.tree_leaves_with_path(site_batches):
    shape = np.shape(leaf)
    if len(shape) < 2 or shape[0] != n_sites or shape[1] != local_steps:
      raise ValueError(
          f"site_batches{jax.tree_util.keystr(path)} has shape {shape}; expected "
          f"[sites={n_sites} (the mesh's {SITE!r} axis), local_steps={local_steps}, ...]")
  n, m = np.asarray(examples), np.asarray(mask)
  for name, v in (("examples", n), ("mask", m)):
    if v.shape != (n_sites,):
      raise ValueError(f"{name} has shape {v.shape}; expected ({n_sites},), one per site")
  if not np.all(np.isfinite(n)) or np.any(n < 0):
    raise ValueError(f"examples must be finite and >= 0, got {n.tolist()}")
  if not np.all((m == 0) | (m == 1)):
    raise ValueError(f"mask must hold 0 or 1 per site, got {m.tolist()}")
