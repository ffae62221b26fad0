"""DP-FedAvg (`jmtl.federated.privacy`) against numpy references and dp-accounting called
directly: clipping, noise with a fixed key, the fixed denominator q S_g, epsilon per round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jmtl import federated as fed
from jmtl.config import ConfigError, validate
from jmtl.defaults import base_config
from jmtl.federated import privacy


@pytest.mark.parametrize("z,q,T,delta", [(1.1, 0.5, 10, 1e-5), (0.8, 1.0, 3, 1e-3),
                                         (2.0, 0.25, 50, 1e-6)])
def test_epsilon_equals_dp_accounting_called_directly(z, q, T, delta):
  from dp_accounting import dp_event
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
  rdp = rdp_privacy_accountant.RdpAccountant().compose(event, T).get_epsilon(delta)
  pld = pld_privacy_accountant.PLDAccountant().compose(event, T).get_epsilon(delta)
  got = privacy.epsilon(z, q, T, delta)
  assert got == (pytest.approx(rdp, rel=1e-9), pytest.approx(pld, rel=1e-9))
  assert 0 < got[1] <= got[0] * 1.05  # PLD is the tighter accountant (up to discretisation)


def test_epsilon_edge_cases():
  assert privacy.epsilon(0.0, 0.5, 3, 1e-5) == (float("inf"), float("inf"))
  assert privacy.epsilon(1.0, 0.5, 0, 1e-5) == (0.0, 0.0)


def test_clip_is_the_global_norm_clip():
  tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  out, norm = privacy.clip(tree, 2.5)
  assert float(norm) == pytest.approx(5.0)
  np.testing.assert_allclose(out["a"], [1.5, 0.0])
  np.testing.assert_allclose(out["b"], [[2.0]])
  same, _ = privacy.clip(tree, 10.0)
  np.testing.assert_allclose(same["a"], tree["a"])


def test_noise_and_scale_matches_numpy_with_the_same_draws():
  dp = privacy.DPConfig(clip_norm=0.5, noise_multiplier=1.3, delta=1e-5, sampling_rate=0.5)
  total = {"trunk": jnp.arange(6.0).reshape(2, 3), "head": jnp.ones(4)}
  holders = {"trunk": jnp.float32(4.0), "head": jnp.float32(2.0)}
  key = jax.random.key(7)
  out = privacy.noise_and_scale(total, key, dp, holders)
  leaves = jax.tree.leaves(total)  # tree order: head, trunk
  den = {"head": 0.5 * 2, "trunk": 0.5 * 4}
  for i, name in enumerate(["head", "trunk"]):
    n = np.asarray(jax.random.normal(jax.random.fold_in(key, i), leaves[i].shape, jnp.float32))
    want = (np.asarray(total[name], np.float64) + 1.3 * 0.5 * n) / den[name]
    np.testing.assert_allclose(np.asarray(out[name]), want, rtol=1e-6)
  # the noise itself: std z C over many coordinates
  big = privacy.noise_and_scale({"x": jnp.zeros(20000)}, key, dp, {"x": jnp.float32(2.0)})
  assert np.std(np.asarray(big["x"]) * (0.5 * 2)) == pytest.approx(1.3 * 0.5, rel=0.03)


def _mesh(n):
  return jax.make_mesh((n,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _setup(S=4, D=5, B=8, seed=0):
  rng = np.random.default_rng(seed)
  data = {"x": rng.normal(size=(S, 1, B, D)).astype(np.float32),
          "y": (3.0 * rng.normal(size=(S, 1, B))).astype(np.float32)}
  loss = lambda p, b, key=None: 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] + p["b"] - b["y"]))
  return data, loss


def _np_site_deltas(data, lr):
  out = []
  for k in range(data["x"].shape[0]):
    x, y = data["x"][k, 0].astype(np.float64), data["y"][k, 0].astype(np.float64)
    r = -y  # parameters start at 0
    out.append(np.concatenate([[lr * np.mean(r)], lr * x.T @ r / len(y)]))  # leaves b, w
  return out


@pytest.mark.parametrize("z", [0.0, 0.7])
def test_dp_round_equals_numpy_clip_sum_noise_over_expected_count(z):
  """One DP-FedAvg round, 4 sites, q = 0.5 (sites 1 and 3 take part): server params =
  -(sum of the participants' clipped deltas + z C N) / (q S), the noise drawn with the round's
  fixed key (jax.random.normal of fold_in(fold_in(fold_in(key(seed), 2^31 - 1), round), leaf))."""
  S, lr, C, seed = 4, 0.5, 0.3, 11
  data, loss = _setup(S)
  dp = privacy.DPConfig(clip_norm=C, noise_multiplier=z, delta=1e-5, sampling_rate=0.5)
  mesh = _mesh(S)
  params = {"b": jnp.zeros(()), "w": jnp.zeros(5)}
  server, clients = fed.init(params, optax.sgd(1.0), optax.sgd(lr), mesh)
  round_fn = fed.make_round(loss, optax.sgd(lr), optax.sgd(1.0), mesh, local_steps=1, dp=dp,
                            seed=seed)
  mask = np.array([0.0, 1.0, 0.0, 1.0])
  n = np.array([10.0, 20.0, 30.0, 40.0])  # ignored: DP-FedAvg weights are uniform
  server, _, m = round_fn(server, clients, data, n, mask)
  total = np.zeros(6)
  norms = []
  for k, d in enumerate(_np_site_deltas(data, lr)):
    norms.append(np.linalg.norm(d))
    total += mask[k] * d * min(1.0, C / np.linalg.norm(d))
  assert max(norms[1], norms[3]) > C  # the clip binds
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2**31 - 1), 0)
  draw = lambda i, shape: np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape,
                                                       jnp.float32)).reshape(-1)
  noise = np.concatenate([draw(0, ()), draw(1, (5,))])  # leaves in tree order: b, w
  want = -(total + z * C * noise) / (0.5 * S)
  got = np.concatenate([np.asarray(server.params["b"])[None], np.asarray(server.params["w"])])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["weights"], mask / (0.5 * S))


def test_dp_keys_are_checked_as_one_config_error():
  c = base_config()
  c.fed.dp.noise_multiplier = 1.0
  with pytest.raises(ConfigError, match=r"'fed.dp.noise_multiplier' = 1.0 needs fed.dp.clip_norm"):
    validate(c)
  c.fed.dp.clip_norm, c.fed.aggregator = 1.0, "dynamic"
  with pytest.raises(ConfigError, match=r"'fed.dp.clip_norm' = 1.0 needs fed.aggregator = fedavg"):
    validate(c)
  c.fed.aggregator, c.fed.dp.delta = "fedavg", 1.0
  with pytest.raises(ConfigError, match=r"'fed.dp.delta' = 1.0 must be in"):
    validate(c)
