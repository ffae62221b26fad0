"""Asynchronous FedBuff rounds (`jmtl.federated.asynchronous`) and stragglers: the event order and
staleness worked by hand on 3 sites, server steps against a numpy FedBuff reference (buffered
mean of n_k Delta_k / sqrt(1 + tau_k) over sum n_k), sites restarting from the newest model,
K = S being synchronous FedAvg, straggler draws, and the config rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jmtl import config as config_lib
from jmtl import federated as fed
from jmtl.defaults import base_config
from jmtl.federated import asynchronous as fa
from jmtl.federated import loop
from jmtl.federated import sites as sites_lib

D, B = 5, 8  # features, rows per local batch


def _sites(speeds, **kw):
  raw = [dict(name=f"s{k}", speed=v, latency_ms=0.0, **kw) for k, v in enumerate(speeds)]
  cfg = base_config()
  cfg.fed.sites = tuple(raw)
  return sites_lib.sites_from_config(cfg)


def test_event_order_and_staleness_by_hand():
  """Speeds 2, 0.8, 0.5, H = 2 steps of 1 s, no latency or bytes: jobs last 1, 2.5, 4 s.
  K = 2.  step 1: sites 0 (t=1) and 1 (t=2.5) -> clock 2.5, tau 0, 0; both restart at 2.5 from
  version 1 (finish 3.5, 5.0).  step 2: site 0 (3.5), site 2 (4.0) -> clock 4.0, tau 0 and 1
  (site 2 still runs version 0); restart at 4.0 (finish 5.0, 8.0).  step 3: sites 0 and 1 both
  at 5.0 (tie: lower index first) -> clock 5.0, tau 0 (from version 2) and 1 (from version 1).
  step 4: site 0 (6.0), site 1 (7.5) -> tau 0, 0."""
  sites = _sites([2.0, 0.8, 0.5])
  secs = loop.site_seconds(sites, [0, 0, 0], local_steps=2, step_time=1.0)
  np.testing.assert_allclose(secs, [1.0, 2.5, 4.0])
  q = fa.EventQueue.start(secs)
  got = []
  for _ in range(4):
    who, t, tau = q.buffer(2)
    got.append((who.tolist(), t, tau.tolist()))
    q = q.restart(who, t, secs)
  assert got == [([0, 1], 2.5, [0, 0]), ([0, 2], 4.0, [0, 1]), ([0, 1], 5.0, [0, 1]),
                 ([0, 1], 7.5, [0, 0])]
  assert q.version == 4 and q.clock == 7.5
  assert q.start_version == [4, 4, 2] and q.finish == [8.5, 10.0, 8.0]
  # the queue is JSON-able and round-trips exactly (it lives in the checkpoint's meta)
  assert fa.EventQueue.from_json(q.to_json()) == q
  with pytest.raises(ValueError, match=r"buffer size must be in \[1, 3\]"):
    q.buffer(4)


def test_bandwidth_and_latency_enter_the_job_time():
  """A site's job: 2 x latency + bytes x 8 / down + H x step / speed + bytes x 8 / up."""
  raw = dict(name="x", speed=1.0, latency_ms=30.0, up_mbps=8.0, down_mbps=80.0)
  cfg = base_config()
  cfg.fed.sites = (raw,)
  sites = sites_lib.sites_from_config(cfg)
  secs = loop.site_seconds(sites, [1_000_000], local_steps=3, step_time=0.5, slow=[4.0])
  assert math.isclose(secs[0], 0.06 + 0.1 + 3 * 0.5 * 4.0 + 1.0)


def test_staleness_scale_and_stragglers():
  np.testing.assert_allclose(fa.staleness_scale([0, 1, 3, 8]), [1, 1 / math.sqrt(2), 0.5, 1 / 3])
  masks = [fa.straggler_mask(0, r, 10, 0.3) for r in range(1, 6)]
  assert all(m.sum() == 3 for m in masks)  # round(0.3 x 10) per round
  assert len({tuple(m) for m in masks}) > 1  # drawn anew each round
  np.testing.assert_array_equal(masks[0], fa.straggler_mask(0, 1, 10, 0.3))  # seeded
  assert not fa.straggler_mask(0, 1, 10, 0.0).any()
  slow = fa.slowdown(0, 1, 10, 0.3, 5.0)
  np.testing.assert_array_equal(slow, np.where(masks[0] > 0, 5.0, 1.0))
  # A straggler's compute time (only) is multiplied; its job delivers later.
  sites = _sites([1.0, 1.0])
  secs = loop.site_seconds(sites, [0, 0], 2, 1.0, slow=[1.0, 5.0])
  np.testing.assert_allclose(secs, [2.0, 10.0])
  who, t, _ = fa.EventQueue.start(secs).buffer(1)
  assert who.tolist() == [0] and t == 2.0
  # sync: the deadline drops it before the round
  np.testing.assert_array_equal(loop.deadline_mask(np.ones(2), secs, 5.0), [1.0, 0.0])


# -------------------------------------------------------------- server steps against numpy
def _mesh(n):
  return jax.make_mesh((n,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _loss(p, b, key=None):
  return 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] + p["b"] - b["y"]))


def _batches(sites, steps, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(sites, steps, B, D))
  y = x @ np.linspace(-1, 1, D) + 0.3 * rng.normal(size=(sites, steps, B))
  return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def _np_local(p, x, y, lr):
  """H local SGD steps of site data x [H, B, D] from p (float64); returns the final params."""
  q = {k: np.array(v, np.float64) for k, v in p.items()}
  for t in range(x.shape[0]):
    r = x[t] @ q["w"] + q["b"] - y[t]
    q = {"w": q["w"] - lr * x[t].T @ r / len(r), "b": q["b"] - lr * np.mean(r)}
  return q


def test_fedbuff_steps_equal_numpy_and_sites_restart_from_the_newest_model():
  """3 sites (jobs of 1, 2.5, 4 s), K = 2, examples 3 / 1 / 2, client sgd 0.2, server sgd
  eta = 0.8: each server step is x <- x - eta sum_buffer n_k s(tau_k) (start_k - y_k) / sum n_k
  with y_k from the site's own (possibly stale) start; deliverers restart from the new x."""
  n_sites, steps, lr, eta, K = 3, 2, 0.2, 0.8, 2
  mesh = _mesh(n_sites)
  ctx, stx = optax.sgd(lr), optax.sgd(eta)
  params = {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros((), jnp.float32)}
  server, clients = fed.init(params, stx, ctx, mesh, site_starts=True)
  round_fn = fed.make_round(_loss, ctx, stx, mesh, local_steps=steps)
  examples = np.array([3.0, 1.0, 2.0])
  q = fa.EventQueue.start([1.0, 2.5, 4.0])
  x = {"w": np.zeros(D), "b": np.zeros(())}
  starts = [dict(x) for _ in range(n_sites)]
  seen_tau = []
  for step in range(4):
    who, t, tau = q.buffer(K)
    seen_tau.append(tau.tolist())
    mask, scale = fa.fedbuff_inputs(examples, who, tau)
    data = _batches(n_sites, steps, seed=step)
    server, clients, m = round_fn(server, clients, data, examples, mask, scale=scale)
    # numpy FedBuff reference
    num = {k: 0.0 for k in x}
    for k, tk in zip(who.tolist(), tau.tolist()):
      y = _np_local(starts[k], data["x"][k].astype(np.float64), data["y"][k], lr)
      for name in x:
        num[name] = num[name] + examples[k] / math.sqrt(1 + tk) * (starts[k][name] - y[name])
    x = {name: x[name] - eta * num[name] / examples[who].sum() for name in x}
    for k in who.tolist():
      starts[k] = dict(x)
    for name in x:
      np.testing.assert_allclose(np.asarray(server.params[name]), x[name], atol=1e-5, rtol=1e-5)
      for k in range(n_sites):  # deliverers hold the newest model, the others their old one
        np.testing.assert_allclose(np.asarray(clients.start_params[name][k]), starts[k][name],
                                   atol=1e-5, rtol=1e-5)
    w_ref = examples[who] / np.sqrt(1 + tau) / examples[who].sum()
    np.testing.assert_allclose(m["weights"][who], w_ref, rtol=1e-6)
    assert np.all(m["weights"][mask == 0] == 0)
    q = q.restart(who, t, [1.0, 2.5, 4.0])
  assert seen_tau == [[0, 0], [0, 1], [0, 1], [0, 0]]  # stale updates were exercised
  assert round_fn.trace_count() == 1  # one program for every buffer


def test_buffer_of_every_site_is_synchronous_fedavg():
  """K = S: every site delivers every step with tau = 0; parameters equal sync FedAvg's."""
  n_sites, steps = 4, 2
  mesh = _mesh(n_sites)
  ctx, stx = optax.sgd(0.1), optax.sgd(1.0)
  params = lambda: {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros((), jnp.float32)}
  examples = np.array([1.0, 2.0, 3.0, 4.0])
  a_server, a_clients = fed.init(params(), stx, ctx, mesh, site_starts=True)
  s_server, s_clients = fed.init(params(), stx, ctx, mesh)  # own buffers: rounds donate
  a_round = fed.make_round(_loss, ctx, stx, mesh, local_steps=steps)
  s_round = fed.make_round(_loss, ctx, stx, mesh, local_steps=steps)
  q = fa.EventQueue.start([3.0, 1.0, 2.0, 5.0])
  for step in range(3):
    who, t, tau = q.buffer(n_sites)
    assert sorted(who.tolist()) == [0, 1, 2, 3] and not tau.any()
    mask, scale = fa.fedbuff_inputs(examples, who, tau)
    data = _batches(n_sites, steps, seed=10 + step)
    a_server, a_clients, _ = a_round(a_server, a_clients, data, examples, mask, scale=scale)
    s_server, s_clients, _ = s_round(s_server, s_clients, data, examples, np.ones(n_sites))
    q = q.restart(who, t, [3.0, 1.0, 2.0, 5.0])
    for name in ("w", "b"):
      np.testing.assert_allclose(np.asarray(a_server.params[name]),
                                 np.asarray(s_server.params[name]), atol=1e-6)
  assert q.clock == 15.0  # 3 steps of the slowest job (5 s)


@pytest.mark.parametrize("key,value,needle", [
    ("aggregator", "dynamic", "'fed.mode' = 'async' needs fed.aggregator = 'fedavg'"),
    ("participation", 0.5, "'fed.mode' = 'async' needs fed.participation = 1"),
    ("deadline_s", 3.0, "'fed.mode' = 'async' needs fed.deadline_s = 0"),
    ("buffer_size", 3, "'fed.buffer_size' = 3 must be <= the number of sites (2)"),
])
def test_async_config_rules_are_one_clear_line(key, value, needle):
  cfg = base_config()
  cfg.fed.sites = (dict(name="a"), dict(name="b"))
  cfg.fed.mode = "async"
  setattr(cfg.fed, key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, check_files=False)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_straggler_keys_are_checked():
  cfg = base_config()
  cfg.fed.faults.stragglers = 1.5
  with pytest.raises(config_lib.ConfigError, match=r"'fed.faults.stragglers' = 1.5 must be in"):
    config_lib.validate(cfg, check_files=False)
  cfg = base_config()
  cfg.fed.faults.straggler_slowdown = 0.5
  with pytest.raises(config_lib.ConfigError, match="'fed.faults.straggler_slowdown' = 0.5 must"):
    config_lib.validate(cfg, check_files=False)
