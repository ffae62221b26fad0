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
    (with `secure`: each site sends encode(w_k h_kg / sum_j w_j h_jg clip(Delta_k)) + pairwise
     masks as uint32 and the sum over sites is decoded: `jmtl.federated.secagg`)
  robust aggregators (median, trimmed_mean, krum; `jmtl.federated.robust`): each site returns
    its Delta_k, stacked [S, ...] along `site`, and the rule runs in the global view of the
    same jit (XLA inserts the gathers); masks, not shapes, keep non-participants out
  faults (`jmtl.federated.faults`): the delta a site sends is corrupted by its mode (none,
    sign_flip, scale, noise) before aggregation, from a per-site input (one compilation)
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
Asynchronous (FedBuff) server steps are the same program with `ClientState.start_params`: site
k starts from its own start_k (the model it downloaded last) instead of x, Delta_k = start_k -
x_k is scaled by scale_k = 1/sqrt(1 + tau_k), and the sites with m_k = 1 restart from the new
x; the event queue that picks them is `jmtl.federated.asynchronous`.

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
from jmtl.federated import faults as faults_lib
from jmtl.federated import robust
from jmtl.federated import secagg
from jmtl.federated import compression
from jmtl.federated import privacy
from jmtl.parallel import distributed
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
  """Each site's client optimizer state, leaves stacked [S, ...] along `site`; with
  `start_params` (asynchronous rounds, `jmtl.federated.asynchronous`) also each site's start
  parameters [S, ...]: the server model it downloaded last, which its local steps start from
  (None = every site starts from the server parameters, synchronous rounds); `residual`: each
  site's compression residual (float32 like the parameters; None without error feedback)."""

  opt_state: Any
  start_params: Any = None
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
         param_shardings: Any = None, site_starts: bool = False, error_feedback: bool = False
         ) -> tuple[ServerState, ClientState]:
  """Round-0 states: `server_tx.init(params)`; every site's `client_tx.init(params)` stacked;
  with `site_starts` also `start_params` = params stacked [S, ...] (asynchronous rounds); with
  `error_feedback`, every site's residual zeros (float32, stacked like the parameters)."""
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
  starts = None
  if site_starts:
    starts = jax.jit(lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), p),
                     out_shardings=jax.tree.map(stacked, param_shardings))(params)
  residual = None
  if error_feedback:
    residual = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, jnp.float32), p),
        out_shardings=jax.tree.map(stacked, param_shardings))(params)
  return jax.device_put(server, state_shardings(server, param_shardings, server_sh, mesh)), \
      ClientState(clients, starts, residual)


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


def site_batch_sharding(mesh: Mesh, leaf: Any,
                        batch_axes: tuple[str, ...] = ("data", "fsdp")) -> NamedSharding:
  """The sharding of a per-site batch leaf [S, H, B, ...]: P(site, None, batch axes) when those
  axes divide B, else P(site)."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  size = math.prod(mesh.shape[a] for a in axes)
  if axes and np.ndim(leaf) >= 3 and np.shape(leaf)[2] % size == 0:
    return NamedSharding(mesh, P(SITE, None, axes))
  return NamedSharding(mesh, P(SITE))


def make_round(loss_fn: LossFn, client_tx: optax.GradientTransformation,
               server_tx: optax.GradientTransformation, mesh: Mesh, *, local_steps: int,
               groups: Any = None, aggregator: str = "fedavg", temperature: float = 1.0,
               reset_client_state: bool = False, batch_axes: tuple[str, ...] = ("data", "fsdp"),
               seed: int = 0, prox_mu: float = 0.0, trim: float = 0.1, byzantine_f: int = 0,
               krum_m: int = 0, byzantine: bool = False, byzantine_scale: float = 10.0,
               backend: str = "shard_map", secure: secagg.FixedPoint | None = None,
               codec: compression.Codec | None = None, dp: privacy.DPConfig | None = None
               ) -> Callable[..., tuple[ServerState, ClientState, dict]]:
  """Returns `round_fn(server, clients, site_batches, examples, mask, holds=None, modes=None, *,
  scale=None, **extra)`.

  `loss_fn(params, batch, key) -> scalar` is one site's loss on one local batch (`key`: the
  dropout key of site k, local step t, round r: fold_in(fold_in(fold_in(key(seed), r), k), t)).
  `prox_mu`: FedProx's mu (0 = off); `site_loss` and `site_train_loss` are loss_fn without it.
  `groups`: a tree like the parameters of ints (0 = shared; g >= 1 = group g), None = all 0.
  `examples` [S] (n_k >= 0), `mask` [S] (0/1), `holds` [S, G] (0/1; column 0 is forced to 1;
  None = ones [S, 1]), `modes` [S] int (index into `faults.MODES`: the corruption of the
  delta each site sends; None = all honest; only with `byzantine=True`, which compiles the
  corruption into the round (off: no cost, and `modes` must be all 0)). `aggregator`: fedavg,
  dynamic, gradient (`aggregation`) or median, trimmed_mean (beta = `trim`), krum (f =
  `byzantine_f`, m = `krum_m`, 0 = n - f) (`robust`); `byzantine_scale`: the factor of mode
  `scale`. `extra` goes to `server_tx.update` (the metric-driven optimizers' `val_metric`,
  `val_count`). Returns (server, clients, metrics): `loss` (sum_k m_k n_k L_k /
  sum_k m_k n_k), `site_loss` [S] (the L_k), `site_train_loss` [S] (mean loss over the local
  steps), `weights` [S] (the aggregation weights), `delta_norm` (||Delta||_2), `applied`.
  `backend`: how the per-site function is mapped over `site` (`map_sites`): "shard_map"
  (`jax.shard_map`; a site may be a sub-mesh) or "pmap" (`jax.pmap` with the same named
  collectives, one device per site). Both run the same `client` code inside one jit.
  `scale` [S] (float, None = ones) multiplies each site's delta before aggregation: FedBuff's
  staleness factor 1/sqrt(1 + tau_k) (`jmtl.federated.asynchronous`); `weights` then reports
  w_k x scale_k. When `clients.start_params` is set (asynchronous rounds), site k starts from
  its own start_params[k] instead of the server parameters, its Delta_k = start_k - x_k, and each
  site with m_k = 1 gets the new server parameters as its next start (one program either way).
  `round_fn.trace_count()` counts compilations (one per shape). ValueError for a mesh without
  an outermost `site` axis, an unknown backend, "pmap" on a mesh whose sites span several
  devices, inputs whose leading dims are not [S, H], or bad weights/masks.

  `secure` (a `secagg.FixedPoint`, None = off): every weighted sum over sites becomes a secure
  sum (`secagg.secure_grouped_mean`): each site clips its delta, scales it by its public weight,
  encodes and masks it, and the aggregation receives only uint32 payloads; the round's pair
  seeds come from (seed, server.round) on the host (`secagg.pair_seeds`), masks pair only the
  participants holding a leaf's group. Adds `metrics["secagg_clipped"]` (values changed by
  clipping, over participants).

  `codec`: compression of each site's update (None or a disabled Codec = float32 as is; with
  top-k, `clients` must come from `init(..., error_feedback=True)`). `dp`: DP-FedAvg (weights
  become m_k / (q S), the aggregator must be fedavg); ValueError for dp with another aggregator,
  or dp / codec together with `secure`.
  """
  n_sites = site_count(mesh)
  local_steps = int(local_steps)
  if local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}")
  check_backend(backend, mesh)
  stacked_path = aggregator in robust.RULES
  if aggregator not in ("fedavg", "dynamic", "gradient") + robust.RULES:
    raise ValueError(f"aggregator must be fedavg, dynamic, gradient, {', '.join(robust.RULES)}, "
                     f"got {aggregator!r}")
  if secure is not None:
    if stacked_path:
      raise ValueError(f"aggregator {aggregator!r} needs every site's delta; secure aggregation "
                       f"reveals only their sum")
    secure.check_sites(n_sites)
  server_tx = optax.with_extra_args_support(server_tx)
  if codec is not None and not codec.enabled:
    codec = None
  if dp is not None and aggregator != "fedavg":
    raise ValueError(f"DP-FedAvg uses uniform weights; aggregator must be fedavg, got "
                     f"{aggregator!r}")
  if secure is not None and (dp is not None or codec is not None):
    raise ValueError("secure aggregation sums fixed-point payloads of its own; it is not "
                     "combined with DP-FedAvg or compression")
  prox_mu = float(prox_mu)
  if prox_mu < 0:
    raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")

  site_update = make_site_update(loss_fn, client_tx, local_steps=local_steps, prox_mu=prox_mu,
                                 reset_client_state=reset_client_state)
  base_key = jax.random.key(int(seed))
  traces = [0]

  def client(params, opt, residual, batches, examples, mask, holds, prev_loss, last_round, rnd,
             modes, scale, seeds, coef, *own):
    """One site (inside shard_map or pmap): H local steps, then its weighted delta summed over
    sites (psum, or a secure sum with `secure`; robust aggregators: its own delta, [1, ...],
    stacked along `site` by out_specs). `own`: () or (this site's start parameters,) for
    asynchronous rounds."""
    site = jax.lax.axis_index(SITE)
    batches = jax.tree.map(lambda b: b[0], batches)
    opt0 = jax.tree.map(lambda c: c[0], opt)
    if own:
      start = jax.tree.map(lambda x: x[0], own[0])
    else:
      start = jax.lax.pcast(params, SITE, to="varying")
    key = site_key(base_key, rnd, site)
    delta, opt0, opt1, losses = site_update(start, opt0, batches, key)
    m, n = mask[0], examples[0]
    stale = (rnd - last_round[0] - 1).astype(jnp.float32)
    delta = jax.tree.map(lambda d: d * scale[0], delta)
    if byzantine:
      delta = faults_lib.corrupt(delta, modes[0], byzantine_scale,
                                 faults_lib.noise_key(base_key, rnd, site))
    sent = jax.tree.map(lambda g: holds[0][g], groups_tree)  # 0/1: does this site send the leaf
    res1 = None
    if codec is not None:  # per-site hook: the update as the aggregate decodes it
      res0 = None if residual is None else jax.tree.map(lambda e: e[0], residual)
      delta, res1 = compression.apply(codec, delta, res0, jax.random.fold_in(key, _CODEC_KEY),
                                      sent, m)
      res1 = None if res1 is None else jax.tree.map(lambda e: e[None], res1)
    clipped = jnp.float32(0.0)

    def mean_over_sites(weight, stream):
      nonlocal clipped
      if secure is None:
        return aggregation.grouped_mean(delta, groups_tree, weight, holds[0], axis_name=SITE)
      out, clipped = secagg.secure_grouped_mean(  # one PRG stream per secure sum of the round
          delta, groups_tree, weight, holds[0], seeds[0], coef[0], secure,
          jax.random.fold_in(key, _SECAGG_TAG + stream), SITE, stream)
      return out

    if dp is not None:  # DP-FedAvg: clipped sum here, noise and scale on the server
      w = m / (dp.sampling_rate * n_sites)
      bounded, _ = privacy.clip(jax.tree.map(lambda d, s: d * s, delta, sent), dp.clip_norm)
      agg = jax.tree.map(lambda d: jax.lax.psum(m * d, SITE), bounded)
    elif stacked_path:
      agg, w = jax.tree.map(lambda d: d[None], delta), jnp.zeros([], jnp.float32)
    elif aggregator == "dynamic":
      w = aggregation.dynamic_weights(losses[0], prev_loss[0], n, jnp.maximum(stale, 0.0), m,
                                      temperature, axis_name=SITE)
    elif aggregator == "gradient":
      f = aggregation.fedavg_weights(n, m, axis_name=SITE)
      mean = mean_over_sites(f, 1)
      cos = aggregation.trunk_cosine(delta, groups_tree, mean)
      w = aggregation.alignment_weights(cos, n, m, temperature, axis_name=SITE)
    else:
      w = aggregation.fedavg_weights(n, m, axis_name=SITE)
    if dp is None and not stacked_path:
      agg = mean_over_sites(w, 0)
      agg = jax.tree.map(lambda a, p: a.astype(p.dtype), agg, params)
    keep = m > 0
    opt1 = jax.tree.map(lambda new, old: jnp.where(keep, new, old), opt1, opt0)
    return (agg, jax.tree.map(lambda c: c[None], opt1), res1, losses[:1],
            jnp.mean(losses)[None], (w * scale[0])[None], clipped[None])

  groups_tree = None  # set per parameter structure in round_body

  def robust_delta(stack, mask, holds, params):
    """The stacked path: `robust.aggregate` over the [S, ...] deltas, in the global view."""
    agg, w = robust.aggregate(stack, groups_tree, mask, holds, aggregator, trim=trim,
                              byzantine_f=byzantine_f, krum_m=krum_m)
    return jax.tree.map(lambda a, p: a.astype(p.dtype), agg, params), w

  def round_body(server, clients, site_batches, examples, mask, holds, modes, scale, seeds, coef,
                 extra):
    nonlocal groups_tree
    traces[0] += 1  # Python side effect: once per trace (= per compilation)
    groups_tree = (jax.tree.map(lambda _: 0, server.params) if groups is None else groups)
    own = () if clients.start_params is None else (clients.start_params,)
    per_site = map_sites(
        client, mesh, backend,
        in_sites=(False, True, True, True, True, True, True, True, True, False, True, True, True,
                  True) + (True,) * len(own),
        out_sites=(stacked_path, True, True, True, True, True, True))
    delta, opt, residual, site_loss, train_loss, w, clipped = per_site(
        server.params, clients.opt_state, clients.residual, site_batches, examples, mask, holds,
        server.prev_loss, server.last_round, server.round, modes, scale, seeds, coef, *own)
    if stacked_path:
      delta, w = robust_delta(delta, mask, holds, server.params)
      w = w * scale
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
    if secure is not None:
      metrics["secagg_clipped"] = jnp.sum(clipped)
    starts = clients.start_params
    if starts is not None:  # the sites that delivered restart from the newest server model
      restart = took & applied
      starts = jax.tree.map(
          lambda old, new: jnp.where(restart.reshape((-1,) + (1,) * new.ndim), new[None], old),
          starts, new_server.params)
    return new_server, ClientState(opt, starts, residual), metrics

  compiled = {}
  rep = NamedSharding(mesh, P())
  site_sh = NamedSharding(mesh, P(SITE))

  def round_fn(server: ServerState, clients: ClientState, site_batches: Any, examples: Any,
               mask: Any, holds: Any = None, modes: Any = None, *, scale: Any = None,
               **extra: Any):
    _check_inputs(site_batches, examples, mask, n_sites, local_steps)
    scale = np.ones(n_sites, np.float32) if scale is None else np.asarray(scale, np.float32)
    if scale.shape != (n_sites,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
      raise ValueError(f"scale must be {n_sites} finite values >= 0, got {scale.tolist()}")
    if holds is None:
      holds = np.ones((n_sites, 1), np.float32)
    holds = np.array(holds, np.float32)
    if holds.ndim != 2 or holds.shape[0] != n_sites:
      raise ValueError(f"holds has shape {holds.shape}; expected ({n_sites}, groups)")
    holds[:, 0] = 1.0
    modes = np.zeros(n_sites, np.int32) if modes is None else np.asarray(modes, np.int32)
    if modes.shape != (n_sites,) or np.any((modes < 0) | (modes >= len(faults_lib.MODES))):
      raise ValueError(f"modes must be {n_sites} ints in [0, {len(faults_lib.MODES)}) (one per "
                       f"site, {faults_lib.MODES}), got {modes.tolist()}")
    if not byzantine and modes.any():
      raise ValueError(f"modes {modes.tolist()} corrupt sites, but the round was made without "
                       f"byzantine=True")
    seeds, coef = _secagg_inputs(secure, seed, server, mask, holds, n_sites)
    batch_sh = jax.tree.map(lambda b: site_batch_sharding(mesh, b, batch_axes), site_batches)
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
      if secure is not None:
        metric_sh["secagg_clipped"] = rep
      # Every process reaches each new executable's first run together
      # (`distributed.first_run_sync`: a late one would fail the others' first collective).
      compiled[key] = distributed.first_run_sync(jax.jit(
          round_body,
          in_shardings=(server_sh, client_sh, batch_sh, site_sh, site_sh, site_sh, site_sh,
                        site_sh, site_sh, site_sh, extra_sh),
          out_shardings=(server_sh, client_sh, metric_sh), donate_argnums=(0, 1)), "fed_round")
    args = jax.device_put(
        (site_batches, jnp.asarray(examples, jnp.float32), jnp.asarray(mask, jnp.float32),
         jnp.asarray(holds), jnp.asarray(modes), jnp.asarray(scale), seeds, coef, extra),
        (batch_sh, site_sh, site_sh, site_sh, site_sh, site_sh, site_sh, site_sh, extra_sh))
    return compiled[key](server, clients, *args)

  round_fn.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
  return round_fn


def site_key(base_key: jax.Array, round_index: Any, site: Any) -> jax.Array:
  """Site k's key of round r: fold_in(fold_in(base_key, r), k) (base_key = key(seed)); its local
  step t draws dropout from fold_in(that, t), its compression from fold_in(that, _CODEC_KEY)."""
  return jax.random.fold_in(jax.random.fold_in(base_key, round_index), site)


def make_site_update(loss_fn: LossFn, client_tx: optax.GradientTransformation, *,
                     local_steps: int, prox_mu: float = 0.0, reset_client_state: bool = False
                     ) -> Callable[..., tuple[Any, Any, Any, jax.Array]]:
  """One site's local work of a round, shared by the mesh round (`make_round`, inside
  shard_map / pmap) and the real-process round (`jmtl.federated.flower`, jitted on a site's own
  devices): `site_update(start, opt, batches, key) -> (delta, opt_in, opt_out, losses)`.

  H = `local_steps` steps of `client_tx` from `start` (x_k <- start; for t < H: g = grad
  [loss_fn(x_k, batches[t], fold_in(key, t)) + prox_mu/2 ||x_k - start||^2]; u, c <-
  client_tx.update(g, c, x_k); x_k <- x_k + u; FedProx: Li et al. 2020, arXiv 1812.06127,
  eq. 2). `batches`: every leaf [H, ...]; `opt`: this site's client state (re-initialised from
  `start` first with `reset_client_state`; `opt_in` returns the state the steps began from).
  `delta` = start - x_H (float32 leaves, the pseudo-gradient of FedOpt / DiLoCo's outer
  gradient), `losses` [H] float32: loss_fn (without the proximal term) at each step.
  """
  local_steps = int(local_steps)
  prox_mu = float(prox_mu)

  def objective(x, batch, key, anchor):
    loss = loss_fn(x, batch, key)
    if not prox_mu:
      return loss, loss
    sq = sum(jnp.sum(jnp.square((a - b).astype(jnp.float32)))
             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(anchor)))
    return loss + 0.5 * prox_mu * sq, loss

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def site_update(start, opt, batches, key):
    if reset_client_state:
      opt = jax.tree.map(lambda a, b: jnp.zeros_like(a) + b, opt, client_tx.init(start))

    def local_step(carry, xs):
      x, c = carry
      batch, t = xs
      (_, loss), g = grad_fn(x, batch, jax.random.fold_in(key, t), start)
      u, c = client_tx.update(g, c, x)
      return (optax.apply_updates(x, u), c), loss

    (local, opt1), losses = jax.lax.scan(local_step, (start, opt),
                                         (batches, jnp.arange(local_steps)))
    delta = jax.tree.map(lambda p, q: (p - q).astype(jnp.float32), start, local)
    return delta, opt, opt1, losses

  return site_update


BACKENDS = ("shard_map", "pmap")


def check_backend(backend: str, mesh: Mesh) -> None:
  """ValueError unless `backend` is one of BACKENDS and, for "pmap", every site is one device."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "pmap" and mesh.devices.size != site_count(mesh):
    raise ValueError(
        f"backend 'pmap' maps one device per site, but the mesh has {mesh.devices.size} devices "
        f"for {site_count(mesh)} sites (use 'shard_map' for sites that span several devices)")


def map_sites(fn: Callable, mesh: Mesh, backend: str, *, in_sites: tuple[bool, ...],
              out_sites: tuple[bool, ...]) -> Callable:
  """`fn` (one site's work, written for `jax.shard_map`) mapped over the `site` axis.

  `fn` sees each per-site argument (`in_sites[i]` True) as its block [1, ...] and every other
  argument whole, may use collectives over the axis name "site" (psum, axis_index), and returns
  per-site outputs (`out_sites[j]` True) as blocks [1, ...] and the others identical on every
  site. "shard_map": `jax.shard_map` with in/out specs P(site) / P() (the site's other mesh axes
  stay automatic, so a site may be a sub-mesh). "pmap": `jax.pmap(axis_name="site")` over the
  mesh's devices in `site` order (one device per site, `check_backend`), the [1, ...] blocks
  added and removed around `fn`: the same program as jmtl's design's pmap-based FedAvg loop.
  """
  if backend == "shard_map":
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(P(SITE) if s else P() for s in in_sites),
                         out_specs=tuple(P(SITE) if s else P() for s in out_sites),
                         axis_names={SITE})
  check_backend(backend, mesh)

  def one_site(*args):
    args = [jax.tree.map(lambda a: a[None], a) if s else a for a, s in zip(args, in_sites)]
    outs = fn(*args)
    return tuple(jax.tree.map(lambda o: o[0], o) if s else o for o, s in zip(outs, out_sites))

  return jax.pmap(one_site, axis_name=SITE, in_axes=tuple(0 if s else None for s in in_sites),
                  out_axes=tuple(0 if s else None for s in out_sites),
                  devices=list(mesh.devices.reshape(-1)))


_SECAGG_TAG = 0x7FFFFF00  # folded into a site's round key for its stochastic rounding (> H)


def _secagg_inputs(secure, seed, server, mask, holds, n_sites):
  """(pair seeds uint32 [S, S, 4], coefficients int32 [S, S, G]) of this round; zeros
  ([S, S, 4] and [S, S, 1]) when secure aggregation is off."""
  if secure is None:
    return np.zeros((n_sites, n_sites, 4), np.uint32), np.zeros((n_sites, n_sites, 1), np.int32)
  rnd = int(np.asarray(server.round.addressable_data(0)))  # replicated (also across processes)
  return (secagg.pair_seeds(seed, rnd, n_sites),
          secagg.pair_coefficients(np.asarray(mask, np.float32), holds))


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
