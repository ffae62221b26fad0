"""Secure aggregation (`jmtl.federated.secagg`): pair seeds against X25519 + HKDF called
directly, decoded sums against numpy sums within S quantization steps, masks that cancel
exactly, payloads uncorrelated with updates, dropout recovery, payload bytes, the overflow bound,
the secure round against the plain round, and the config rules."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jax.sharding import AxisType

from jmtl import config as config_lib
from jmtl import federated as fed
from jmtl.defaults import base_config
from jmtl.federated import secagg

FP = secagg.FixedPoint(clipping_range=1.0, quantization_range=2**22)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _updates(n_sites, n, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return [{"a": (scale * rng.normal(size=(n,))).astype(np.float32),
           "b": (scale * rng.normal(size=(3, 4))).astype(np.float32)} for _ in range(n_sites)]


def _payloads(updates, seed=7, round_index=3, mask=None, holds=None, groups=None):
  S = len(updates)
  seeds = secagg.pair_seeds(seed, round_index, S)
  coef = secagg.pair_coefficients(np.ones(S) if mask is None else mask, holds)
  base = jax.random.key(11)
  out = [secagg.site_payload(u, i, seeds[i], coef[i], FP, jax.random.fold_in(base, i), groups)
         for i, u in enumerate(updates)]
  return out, seeds, coef, base


def _codes(update, key, n_sites):
  """The unmasked codes: site_payload with every pair coefficient 0 (the same compiled
  encoding, so the same stochastic rounding, without masks)."""
  zero_seeds = np.zeros((n_sites, 4), np.uint32)
  zero_coef = np.zeros((n_sites, 1), np.int32)
  return jax.tree.map(np.asarray, secagg.site_payload(update, 0, zero_seeds, zero_coef, FP,
                                                      key).values)


def test_pair_seeds_are_x25519_then_hkdf_and_symmetric():
  S, seed, r = 4, 5, 2
  seeds = secagg.pair_seeds(seed, r, S)
  keys = [secagg.site_private_key(seed, r, k) for k in range(S)]
  for i in range(S):
    assert not seeds[i, i].any()
    for j in range(S):
      if i == j:
        continue
      # X25519 is symmetric: i's private key with j's public key = j's with i's.
      shared = keys[i].exchange(keys[j].public_key())
      assert shared == keys[j].exchange(keys[i].public_key())
      lo, hi = min(i, j), max(i, j)
      raw = HKDF(algorithm=hashes.SHA256(), length=16, salt=None,
                 info=b"jmtl secagg pair seed|%d|%d|%d" % (r, lo, hi)).derive(shared)
      np.testing.assert_array_equal(seeds[i, j], np.frombuffer(raw, "<u4"))
  # Reproducible from (seed, round); another round or seed gives other seeds.
  np.testing.assert_array_equal(seeds, secagg.pair_seeds(seed, r, S))
  assert not np.any(np.all(seeds[0, 1:] == secagg.pair_seeds(seed, r + 1, S)[0, 1:], axis=-1))
  assert not np.any(np.all(seeds[0, 1:] == secagg.pair_seeds(seed + 1, r, S)[0, 1:], axis=-1))


def test_pair_coefficients_by_hand():
  c = secagg.pair_coefficients([1, 1, 0, 1], [[1, 1], [1, 0], [1, 1], [1, 1]])
  # group 0: participants 0, 1, 3 pair up; site 2 takes no part.
  np.testing.assert_array_equal(c[:, :, 0], [[0, 1, 0, 1], [-1, 0, 0, 1], [0, 0, 0, 0],
                                             [-1, -1, 0, 0]])
  # group 1: site 1 does not hold it.
  np.testing.assert_array_equal(c[:, :, 1], [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0],
                                             [-1, 0, 0, 0]])
  assert np.all(c.sum(axis=(0, 1)) == 0)  # every pair adds once and subtracts once


def test_decoded_sum_equals_the_plain_sum_within_s_steps_and_masks_cancel_exactly():
  S = 5
  updates = _updates(S, 4000)
  updates[0]["a"][:10] = 3.0  # beyond c = 1: clipped
  payloads, _, _, base = _payloads(updates)
  total = secagg.unmask_sum(payloads)
  # Masks cancel exactly: the uint32 sum is the sum of the unmasked codes mod 2^32.
  codes = [_codes(u, jax.random.fold_in(base, i), S) for i, u in enumerate(updates)]
  for k in ("a", "b"):
    want = np.sum([c[k].astype(np.uint64) for c in codes], axis=0) % 2**32
    np.testing.assert_array_equal(np.asarray(total[k]), want.astype(np.uint32))
    plain = np.sum([np.clip(u[k].astype(np.float64), -1, 1) for u in updates], axis=0)
    got = np.asarray(secagg.decode(total[k], FP), np.float64)
    err = np.max(np.abs(got - plain))
    assert err < S * FP.step + 4e-7 * S, (err, S * FP.step)  # + float32 rounding of x / d
    assert err > 0  # it is a quantized sum, not the float one
  # Each masked payload alone is far from its code.
  assert np.mean(np.asarray(payloads[0].values["a"]) == codes[0]["a"]) < 0.01


def test_stochastic_rounding_is_unbiased():
  x = jnp.full((200_000,), 0.3 * FP.step)  # 0.3 of a step: rounds to 0 or 1 level
  q = np.asarray(secagg.decode(secagg.encode(x, FP, secagg.uniform(jax.random.key(0), x.size)), FP)) / FP.step
  assert set(np.unique(np.round(q))) == {0.0, 1.0}
  assert abs(q.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / q.size)


def test_a_payload_is_uncorrelated_with_its_update():
  S, n = 3, 50_000
  ramp = np.linspace(-0.9, 0.9, n).astype(np.float32)  # a strongly structured update
  updates = [{"a": ramp * (1 - 0.1 * i)} for i in range(S)]  # inside [-c, c]
  payloads, _, _, base = _payloads(updates)
  code = _codes(updates[1], jax.random.fold_in(base, 1), S)["a"]
  signed = code.view(np.int32).astype(np.float64)
  assert np.corrcoef(signed, ramp)[0, 1] > 0.999  # the unmasked code is the update
  y = np.asarray(payloads[1].values["a"]).astype(np.float64)
  for v in (y, np.asarray(payloads[1].values["a"]).view(np.int32).astype(np.float64)):
    assert abs(np.corrcoef(v, ramp)[0, 1]) < 4 / np.sqrt(n)
  # uniform over Z_2^32: mean 2^31, sd 2^32 / sqrt(12)
  assert abs(y.mean() - 2**31) < 5 * 2**32 / np.sqrt(12 * n)


def test_a_site_dropping_after_masking_is_recovered_exactly():
  S, gone = 4, 2
  updates = _updates(S, 3000, seed=1)
  payloads, seeds, coef, base = _payloads(updates)
  arrived = [p for p in payloads if p.site != gone]
  survivors = [i for i in range(S) if i != gone]
  codes = [_codes(updates[i], jax.random.fold_in(base, i), S) for i in survivors]
  want = {k: (np.sum([c[k].astype(np.uint64) for c in codes], axis=0) % 2**32
              ).astype(np.uint32) for k in ("a", "b")}
  # Without the revealed seeds the masks with the dropped site remain.
  stuck = secagg.unmask_sum(arrived)
  assert np.mean(np.asarray(stuck["a"]) == want["a"]) < 0.01
  # Each survivor reveals the seed it shares with the dropped site; the server removes them.
  revealed = {(i, gone): seeds[i, gone] for i in survivors}
  total = secagg.unmask_sum(arrived, revealed, coef)
  for k in ("a", "b"):
    np.testing.assert_array_equal(np.asarray(total[k]), want[k])
    plain = np.sum([np.clip(updates[i][k].astype(np.float64), -1, 1) for i in survivors], 0)
    assert np.max(np.abs(np.asarray(secagg.decode(total[k], FP)) - plain)) < 3 * FP.step + 2e-6
  with pytest.raises(ValueError, match="must have arrived"):
    secagg.unmask_sum(arrived, {(gone, 0): seeds[gone, 0]}, coef)


def test_payload_bytes_are_four_per_value_of_the_held_groups():
  S = 3
  updates = [{"trunk": np.full((7, 3), 0.1 * i, np.float32),
              "head": np.full((5,), 0.2, np.float32)} for i in range(S)]
  groups = {"trunk": 0, "head": 1}
  holds = np.array([[1, 1], [1, 0], [1, 1]])
  payloads, _, _, _ = _payloads(updates, holds=holds, groups=groups)
  for i, p in enumerate(payloads):
    raw = secagg.payload_bytes(p, groups, holds[i])
    assert len(raw) == 4 * (21 + 5 * holds[i, 1])
    # bytes are the little-endian uint32 leaves in tree order ("head" sorts before "trunk")
    leaves = ([np.asarray(p.values["head"])] if holds[i, 1] else []) + \
        [np.asarray(p.values["trunk"]).reshape(-1)]
    np.testing.assert_array_equal(np.frombuffer(raw, "<u4"), np.concatenate(leaves))
  # Site 1 does not send the head: the holders' head masks cancel among themselves.
  head = secagg.unmask_sum([payloads[0], payloads[2]])["head"]
  np.testing.assert_allclose(np.asarray(secagg.decode(head, FP)), 0.4, atol=2 * FP.step)


def test_the_overflow_bound_is_tight():
  fp = secagg.FixedPoint(1.0, 2**22)  # L = 2^21
  fp.check_sites(1023)
  with pytest.raises(ValueError, match="could wrap modulo 2"):
    fp.check_sites(1024)
  assert secagg.max_quantization_range(1024) == 2**22 - 1
  # 1024 sites at +c: 1024 x 2^21 = 2^31 wraps to -2^31 (what the check prevents); 1023 do not.
  code = secagg.encode(jnp.ones((1,)), fp, secagg.uniform(jax.random.key(0), 1))
  assert int(code[0]) == 2**21
  assert float(secagg.decode(jnp.uint32(1024) * code, fp)[0]) < 0
  np.testing.assert_allclose(float(secagg.decode(jnp.uint32(1023) * code, fp)[0]), 1023.0,
                             rtol=1e-6)


def _mesh(n):
  return jax.make_mesh((n,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


@pytest.mark.parametrize("aggregator", ["fedavg", "gradient"])
def test_secure_round_equals_the_plain_round_within_the_quantization_error(aggregator):
  S, H, B, D = 4, 2, 8, 5
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(S, H, B, D)).astype(np.float32),
          "y": rng.normal(size=(S, H, B)).astype(np.float32)}

  def loss(p, b, key=None):
    return 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] + p["head"] - b["y"]))

  params = lambda: {"w": jnp.zeros(D), "head": jnp.zeros(())}
  groups = {"w": 0, "head": 1}
  holds = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], np.float32)  # site 2 lacks the head
  examples, mask = np.array([30.0, 10.0, 20.0, 40.0]), np.array([1.0, 1.0, 1.0, 0.0])
  fp = secagg.FixedPoint(1.0, 2**22)
  mesh, tx, ctx = _mesh(S), optax.sgd(1.0), optax.sgd(0.1)
  out = {}
  for secure in (None, fp):
    fn = fed.make_round(loss, ctx, tx, mesh, local_steps=H, groups=groups,
                        aggregator=aggregator, secure=secure, seed=3)
    server, clients = fed.init(params(), tx, ctx, mesh)
    for _ in range(3):
      server, clients, metrics = fn(server, clients, data, examples, mask, holds)
    out[secure is not None] = (jax.device_get(server.params), metrics)
  plain, secure_params = out[False][0], out[True][0]
  assert float(np.abs(plain["w"]).sum()) > 0.05  # it trained
  for k in plain:  # 3 rounds, each within S steps per value
    np.testing.assert_allclose(secure_params[k], plain[k], atol=3 * S * fp.step + 1e-6, rtol=0)
  assert np.max(np.abs(secure_params["w"] - plain["w"])) > 0  # quantized, not the float path
  np.testing.assert_allclose(out[True][1]["weights"], out[False][1]["weights"], atol=1e-5)
  assert float(out[True][1]["secagg_clipped"]) == 0
  assert "secagg_clipped" not in out[False][1]
  if aggregator != "fedavg":
    return
  # A clipping range below the deltas: the count says so, the round still runs.
  small = secagg.FixedPoint(1e-4, 2**16)
  fn = fed.make_round(loss, ctx, tx, mesh, local_steps=H, groups=groups, secure=small)
  server, clients = fed.init(params(), tx, ctx, mesh)
  server, clients, metrics = fn(server, clients, data, examples, mask, holds)
  assert float(metrics["secagg_clipped"]) > 0
  assert np.all(np.abs(jax.device_get(server.params)["w"]) <= 1e-4 + small.step)


def _cfg(**fed_keys):
  c = base_config()
  c.tasks = ("sst2",)
  c.fed.sites = tuple(dict(name=f"s{i}", devices=1) for i in range(4))
  for k, v in fed_keys.items():
    node, *rest = k.split("__")
    if rest:
      c.fed[node][rest[0]] = v
    else:
      c.fed[k] = v
  return c


def test_config_rules_for_secure_aggregation():
  config_lib.validate(_cfg(secure_aggregation=True))
  config_lib.validate(_cfg(secure_aggregation=True, aggregator="gradient"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"'fed.secagg.quantization_range' = 4294967296 is too large for 4 "
                           r"sites.*at most 1073741823"):
    config_lib.validate(_cfg(secure_aggregation=True, secagg__quantization_range=2**32))
  config_lib.validate(_cfg(secagg__quantization_range=2**32))  # off: no limit
  with pytest.raises(config_lib.ConfigError, match=r"'fed.secagg.clipping_range' = 0.0 must be"):
    config_lib.validate(_cfg(secure_aggregation=True, secagg__clipping_range=0.0))
  # A rule that needs each site's update (the robust ones) is refused under a secure sum.
  from jmtl.defaults import KEYS
  predicate, text = KEYS["fed.secure_aggregation"].rules[0]
  c = _cfg(secure_aggregation=True)
  c.fed.aggregator = "median"  # not a choice in this version; the rule covers future names
  assert not predicate(True, c) and predicate(False, c)
  assert "'median' must see each site's update" in text(c)


def test_cli_secure_aggregation_bad_range_is_one_line_exit_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "jmtl.cli", "federated", "--config",
       str(REPO / "tests" / "configs" / "tiny_fed.py"), "--workdir", str(tmp_path / "w"),
       "--config.fed.secure_aggregation=True",
       "--config.fed.secagg.quantization_range=4294967296"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("jmtl: error: "), out.stderr
  assert "config key 'fed.secagg.quantization_range' = 4294967296 is too large" in out.stderr
  assert not (tmp_path / "w").exists()


def test_without_cryptography_secure_aggregation_is_a_config_error(monkeypatch):
  import importlib.util

  from jmtl import preflight
  spec = importlib.util.spec_from_file_location("tiny_fed", REPO / "tests" / "configs" /
                                                "tiny_fed.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.fed.secure_aggregation = True
  preflight._federated(config, 8)  # installed: fine
  monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)  # import fails
  with pytest.raises(config_lib.ConfigError,
                     match=r"'fed.secure_aggregation' = True: secure aggregation needs "
                           r"cryptography>=42 \(pip install 'jmtl\[fed\]'\)"):
    preflight._federated(config, 8)
  config.fed.secure_aggregation = False
  preflight._federated(config, 8)  # off: cryptography is not needed
