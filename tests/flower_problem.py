"""The tiny Problem of tests/test_flower.py: least squares on D features, every site's batches
drawn from (seed, site, round) so every process (the test, the ServerApp, each ClientApp) builds
the same numbers. Run config keys: algo ("fedavg": client sgd(0.2), server sgd(1.0); "diloco":
client adamw(0.05) whose state each site keeps, server nesterov(0.7, 0.9), both from
jmtl.optim.build), local-steps, rounds, sites ("a,b,..."), compress (a `fed.compress` spec;
absent or "" = raw float32 payloads), aggregator (fed.aggregator: fedavg, dynamic, gradient,
median, trimmed_mean, krum; absent = fedavg), temperature, trim, byzantine-f, krum-m
(fed.temperature, fed.trim, fed.byzantine_f, fed.krum_m), dp-clip, dp-z, dp-delta (fed.dp.*:
DP-FedAvg with sampling rate m / S; absent or dp-clip 0 = off), participation
(fed.participation; absent = 1), mode, buffer-size (fed.mode, fed.buffer_size: "async" runs
FedBuff, jmtl.federated.flower_async; absent = "sync", 1)."""

import jax.numpy as jnp
import numpy as np

from jmtl import optim
from jmtl.defaults import base_config
from jmtl.federated import compression
from jmtl.federated import privacy
from jmtl.federated.flower import Problem

D, B = 5, 8


def loss_fn(p, b, key=None):
  z = b["x"] @ p["w"] + p["b"]
  return 0.5 * jnp.mean(jnp.square(z - b["y"]))


def site_batches(seed, k, r, steps):
  """Site k's [H, B, D] inputs and [H, B] targets of round r, and its example count."""
  rng = np.random.default_rng([seed, k, r])
  w_true = np.random.default_rng(seed).normal(size=D)
  x = rng.normal(size=(steps, B, D)) + 0.5 * k
  y = x @ w_true + 0.3 * rng.normal(size=(steps, B))
  return {"x": x.astype(np.float32), "y": y.astype(np.float32)}, float(10 * (k + 1))


def optimizers(algo, rounds, steps):
  client, server = base_config().optim, base_config().optim
  client.schedule = server.schedule = "constant"
  client.warmup_steps = server.warmup_steps = 0
  client.grad_clip = server.grad_clip = 0.0
  client.weight_decay = server.weight_decay = 0.0
  if algo == "fedavg":
    client.name, client.lr, server.name, server.lr = "sgd", 0.2, "sgd", 1.0
  else:
    client.name, client.lr, client.weight_decay = "adamw", 0.05, 0.01
    server.name, server.lr, server.momentum = "nesterov", 0.7, 0.9
  return optim.build(client, rounds * steps), optim.build(server, rounds)


def make(run_config):
  steps, rounds = int(run_config["local-steps"]), int(run_config["rounds"])
  client_tx, server_tx = optimizers(str(run_config["algo"]), rounds, steps)
  sites = tuple(str(run_config["sites"]).split(","))
  params = {"w": np.zeros(D, np.float32), "b": np.zeros((), np.float32)}
  return Problem(sites=sites, params=params, loss_fn=loss_fn, client_tx=client_tx,
                 server_tx=server_tx, local_steps=steps,
                 batches=lambda k, r: site_batches(0, k, r, steps), seed=0,
                 codec=compression.parse(str(run_config.get("compress", ""))),
                 aggregator=str(run_config.get("aggregator", "fedavg")),
                 temperature=float(run_config.get("temperature", 1.0)),
                 trim=float(run_config.get("trim", 0.1)),
                 byzantine_f=int(run_config.get("byzantine-f", 0)),
                 krum_m=int(run_config.get("krum-m", 0)),
                 dp=(privacy.DPConfig(float(run_config["dp-clip"]), float(run_config["dp-z"]),
                                      float(run_config.get("dp-delta", 1e-5)), _rate(run_config))
                     if float(run_config.get("dp-clip", 0)) > 0 else None),
                 participation=float(run_config.get("participation", 1.0)),
                 mode=str(run_config.get("mode", "sync")),
                 buffer_size=int(run_config.get("buffer-size", 1)))


def _rate(run_config):
  """q = m / S, the sites sampled per round over all sites (`loop.sample_participants`)."""
  S = len(str(run_config["sites"]).split(","))
  return max(1, int(round(float(run_config.get("participation", 1.0)) * S))) / S
