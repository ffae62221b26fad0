"""`jmtl.federated.compression` against hand counts and numpy references: spec grammar, exact
bytes, payload bytes round trip (host decode == in-jit decode), stochastic quantization is
unbiased, int8's blockwise error bound, top-k error feedback step by step, and a round whose
aggregate is FedAvg over the decoded (error-fed) updates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from jmtl import federated as fed
from jmtl.config import ConfigError, validate
from jmtl.defaults import base_config
from jmtl.federated import compression as C


def test_spec_grammar():
  assert not C.parse("").enabled
  assert C.parse("int8", 64) == C.Codec(values="int8", block=64)
  assert C.parse("q4") == C.parse("stochastic:4") == C.Codec(values="q", bits=4)
  assert C.parse("topk:0.01+int8") == C.Codec(topk=0.01, values="int8")
  assert C.parse("topk:0.5").error_feedback and not C.parse("q2").error_feedback
  for bad, words in [("q9", "bits must be in 1..8"), ("q0", "bits must be in 1..8"),
                     ("int8+topk:0.1", "must come first"), ("topk:0", "(0, 1]"),
                     ("topk:x", "must be a number"), ("int8+bf16", "only one value codec"),
                     ("int4", "unknown part 'int4'")]:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
      C.parse(bad)


def test_bad_spec_is_a_config_error_naming_the_key():
  c = base_config()
  c.fed.compress = "topk:2"
  with pytest.raises(ConfigError, match=r"config key 'fed.compress' = 'topk:2' must be a "
                                        r"compression spec"):
    validate(c)


@pytest.mark.parametrize("spec,n,want", [
    ("", 1000, 4000),
    ("bf16", 1000, 2000),
    ("fp16", 7, 14),
    ("int8", 1000, 1000 + 4 * 4),                 # 4 blocks of 256 -> 4 float32 scales
    ("int8", 256, 256 + 4),
    ("q4", 1000, 500 + 8 * 4),                    # 4 bits each; (lo, hi) per block
    ("q3", 1000, 375 + 8 * 4),                    # ceil(3000 / 8)
    ("q1", 5, 1 + 8),
    ("topk:0.1", 100, 10 * 1 + 10 * 4),           # 10 kept; index < 256: 1 byte
    ("topk:0.01+int8", 1000, 10 * 2 + 10 + 4),    # index < 65536: 2 bytes; 1 block
    ("topk:0.001+q2", 100_000, 100 * 4 + 25 + 8),  # index >= 65536: 4 bytes
    ("topk:0.001", 10, 1 * 1 + 4),                # at least one value
])
def test_bytes_by_hand(spec, n, want):
  assert C.leaf_bytes(C.parse(spec), n) == want


SPECS = ["", "bf16", "fp16", "int8", "q1", "q3", "stochastic:8", "topk:0.05", "topk:0.1+int8",
         "topk:0.2+q4", "topk:0.3+bf16"]


@pytest.mark.parametrize("spec", SPECS)
def test_payload_is_exactly_the_counted_bytes_and_decodes_like_the_jitted_round(spec):
  codec = C.parse(spec, block=32)
  rng = np.random.default_rng(0)
  leaves = [rng.normal(size=(7, 11)).astype(np.float32), rng.normal(size=300).astype(np.float32),
            np.zeros(5, np.float32)]
  sizes = [x.size for x in leaves]
  key = jax.random.key(3)

  @jax.jit
  def run(xs):
    encs = [C.encode(codec, x.reshape(-1), jax.random.fold_in(key, i)) for i, x in enumerate(xs)]
    return encs, [C.decode(codec, e, x.size) for e, x in zip(encs, xs)]

  encs, decoded = run(leaves)
  payload = C.to_bytes(codec, encs, sizes)
  assert len(payload) == sum(C.leaf_bytes(codec, n) for n in sizes)
  back = C.from_bytes(codec, payload, sizes)
  for b, enc, d, n in zip(back, encs, decoded, sizes):
    assert set(b) == set(enc)
    for k in enc:  # every field survives the bytes bit for bit
      np.testing.assert_array_equal(np.asarray(b[k]).astype(np.float64),
                                    np.asarray(enc[k]).astype(np.float64))
    # float32 rounding of lo + q (hi - lo) / L may differ by an ulp between numpy and XLA
    np.testing.assert_allclose(C.decode_host(codec, b, n), np.asarray(d), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="payload has"):
    C.from_bytes(codec, payload + b"\0", sizes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_quantization_is_unbiased_and_on_the_grid(bits):
  codec = C.parse(f"q{bits}", block=16)
  x = np.random.default_rng(1).normal(size=40).astype(np.float32)
  draws = 4000
  keys = jax.random.split(jax.random.key(0), draws)
  out = np.asarray(jax.jit(jax.vmap(lambda k: C.roundtrip(codec, jnp.asarray(x), k)))(keys),
                   np.float64)
  # numpy reference of the grid: per block of 16, levels lo + j (hi - lo) / (2^b - 1)
  for s in range(0, 40, 16):
    blk = x[s:s + 16].astype(np.float64)
    lo, hi = blk.min(), blk.max()
    d = (hi - lo) / (2 ** bits - 1)
    j = (out[:, s:s + 16] - lo) / d
    np.testing.assert_allclose(j, np.round(j), atol=1e-3)   # on the grid
    # unbiased: mean over draws within 5 standard errors (a value's variance <= d^2 / 4)
    err = np.abs(out[:, s:s + 16].mean(axis=0) - blk)
    assert np.all(err <= 5 * (d / 2) / math.sqrt(draws) + 1e-6), (err.max(), d)
    # and it is not merely rounding to the nearest level: a mid-level value varies
  assert out.std(axis=0).max() > 0


def test_int8_blockwise_error_bound():
  codec = C.parse("int8", block=64)
  rng = np.random.default_rng(2)
  x = (rng.normal(size=1000) * np.repeat(10.0 ** rng.uniform(-3, 2, size=16), 64)[:1000]
       ).astype(np.float32)
  y = np.asarray(jax.jit(lambda v: C.roundtrip(codec, v))(x), np.float64)
  for s in range(0, 1000, 64):
    blk = x[s:s + 64].astype(np.float64)
    scale = np.abs(blk).max() / 127
    assert np.all(np.abs(y[s:s + 64] - blk) <= scale / 2 * (1 + 1e-5) + 1e-12)


def _np_topk_ef(deltas, take, frac):
  """Numpy reference of top-k with error feedback for one site: x = d + e, keep the k largest
  |x|, e <- x - kept when it takes part; returns the decoded updates."""
  e = np.zeros_like(deltas[0])
  out = []
  for d, t in zip(deltas, take):
    x = d + e
    k = max(1, math.ceil(frac * x.size))
    keep = np.zeros_like(x)
    idx = np.argsort(-np.abs(x))[:k]
    keep[idx] = x[idx]
    out.append(keep)
    if t:
      e = x - keep
  return out


def test_error_feedback_matches_numpy_step_by_step():
  codec = C.parse("topk:0.25")
  rng = np.random.default_rng(4)
  deltas = [rng.normal(size=12).astype(np.float32) for _ in range(6)]
  take = [1, 1, 0, 1, 1, 1]
  ref = _np_topk_ef([d.astype(np.float64) for d in deltas], take, 0.25)
  step = jax.jit(lambda d, e, t: C.apply(codec, {"w": d}, {"w": e}, jax.random.key(0),
                                         {"w": 1.0}, t))
  e = jnp.zeros(12)
  for d, t, want in zip(deltas, take, ref):
    y, res = step(d, e, jnp.float32(t))
    np.testing.assert_allclose(np.asarray(y["w"]), want, atol=1e-6)
    e = res["w"]
  assert float(jnp.abs(e).sum()) > 0  # the residual carries what was not sent


def _mesh(n):
  return jax.make_mesh((n,), ("site",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def test_round_aggregates_the_decoded_updates_and_keeps_residuals():
  """Two FedAvg rounds (client sgd, one local step, server sgd(1)) with topk:0.5: the server
  moves by the example-weighted mean of each site's top-k(Delta_k + e_k), numpy reference."""
  S, D, B, lr = 4, 6, 8, 0.3
  rng = np.random.default_rng(5)
  data = {"x": rng.normal(size=(S, 1, B, D)).astype(np.float32),
          "y": rng.normal(size=(S, 1, B)).astype(np.float32)}
  loss = lambda p, b, key=None: 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
  codec = C.parse("topk:0.5")
  mesh = _mesh(S)
  server, clients = fed.init({"w": jnp.zeros(D)}, optax.sgd(1.0), optax.sgd(lr), mesh,
                             error_feedback=True)
  round_fn = fed.make_round(loss, optax.sgd(lr), optax.sgd(1.0), mesh, local_steps=1,
                            codec=codec)
  n = np.array([1.0, 2.0, 3.0, 4.0])
  w = np.zeros(D)
  e = np.zeros((S, D))
  for _ in range(2):
    server, clients, _ = round_fn(server, clients, data, n, np.ones(S))
    agg = np.zeros(D)
    for k in range(S):
      x, y = data["x"][k, 0].astype(np.float64), data["y"][k, 0].astype(np.float64)
      delta = lr * x.T @ (x @ w - y) / B
      (kept,) = _np_topk_ef([delta + e[k]], [1], 0.5)
      e[k] = delta + e[k] - kept
      agg += n[k] / n.sum() * kept
    w = w - agg
    np.testing.assert_allclose(np.asarray(server.params["w"]), w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(clients.residual["w"]), e, atol=1e-5)


def test_residuals_are_checkpointed_and_restored(tmp_path):
  """The job's checkpoint tree holds every site's residual (with error feedback) and restores
  it onto its sharding; without error feedback the tree has no residual entry."""
  from jmtl.federated import loop
  from jmtl.train import checkpoint as checkpoint_lib
  mesh = _mesh(4)
  params = {"w": jnp.zeros(6), "b": jnp.zeros(())}
  server, clients = fed.init(params, optax.sgd(1.0), optax.sgd(0.1), mesh, error_feedback=True)
  res = jax.tree.map(lambda e: e + jnp.arange(e.size, dtype=jnp.float32).reshape(e.shape),
                     clients.residual)
  clients = clients._replace(residual=res)
  tree = loop.checkpoint_tree(server, clients)
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ck")
  ckpt.save(1, tree, {}, {})
  ckpt.wait()
  sh = jax.tree.map(lambda x: x.sharding, tree)
  step, back, _, _ = ckpt.restore_latest(checkpoint_lib.abstract_like(tree, sh))
  ckpt.close()
  restored = fed.ClientState(**back["clients"])
  assert step == 1
  for a, b in zip(jax.tree.leaves(restored.residual), jax.tree.leaves(res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.spec == b.sharding.spec
  _, plain = fed.init(params, optax.sgd(1.0), optax.sgd(0.1), mesh)
  assert plain.residual is None and "residual" not in loop.checkpoint_tree(server, plain)["clients"]


@pytest.mark.parametrize("spec", ["q2", "int8", "bf16"])
def test_quantized_round_is_fedavg_within_the_quantization_step(spec):
  """Inside the round (per site, shard_map): the server update differs from FedAvg's by at
  most the largest quantization step of any site (weights sum to 1)."""
  S, D, B, lr = 4, 40, 8, 0.3
  rng = np.random.default_rng(6)
  data = {"x": rng.normal(size=(S, 1, B, D)).astype(np.float32),
          "y": rng.normal(size=(S, 1, B)).astype(np.float32)}
  loss = lambda p, b, key=None: 0.5 * jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
  mesh = _mesh(S)
  server, clients = fed.init({"w": jnp.zeros(D)}, optax.sgd(1.0), optax.sgd(lr), mesh)
  round_fn = fed.make_round(loss, optax.sgd(lr), optax.sgd(1.0), mesh, local_steps=1,
                            codec=C.parse(spec, block=16))
  n = np.array([1.0, 2.0, 3.0, 4.0])
  server, _, _ = round_fn(server, clients, data, n, np.ones(S))
  deltas = [lr * data["x"][k, 0].T.astype(np.float64) @ (-data["y"][k, 0]) / B for k in range(S)]
  fedavg = -sum(n[k] / n.sum() * deltas[k] for k in range(S))
  step = {"q2": lambda d: (d.max() - d.min()) / 3, "int8": lambda d: np.abs(d).max() / 127,
          "bf16": lambda d: np.abs(d).max() / 128}[spec]
  bound = max(step(d[s:s + 16]) for d in deltas for s in range(0, D, 16))
  err = np.abs(np.asarray(server.params["w"]) - fedavg)
  assert 0 < err.max() <= bound * (1 + 1e-4)
