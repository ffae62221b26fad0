"""The federated round on the real multi-task model: with one local SGD step, equal sites and a
FedAvg server, a round is exactly one centralised train step (`jmtl.train.step`) on the
concatenated batch (the mean of equal-size site means is the mean over all rows), so the
trainer's own step is the reference."""

import jax
import numpy as np

from jmtl import optim
from jmtl.config import load_config_file
from jmtl.federated import algorithm
from jmtl.federated import loop as fed_loop
from jmtl.model.multitask import HeadSpec
from jmtl.parallel import mesh as mesh_lib
from jmtl.train import state as state_lib
from jmtl.train import step as step_lib
from flax import nnx

import pathlib

TINY = pathlib.Path(__file__).resolve().parent / "configs" / "tiny_fed.py"
S, B, L, V = 4, 4, 16, 64


def _batch(rng, rows):
  ids = rng.integers(5, V, size=(rows, L)).astype(np.int32)
  return {"bbc_topic": {"input_ids": ids, "segment_ids": np.zeros_like(ids),
                        "attention_mask": np.ones_like(ids),
                        "labels": rng.integers(0, 5, rows).astype(np.int32),
                        "example_weight": np.ones(rows, np.float32),
                        "index": np.arange(rows, dtype=np.int32)}}


def test_one_local_sgd_step_fedavg_round_equals_one_centralised_train_step():
  cfg = load_config_file(TINY)
  cfg.tasks = ("bbc_topic",)
  cfg.model.dropout = cfg.model.attention_dropout = 0.0
  cfg.optim.name, cfg.optim.lr, cfg.optim.grad_clip = "sgd", 0.5, 0.0
  cfg.fed.client_optimizer, cfg.fed.client_lr = "sgd", 0.5
  cfg.fed.server_optimizer, cfg.fed.server_lr, cfg.fed.local_steps = "sgd", 1.0, 1
  specs = {"bbc_topic": HeadSpec("classification", 5)}
  rng = np.random.default_rng(0)
  sites = [_batch(rng, B) for _ in range(S)]

  # Reference: the trainer's step on a plain (data=8) mesh over all 4 x B rows.
  mesh = mesh_lib.make_mesh(cfg.mesh)
  tx = optim.build(cfg.optim, 10)
  state, graphdef, shardings = state_lib.create_train_state(cfg, specs, V, tx, mesh)
  start = jax.tree.map(np.asarray, state.params)
  step = step_lib.make_train_step(graphdef, tx, {"bbc_topic": "classification"}, cfg,
                                  shardings, mesh)
  whole = jax.tree.map(lambda *xs: np.concatenate(xs), *sites)
  state, _ = step(state, whole)
  want = jax.tree.map(np.asarray, state.params)

  # Federated: 4 sites x 2 devices, one local step each, FedAvg.
  fmesh = mesh_lib.make_site_mesh(cfg.mesh, S, 2)
  client_tx, server_tx = fed_loop.build_optimizers(cfg)
  fstate, fgraph, fsh = state_lib.create_train_state(cfg, specs, V, client_tx, fmesh)
  np.testing.assert_array_equal(jax.tree.leaves(jax.tree.map(np.asarray, fstate.params))[0],
                                jax.tree.leaves(start)[0])  # same initialisation
  server, clients = algorithm.init(fstate.params, server_tx, client_tx, fmesh,
                                   param_shardings=fsh.params)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  rest = fstate.rest

  def loss_fn(params, batch, key):
    with nnx.logical_axis_rules(rules):
      per_task, _ = step_lib.task_losses(fgraph, params, rest, batch,
                                         {"bbc_topic": "classification"}, 0.0,
                                         nnx.Rngs(dropout=key), step_lib._default_task_loss())
    return sum(per_task.values())

  round_fn = algorithm.make_round(loss_fn, client_tx, server_tx, fmesh, local_steps=1,
                                  groups=fed_loop.param_groups(server.params, ["bbc_topic"]))
  stacked = jax.tree.map(lambda *xs: np.stack(xs)[:, None], *sites)
  server, clients, m = round_fn(server, clients, stacked, np.full(S, float(B)), np.ones(S),
                                np.ones((S, 2), np.float32))
  got = jax.tree.map(np.asarray, server.params)
  for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(start)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  moved = sum(float(np.abs(w - s).sum()) for w, s in zip(jax.tree.leaves(want),
                                                          jax.tree.leaves(start)))
  assert moved > 1e-2
