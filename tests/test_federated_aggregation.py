"""Aggregation rules and federated multi-task rounds against numpy references: FedAvg and dynamic
weights, per-group (trunk / task head) renormalised means, DiLoCo's per-site AdamW state kept
across rounds with a Nesterov server, participation without recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jmtl import federated as fed
from jmtl.federated import aggregation as agg

D, B, S = 4, 6, 4


def _mesh(shape, names):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:n])


# ------------------------------------------------------------------ weights, numpy references
def _np_dynamic(L, P, n, tau, m, T):
  """The documented rule written out in float64, site by site."""
  part = [k for k in range(len(L)) if m[k]]
  Lbar = sum(L[k] for k in part) / len(part)
  r = [((P[k] - L[k]) / P[k] if P[k] > 0 else 0.0) if m[k] else 0.0 for k in range(len(L))]
  rbar = sum(r[k] for k in part) / len(part)
  w = []
  for k in range(len(L)):
    if not m[k]:
      w.append(0.0)
      continue
    z = (L[k] / Lbar - 1) + (r[k] - rbar)
    w.append(n[k] * np.exp(z / T) / np.sqrt(1 + tau[k]))
  w = np.array(w)
  return w / w.sum()


def test_fedavg_weights_are_examples_of_participants():
  w = agg.fedavg_weights(jnp.array([10.0, 30.0, 60.0, 5.0]), jnp.array([1.0, 1.0, 0.0, 1.0]))
  np.testing.assert_allclose(w, [10 / 45, 30 / 45, 0, 5 / 45], rtol=1e-6)
  assert float(agg.fedavg_weights(jnp.ones(3), jnp.zeros(3)).sum()) == 0.0


def test_dynamic_weights_match_numpy_and_tend_to_fedavg_at_high_temperature():
  L = np.array([2.0, 1.0, 3.0, 1.5])
  P = np.array([2.5, 0.0, 3.0, 3.0])  # site 1 never took part before
  n = np.array([100.0, 50.0, 80.0, 10.0])
  tau = np.array([0.0, 3.0, 0.0, 1.0])
  m = np.array([1.0, 1.0, 1.0, 0.0])
  for T in (0.5, 1.0, 4.0):
    got = agg.dynamic_weights(jnp.asarray(L), jnp.asarray(P), jnp.asarray(n), jnp.asarray(tau),
                              jnp.asarray(m), T)
    np.testing.assert_allclose(got, _np_dynamic(L, P, n, tau, m, T), rtol=1e-5, atol=1e-7)
  # Hand check at T = 1, site 0: Lbar = 2, r = (0.2, 0, 0), rbar = 0.2/3;
  # z0 = 0 + 0.2 - 0.0667 = 0.1333: w0 ~ 100 e^0.1333.
  raw = np.array([100 * np.exp(0.2 - 0.2 / 3), 50 * np.exp(-0.5 - 0.2 / 3) / 2,
                  80 * np.exp(0.5 - 0.2 / 3), 0.0])
  got = agg.dynamic_weights(jnp.asarray(L), jnp.asarray(P), jnp.asarray(n), jnp.asarray(tau),
                            jnp.asarray(m), 1.0)
  np.testing.assert_allclose(got, raw / raw.sum(), rtol=1e-5)
  hot = agg.dynamic_weights(jnp.asarray(L), jnp.asarray(P), jnp.asarray(n), jnp.zeros(4),
                            jnp.asarray(m), 1e6)
  np.testing.assert_allclose(hot, agg.fedavg_weights(jnp.asarray(n), jnp.asarray(m)),
                             rtol=1e-4)


def test_grouped_mean_renormalises_each_head_over_its_holders():
  deltas = {"trunk": jnp.arange(S * 2, dtype=jnp.float32).reshape(S, 2),
            "h1": jnp.array([1.0, 2.0, 3.0, 4.0]), "h2": jnp.array([10.0, 20.0, 30.0, 40.0])}
  groups = {"trunk": 0, "h1": 1, "h2": 2}
  w = jnp.array([0.1, 0.2, 0.3, 0.4])
  holds = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]], jnp.float32)
  out = agg.grouped_mean(deltas, groups, w, holds)
  np.testing.assert_allclose(out["trunk"], (np.asarray(w)[:, None] * np.arange(8).reshape(4, 2))
                             .sum(0), rtol=1e-6)
  np.testing.assert_allclose(out["h1"], (0.1 * 1 + 0.2 * 2) / 0.3, rtol=1e-6)
  np.testing.assert_allclose(out["h2"], (0.2 * 20 + 0.3 * 30) / 0.5, rtol=1e-6)
  none = agg.grouped_mean(deltas, groups, w, holds.at[:, 2].set(0.0))
  assert float(none["h2"]) == 0.0


# ------------------------------------------------------------------ rounds, numpy references
def _data(seed=0, steps=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(S, steps, B, D)).astype(np.float32)
  y = rng.normal(size=(S, steps, B)).astype(np.float32)
  # task weights per row: site k trains head t only where it holds t (as the job's blank rows)
  return {"x": x, "y": y}


HOLDS = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)


def _loss(p, b, key=None):
  """Two 'tasks' on one trunk w: task t predicts y with x @ w + head_t; a site's batch carries
  its own holds row as `tw` (0 = it has no rows of that task, as the job's blank batches)."""
  z = b["x"] @ p["trunk"]["w"]
  l1 = 0.5 * jnp.mean(jnp.square(z + p["heads"]["t1"]["b"] - b["y"])) * b["tw"][0]
  l2 = 0.5 * jnp.mean(jnp.square(z - p["heads"]["t2"]["b"] - b["y"])) * b["tw"][1]
  return l1 + l2


def _np_grads(p, x, y, tw):
  z = x @ p["w"]
  r1 = (z + p["b1"] - y) * tw[0]
  r2 = (z - p["b2"] - y) * tw[1]
  return {"w": x.T @ (r1 + r2) / len(y), "b1": np.mean(r1), "b2": -np.mean(r2)}


def _batches(data, steps):
  tw = np.broadcast_to(HOLDS[:, None, 1:], (S, steps, 2)).astype(np.float32)
  return {**data, "tw": tw}


def _params():
  return {"trunk": {"w": jnp.zeros(D)}, "heads": {"t1": {"b": jnp.zeros(())},
                                                  "t2": {"b": jnp.zeros(())}}}


GROUPS = {"trunk": {"w": 0}, "heads": {"t1": {"b": 1}, "t2": {"b": 2}}}


def _np_round_sgd(ref, data, n, m, lr, mu=0.0):
  deltas = []
  for k in range(S):
    q = dict(ref)
    for t in range(data["x"].shape[1]):
      g = _np_grads(q, data["x"][k, t].astype(np.float64), data["y"][k, t], HOLDS[k, 1:])
      q = {j: q[j] - lr * (g[j] + mu * (q[j] - ref[j])) for j in q}  # FedProx: + mu (x - x0)
    deltas.append({j: ref[j] - q[j] for j in ref})
  w = n * m
  out = {}
  for j, g in (("w", 0), ("b1", 1), ("b2", 2)):
    wg = w * HOLDS[:, g]
    out[j] = sum(wg[k] * deltas[k][j] for k in range(S)) / wg.sum() if wg.sum() > 0 else 0 * ref[j]
  return out


def _flat(state):
  p = state.params
  return {"w": np.asarray(p["trunk"]["w"]), "b1": np.asarray(p["heads"]["t1"]["b"]),
          "b2": np.asarray(p["heads"]["t2"]["b"])}


@pytest.mark.parametrize("shape,names", [((4,), ("site",)), ((4, 2), ("site", "data"))])
def test_fedavg_multitask_round_equals_numpy_and_participation_never_recompiles(shape, names):
  mesh = _mesh(shape, names)
  lr, steps = 0.1, 2
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS)
  n = np.array([30.0, 10.0, 20.0, 40.0])
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  masks = [np.ones(S), np.array([1, 0, 1, 0.0]), np.array([0, 0, 1, 0.0]), np.zeros(S)]
  heads = []
  for r, m in enumerate(masks):
    data = _batches(_data(r, steps), steps)
    server, clients, metrics = round_fn(server, clients, data, n, m, HOLDS)
    heads.append(_flat(server))
    if m.any():
      d = _np_round_sgd(ref, data, n, m, lr)
      ref = {j: ref[j] - d[j] for j in ref}
    got = _flat(server)
    for j in ref:
      np.testing.assert_allclose(got[j], ref[j], rtol=2e-5, atol=2e-6)
    assert int(metrics["applied"]) == int(m.any())
  # Round 2: only site 2 took part; it does not hold t1, so head t1 did not move then; round 3
  # had no participant, so nothing moved.
  assert heads[2]["b1"] == heads[1]["b1"] and heads[2]["b2"] != heads[1]["b2"]
  assert all(np.array_equal(heads[3][j], heads[2][j]) for j in heads[3])
  assert round_fn.trace_count() == 1  # four participation patterns, one compilation
  assert int(server.round) == 4
  np.testing.assert_array_equal(np.asarray(server.last_round), [1, 0, 2, 0])


def test_diloco_inner_adam_state_persists_per_site_and_outer_nesterov_matches_numpy():
  mesh = _mesh((4,), ("site",))
  steps, inner_lr, outer_lr, mu = 3, 0.05, 0.7, 0.9
  client = optax.adam(inner_lr)
  server_tx = optax.sgd(outer_lr, momentum=mu, nesterov=True)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS)
  n = np.array([1.0, 2.0, 3.0, 4.0])
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  adam = [{"m": {j: 0 * ref[j] for j in ref}, "v": {j: 0 * ref[j] for j in ref}, "t": 0}
          for _ in range(S)]
  trace = {j: 0 * ref[j] for j in ref}
  masks = [np.ones(S), np.array([1, 1, 0, 1.0]), np.ones(S)]
  for r, m in enumerate(masks):
    data = _batches(_data(10 + r, steps), steps)
    server, clients, _ = round_fn(server, clients, data, n, m)
    deltas = []
    for k in range(S):
      q, st = dict(ref), adam[k]
      new = {"m": dict(st["m"]), "v": dict(st["v"]), "t": st["t"]}
      for t in range(steps):
        g = _np_grads(q, data["x"][k, t].astype(np.float64), data["y"][k, t], HOLDS[k, 1:])
        new["t"] += 1
        for j in q:
          new["m"][j] = 0.9 * new["m"][j] + 0.1 * g[j]
          new["v"][j] = 0.999 * new["v"][j] + 0.001 * g[j] ** 2
          mh = new["m"][j] / (1 - 0.9 ** new["t"])
          vh = new["v"][j] / (1 - 0.999 ** new["t"])
          q[j] = q[j] - inner_lr * mh / (np.sqrt(vh) + 1e-8)
      if m[k]:
        adam[k] = new  # a site that sits out keeps its state
      deltas.append({j: ref[j] - q[j] for j in ref})
    w = n * m
    # HOLDS not passed: every leaf is averaged over all participants.
    delta = {j: sum(w[k] * deltas[k][j] for k in range(S)) / w.sum() for j in ref}
    for j in ref:
      trace[j] = delta[j] + mu * trace[j]
      ref[j] = ref[j] - outer_lr * (delta[j] + mu * trace[j])
    got = _flat(server)
    for j in ref:
      np.testing.assert_allclose(got[j], ref[j], rtol=1e-4, atol=1e-5)
  counts = [x for x in jax.tree.leaves(clients.opt_state) if x.dtype == jnp.int32]
  np.testing.assert_array_equal(np.asarray(counts[0]), [9, 9, 6, 9])  # site 2 sat out round 1


def test_dynamic_aggregator_round_uses_the_documented_weights():
  mesh = _mesh((4,), ("site",))
  client, server_tx = optax.sgd(0.1), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=1, groups=GROUPS,
                            aggregator="dynamic", temperature=0.5)
  n = np.array([30.0, 10.0, 20.0, 40.0])
  prev, last = np.zeros(S), -np.ones(S)
  for r, m in enumerate([np.ones(S), np.array([1, 0, 1, 1.0]), np.ones(S)]):
    data = _batches(_data(20 + r, 1), 1)
    server, clients, metrics = round_fn(server, clients, data, n, m, HOLDS)
    L = np.asarray(metrics["site_loss"], np.float64)
    tau = np.maximum(r - last - 1, 0)
    want = _np_dynamic(L, prev, n, tau, m, 0.5)
    np.testing.assert_allclose(np.asarray(metrics["weights"]), want, rtol=1e-5, atol=1e-7)
    prev = np.where(m > 0, L, prev)
    last = np.where(m > 0, r, last)


def test_reset_client_state_starts_every_round_from_a_fresh_optimizer_state():
  mesh = _mesh((4,), ("site",))
  client, server_tx = optax.adam(0.05), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=3, groups=GROUPS,
                            reset_client_state=True)
  for r in range(3):
    data = _batches(_data(30 + r, 3), 3)
    server, clients, _ = round_fn(server, clients, data, np.ones(S), np.ones(S), HOLDS)
    counts = [x for x in jax.tree.leaves(clients.opt_state) if x.dtype == jnp.int32]
    np.testing.assert_array_equal(np.asarray(counts[0]), [3, 3, 3, 3])  # never 6 or 9


def test_fedprox_term_matches_numpy():
  mesh = _mesh((4,), ("site",))
  lr, steps, mu = 0.2, 3, 0.5
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS,
                            prox_mu=mu)
  n, m = np.array([3.0, 1.0, 2.0, 4.0]), np.ones(S)
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  for r in range(2):
    data = _batches(_data(40 + r, steps), steps)
    server, clients, _ = round_fn(server, clients, data, n, m, HOLDS)
    d = _np_round_sgd(ref, data, n, m, lr, mu)
    plain = _np_round_sgd(ref, data, n, m, lr)
    assert not np.allclose(d["w"], plain["w"])  # the term matters
    ref = {j: ref[j] - d[j] for j in ref}
    got = _flat(server)
    for j in ref:
      np.testing.assert_allclose(got[j], ref[j], rtol=2e-5, atol=2e-6)


def test_gradient_aggregator_weights_by_alignment_with_the_mean_update():
  mesh = _mesh((4,), ("site",))
  lr, steps, T = 0.2, 2, 0.25
  client, server_tx = optax.sgd(lr), optax.sgd(1.0)
  server, clients = fed.init(_params(), server_tx, client, mesh)
  round_fn = fed.make_round(_loss, client, server_tx, mesh, local_steps=steps, groups=GROUPS,
                            aggregator="gradient", temperature=T)
  n, m = np.array([3.0, 1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0, 1.0])
  data = _batches(_data(50, steps), steps)
  data["y"][1] *= -1.0  # site 1's targets disagree with the others: its update points away
  server, clients, metrics = round_fn(server, clients, data, n, m, HOLDS)
  # numpy: local SGD per site, FedAvg mean of the trunk, cosines, softmax-like weights
  ref = {"w": np.zeros(D), "b1": 0.0, "b2": 0.0}
  deltas = []
  for k in range(S):
    q = dict(ref)
    for t in range(steps):
      g = _np_grads(q, data["x"][k, t].astype(np.float64), data["y"][k, t], HOLDS[k, 1:])
      q = {j: q[j] - lr * g[j] for j in q}
    deltas.append({j: ref[j] - q[j] for j in ref})
  f = n * m / (n * m).sum()
  mean_w = sum(f[k] * deltas[k]["w"] for k in range(S))
  cos = np.array([d["w"] @ mean_w / (np.linalg.norm(d["w"]) * np.linalg.norm(mean_w))
                  for d in deltas])
  w = n * m * np.exp(cos / T)
  w /= w.sum()
  np.testing.assert_allclose(np.asarray(metrics["weights"]), w, rtol=1e-4, atol=1e-6)
  assert w[1] < 0.5 * f[1]  # the disagreeing site counts for much less than under FedAvg
  want_w = sum(w[k] * deltas[k]["w"] for k in range(S))
  np.testing.assert_allclose(np.asarray(server.params["trunk"]["w"]), -want_w, rtol=1e-4,
                             atol=1e-6)
  got_b2 = float(server.params["heads"]["t2"]["b"])
  holders = [1, 2, 3]  # t2's holders, weights renormalised over them
  want_b2 = sum(w[k] * deltas[k]["b2"] for k in holders) / sum(w[k] for k in holders)
  np.testing.assert_allclose(got_b2, -want_b2, rtol=1e-4, atol=1e-6)
