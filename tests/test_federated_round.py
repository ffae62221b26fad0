"""Rounds of `jmtl.federated.algorithm` over the `site` mesh axis against numpy references
(FedAvg, server Adam, adaptive server optimizers, DiLoCo inner AdamW, participation, groups)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jmtl import federated as fed
from jmtl import optim
from jmtl.defaults import base_config

D, B = 5, 8  # features, rows per local batch


def _mesh(shape, names):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:n])


def _data(sites, steps, logistic=False, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(sites, steps, B, D))
  w_true = rng.normal(size=D)
  z = x @ w_true + 0.3 * rng.normal(size=(sites, steps, B))
  y = (z > 0).astype(np.float64) if logistic else z
  return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def _jax_loss(logistic):
  def loss(p, b, key=None):
    z = b["x"] @ p["w"] + p["b"]
    if logistic:
      return jnp.mean(jax.nn.softplus(z) - b["y"] * z)
    return 0.5 * jnp.mean(jnp.square(z - b["y"]))
  return loss


def _np_grad(p, x, y, logistic):
  """Gradient of the mean loss over the rows of one batch (float64)."""
  z = x @ p["w"] + p["b"]
  r = 1.0 / (1.0 + np.exp(-z)) - y if logistic else z - y
  return {"w": x.T @ r / len(y), "b": np.mean(r)}


def _np_delta(p, data, weights, lr, logistic=False):
  """Pseudo-gradient: weighted mean over sites of x - x_k after local SGD."""
  x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
  num = {k: 0.0 for k in p}
  for s in range(x.shape[0]):
    q = dict(p)
    for t in range(x.shape[1]):
      g = _np_grad(q, x[s, t], y[s, t], logistic)
      q = {k: q[k] - lr * g[k] for k in q}
    num = {k: num[k] + weights[s] * (p[k] - q[k]) for k in p}
  return {k: v / np.sum(weights) for k, v in num.items()}


class _Fed:
  """The old FedOpt call shape over the new round: client sgd(client_lr), mask = weights > 0."""

  def __init__(self, loss, tx, mesh, local_steps, client_lr):
    self.mesh, self.tx, self.ctx = mesh, tx, optax.sgd(client_lr)
    self.fn = fed.make_round(loss, self.ctx, tx, mesh, local_steps=local_steps)
    self.clients = None

  def init(self, params):
    server, self.clients = fed.init(params, self.tx, self.ctx, self.mesh)
    return server

  def __call__(self, state, data, weights, **extra):
    w = np.asarray(weights, np.float64)
    state, self.clients, metrics = self.fn(state, self.clients, data, w, (w > 0).astype(float),
                                           **extra)
    return state, metrics


def _zeros():
  return {"w": np.zeros(D), "b": np.zeros(())}


def _as_jax(p):
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _close(state, ref, tol=1e-5):
  for k in ref:
    np.testing.assert_allclose(np.asarray(state.params[k]), ref[k], atol=tol, rtol=tol)


def _fedavg_matches(mesh, sites, logistic, rounds, steps=3, lr=0.2):
  data = _data(sites, steps, logistic)
  weights = np.arange(sites, dtype=np.float64) % 3  # includes zero-weight sites
  tx = optax.sgd(1.0)
  round_fn = _Fed(_jax_loss(logistic), tx, mesh, steps, lr)
  state = round_fn.init(_as_jax(_zeros()))
  ref = _zeros()
  for r in range(rounds):
    # A plain optax server optimizer ignores the extra args.
    state, metrics = round_fn(state, data, weights, val_metric=0.0, val_count=r)
    delta = _np_delta(ref, data, weights, lr, logistic)
    ref = {k: ref[k] - delta[k] for k in ref}
    _close(state, ref)
  assert int(state.round) == rounds
  assert metrics["site_loss"].shape == (sites,)
  return state


def test_fedavg_equals_numpy_local_sgd_then_weighted_mean():
  state = _fedavg_matches(_mesh((4,), ("site",)), 4, logistic=False, rounds=3)
  assert float(jnp.abs(state.params["w"]).sum()) > 0.1  # it moved


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_registry_adam_server_equals_numpy_adam_on_pseudo_gradient(name):
  cfg = base_config().optim
  cfg.name, cfg.lr, cfg.grad_clip = name, 0.05, 0.0
  cfg.schedule = "constant" if name == "adam" else "linear"  # adamw: lr * (1 - t / T)
  cfg.weight_decay = 0.1 if name == "adamw" else 0.0
  rounds, steps, lr = 3, 2, 0.1
  tx = optim.build(cfg, total_steps=rounds)
  mesh = _mesh((4,), ("site",))
  data, weights = _data(4, steps, seed=1), np.array([3.0, 1.0, 2.0, 5.0])
  round_fn = _Fed(_jax_loss(False), tx, mesh, steps, lr)
  state = round_fn.init(_as_jax(_zeros()))
  ref, m, v = _zeros(), _zeros(), _zeros()
  b1, b2, eps = cfg.b1, cfg.b2, cfg.eps
  for t in range(rounds):
    state, _ = round_fn(state, data, weights, val_metric=1.0, val_count=t + 1)
    g = _np_delta(ref, data, weights, lr)
    lr_t = cfg.lr * (1.0 if name == "adam" else 1.0 - t / rounds)
    for k in ref:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      u = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
      ref[k] = ref[k] - lr_t * (u + cfg.weight_decay * ref[k])
    _close(state, ref)


@pytest.mark.parametrize("name", ["paper_adaptive", "jmtl_adaptive"])
def test_adaptive_server_optimizers_learn_and_react_to_the_metric(name):
  cfg = base_config().optim
  cfg.name, cfg.lr, cfg.schedule = name, 0.1, "constant"
  cfg.plateau_patience, cfg.plateau_factor = 2, 0.5
  rounds, steps = 6, 2
  tx = optim.build(cfg, total_steps=20)
  mesh = _mesh((4,), ("site",))
  data, weights = _data(4, steps, seed=2), np.array([1.0, 2.0, 3.0, 4.0])
  round_fn = _Fed(_jax_loss(False), tx, mesh, steps, 0.1)
  scale = lambda s: float(optim.find_metric_schedule_state(s.opt_state).plateau.scale)

  # An improving metric (minus the round's loss): the loss goes down, the scale stays 1.
  state, losses = round_fn.init(_as_jax(_zeros())), []
  for r in range(rounds):
    metric = -losses[-1] if losses else -1e3
    state, metrics = round_fn(state, data, weights, val_metric=metric, val_count=r + 1)
    losses.append(float(metrics["loss"]))
    assert scale(state) == 1.0
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0], losses

  # A worsening scripted metric: patience 2 halves the server lr scale every 2 bad rounds;
  # a repeated val_count is not a new validation.
  state, got = round_fn.init(_as_jax(_zeros())), []
  for count, metric in [(1, 0.9), (2, 0.8), (3, 0.7), (3, 0.1), (4, 0.6), (5, 0.5)]:
    state, _ = round_fn(state, data, weights, val_metric=metric, val_count=count)
    got.append(scale(state))
  assert got == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_jmtl_adaptive_server_shares_the_kernel_second_moment_per_output():
  """With block_nu (the default) on a tree with a dense kernel: the server state holds one
  second moment per output, and the rounds still fit the regression."""
  cfg = base_config().optim
  cfg.name, cfg.lr, cfg.schedule = "jmtl_adaptive", 0.1, "constant"
  assert cfg.block_nu
  tx = optim.build(cfg, total_steps=20)

  def loss(p, b, key=None):
    z = b["x"] @ p["dense"]["kernel"] + p["dense"]["bias"]  # (B, 2): both outputs fit y
    return 0.5 * jnp.mean(jnp.square(z - b["y"][..., None]))

  mesh = _mesh((4,), ("site",))
  data, weights = _data(4, 2, seed=2), np.array([1.0, 2.0, 3.0, 4.0])
  round_fn = _Fed(loss, tx, mesh, 2, 0.1)
  params = {"dense": {"kernel": jnp.zeros((D, 2)), "bias": jnp.zeros((2,))}}
  state, losses = round_fn.init(params), []
  for r in range(6):
    state, metrics = round_fn(state, data, weights, val_metric=-float(r), val_count=r + 1)
    losses.append(float(metrics["loss"]))
  nu_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state)
                     if hasattr(x, "shape") and x.ndim >= 1 and x.size <= 2 * D)
  assert (1, 2) in nu_shapes  # the kernel's second moment: one per output
  assert losses[-1] < 0.6 * losses[0], losses


def test_eight_sites_on_eight_devices():
  _fedavg_matches(_mesh((8,), ("site",)), 8, logistic=True, rounds=2)


def test_four_sites_on_a_site_by_data_mesh():
  state = _fedavg_matches(_mesh((4, 2), ("site", "data")), 4, logistic=True, rounds=2)
  assert state.params["w"].sharding.mesh.shape == {"site": 4, "data": 2}


def test_bad_inputs_raise_value_error():
  tx = optax.sgd(1.0)
  mesh = _mesh((8,), ("site",))
  loss = _jax_loss(False)
  round_fn = _Fed(loss, tx, mesh, 2, 0.1)
  state = round_fn.init(_as_jax(_zeros()))
  data = _data(8, 2)
  with pytest.raises(ValueError, match=">= 0"):
    round_fn(state, data, -np.ones(8))
  with pytest.raises(ValueError, match="sites=8"):
    round_fn(state, _data(4, 2), np.ones(8))
  with pytest.raises(ValueError, match="local_steps=2"):
    round_fn(state, _data(8, 3), np.ones(8))
  with pytest.raises(ValueError, match=r"expected \(8,\)"):
    round_fn(state, data, np.ones(4))
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="'site' axis"):
    fed.make_round(loss, sgd, tx, _mesh((8,), ("data",)), local_steps=2)
  with pytest.raises(ValueError, match="outermost"):
    fed.make_round(loss, sgd, tx, _mesh((2, 4), ("data", "site")), local_steps=2)
  with pytest.raises(ValueError, match="local_steps"):
    fed.make_round(loss, sgd, tx, mesh, local_steps=0)


def test_site_mesh_is_outermost_over_per_site_sub_meshes():
  from jmtl.parallel import mesh as mesh_lib
  cfg = base_config().mesh
  mesh = mesh_lib.make_site_mesh(cfg, 4, 2)
  assert mesh.axis_names == ("site", "data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"site": 4, "data": 2, "fsdp": 1, "tensor": 1}
  # site k owns devices 2k, 2k+1
  assert [d.id for d in mesh.devices[1].reshape(-1)] == [jax.devices()[2].id, jax.devices()[3].id]
  cfg.data, cfg.fsdp = 1, -1
  assert dict(mesh_lib.make_site_mesh(cfg, 2, 4).shape) == {"site": 2, "data": 1, "fsdp": 4,
                                                           "tensor": 1}
  with pytest.raises(ValueError, match="need 12 devices"):
    mesh_lib.make_site_mesh(cfg, 3, 4)
  # the plain 3-axis mesh is unchanged
  assert mesh_lib.make_mesh(base_config().mesh).axis_names == ("data", "fsdp", "tensor")


def test_pmap_and_shard_map_backends_give_the_same_parameters_after_three_rounds():
  """Issue requirement 5: one per-site function, two mappings (DiLoCo: inner AdamW state kept
  per site, outer Nesterov; a non-participant and a head held by two sites of four)."""
  mesh = _mesh((4,), ("site",))
  data = _data(4, 3, logistic=True)
  groups = {"w": 0, "b": 1}
  holds = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], np.float32)
  examples = np.array([3.0, 1.0, 2.0, 5.0])
  masks = [np.array([1, 1, 1, 1.0]), np.array([1, 0, 1, 1.0]), np.array([0, 1, 1, 0.0])]
  results = {}
  for backend in ("shard_map", "pmap"):
    ctx, stx = optax.adamw(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True)
    fn = fed.make_round(_jax_loss(True), ctx, stx, mesh, local_steps=3, groups=groups,
                        backend=backend)
    server, clients = fed.init(_as_jax(_zeros()), stx, ctx, mesh)
    for mask in masks:
      server, clients, _ = fn(server, clients, data, examples, mask, holds)
    results[backend] = (jax.device_get(server.params), jax.device_get(clients.opt_state))
  (p1, c1), (p2, c2) = results["shard_map"], results["pmap"]
  assert np.abs(p1["w"]).max() > 1e-2  # the rounds moved the parameters
  for a, b in zip(jax.tree.leaves((p1, c1)), jax.tree.leaves((p2, c2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_pmap_backend_needs_one_device_per_site():
  loss, sgd = _jax_loss(False), optax.sgd(0.1)
  with pytest.raises(ValueError, match="one device per site"):
    fed.make_round(loss, sgd, sgd, _mesh((4, 2), ("site", "data")), local_steps=2,
                   backend="pmap")
  with pytest.raises(ValueError, match="backend must be one of"):
    fed.make_round(loss, sgd, sgd, _mesh((4,), ("site",)), local_steps=2, backend="vmap")
