"""The jitted, sharded train step and the jitted forward used by evaluation."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jmtl import mtl as mtl_lib
from jmtl.parallel import distributed
from jmtl.parallel import sharding as sharding_lib
from jmtl.train.state import TrainState

Batch = Mapping[str, Mapping[str, Any]]
LossFn = Callable[..., tuple[jax.Array, Any]]


def _all_finite(tree: Any) -> jax.Array:
  """True when every floating-point element of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  """Elementwise `new if ok else old` over matching pytrees (rng keys included)."""
  return jax.tree.map(lambda n, o: jax.lax.select(ok, n, o), new, old)


def _default_task_loss() -> LossFn:
  from jmtl.model.losses import task_loss  # pylint: disable=import-outside-toplevel
  return task_loss


def task_losses(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch,
                kinds: Mapping[str, str], smoothing: float, rngs: nnx.Rngs | None,
                loss_of: LossFn) -> tuple[dict[str, jax.Array], nnx.State]:
  """({task: loss_of(kind_t, model(batch[t], task=t, deterministic=False, rngs), batch[t], ls_t)},
  rest after the forward passes), tasks in sorted order; `ls_t` = `smoothing` for seq2seq tasks,
  else 0. The multi-task loss of one batch before the tasks are combined; shared by the train
  step and the federated client step (`jmtl.federated.loop`)."""
  model = nnx.merge(graphdef, params, rest)
  per_task = {}
  for name in sorted(batch):
    outputs = model(batch[name], task=name, deterministic=False, rngs=rngs)
    ls = smoothing if kinds[name] == "seq2seq" else 0.0
    per_task[name], _ = loss_of(kinds[name], outputs, batch[name], ls)
  _, _, rest = nnx.split(model, nnx.Param, ...)
  return per_task, rest


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    task_kinds: Mapping[str, str], config: Any, state_shardings: TrainState,
                    mesh: Mesh, *, task_loss: LossFn | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `step_fn(state, batch, val_metric, val_count) -> (state, metrics)`.

  loss = sum over the tasks t in `batch` of task_loss(kind_t, model(batch[t], task=t,
  deterministic=False, rngs=Rngs(dropout=fold_in(state.rng, state.step))), batch[t]).
  Label smoothing (`config.model.decoder.label_smoothing`) applies to seq2seq tasks only.
  Update: `tx.update(grads, opt_state, params, val_metric=, val_count=)`, then apply_updates.

  Task balancing (`config.mtl`, `jmtl.mtl`): the gradient is sum_t w_t grad L_t with the
  weights w [k] of `mtl.weighting` (read from `state.mtl`, constants for the gradient), and
  `state.mtl` takes the weighting's update. With a gradient method (`mtl.gradient`) or
  GradNorm, each task's loss and gradient are computed on their own (dropout key
  fold_in(key, task index)); on the shared trunk the gradient is sum_t beta_t w_t grad L_t
  with beta from the Gram matrix of the weighted task gradients, on the heads sum_t w_t
  grad L_t. Those need every task in every batch (ValueError otherwise).

  Non-finite rule: when the loss, any gradient or any updated parameter is not finite, params,
  rest and opt_state are returned unchanged (the optimizer's own step count does not advance)
  but `state.step` still advances by one, so it always counts batches consumed (data position,
  dropout key, logging); metrics then report `nonfinite = skipped = 1`. The trainer decides
  from those whether to halt or go on (`config.train.on_nonfinite`).

  Metrics: `train/loss` (the unweighted sum of the task losses), `train/<task>/loss`,
  `train/<task>/weight` (w_t), with a gradient method `train/<task>/grad_coef` (beta_t, so the
  trunk's coefficient of grad L_t is beta_t w_t), `grad_norm` (global L2 norm of the
  gradients), `nonfinite`, `skipped`. The jitted function is `step_fn.jitted` (in/out shardings from
  `state_shardings` and the `batch` rule, state donated); `step_fn` adds shape checks and
  casts `val_metric` to float32 and `val_count` to int32 so the cache key never changes, and
  with several processes makes them all reach each new executable's first run together
  (`distributed.first_run_sync`); `step_fn.trace_count()` says how many times the step was
  traced (compiled).
  """
  tx = optax.with_extra_args_support(tx)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  smoothing = float(config.model.decoder.label_smoothing)
  kinds = dict(task_kinds)
  loss_of = task_loss if task_loss is not None else _default_task_loss()
  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  rep = sharding_lib.replicated(mesh)

  balancing = mtl_lib.build(config.mtl, list(kinds))
  names = balancing.names

  traces = [0]

  def step(state: TrainState, batch: Batch, val_metric: jax.Array, val_count: jax.Array):
    traces[0] += 1  # Python side effect: runs once per trace (= per compilation)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      dropout_key = jax.random.fold_in(state.rng, state.step)

      def losses_fn(params, tasks, rngs):
        """Per-task losses of `tasks` and the model's non-param state (`task_losses`)."""
        return task_losses(graphdef, params, state.rest, {t: batch[t] for t in tasks}, kinds,
                           smoothing, rngs, loss_of)

      # ---- loss combination and gradients (jmtl.mtl: task weighting, gradient methods)
      present = jnp.array([n in batch for n in names], jnp.float32)
      vec = lambda d: jnp.stack([d[n] if n in d else jnp.zeros((), jnp.float32)  # noqa: E731
                                 for n in names]).astype(jnp.float32)
      w_of = lambda losses: jax.lax.stop_gradient(  # noqa: E731
          balancing.weighting.weights(state.mtl, losses))
      norms, grad_coef = None, {}
      if not balancing.task_grads:
        def loss_fn(params):
          per_task, rest = losses_fn(params, sorted(batch), nnx.Rngs(dropout=dropout_key))
          losses = vec(per_task)
          w = w_of(losses)
          return jnp.sum(w * losses * present), (per_task, rest, losses, w)

        (_, (per_task, rest, losses, w)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
      else:
        # One forward + backward per task (each on its own rows, so the total cost is one
        # joint step's), then the combination in the Gram space of the shared gradients.
        per_task, task_grads = {}, []
        for i, name in enumerate(names):
          def one(params, name=name, i=i):
            out, rest_i = losses_fn(params, [name],
                                    nnx.Rngs(dropout=jax.random.fold_in(dropout_key, i)))
            return out[name], rest_i
          (per_task[name], rest), g = jax.value_and_grad(one, has_aux=True)(state.params)
          task_grads.append(g)
        losses = vec(per_task)
        w = w_of(losses)
        mask = mtl_lib.shared_mask(state.params)
        gram = mtl_lib.gram_matrix(task_grads, mask)  # of the unweighted task gradients
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        beta = mtl_lib.coefficients(balancing, gram * w[:, None] * w[None, :],
                                    jax.random.fold_in(dropout_key, 0x6D746C))
        grads = mtl_lib.combine(task_grads, mask, beta * w, w)
        if balancing.gradient != "none":
          grad_coef = {f"train/{t}/grad_coef": beta[i] for i, t in enumerate(names)}
      loss = sum(per_task.values())

      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     val_metric=val_metric, val_count=val_count)
      params = optax.apply_updates(state.params, updates)
      new_losses = None
      if balancing.weighting.needs_new_losses:  # FAMO: the same batch at the new parameters
        after, _ = losses_fn(params, sorted(batch), nnx.Rngs(dropout=dropout_key))
        new_losses = jax.lax.stop_gradient(vec(after))
      mtl_state = balancing.weighting.update(state.mtl, losses, present, grad_norms=norms,
                                             new_losses=new_losses)
      ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
      new_state = state.replace(
          step=state.step + 1,
          params=_keep_if(ok, params, state.params),
          rest=_keep_if(ok, rest, state.rest),
          opt_state=_keep_if(ok, opt_state, state.opt_state),
          mtl=_keep_if(ok & _all_finite(mtl_state), mtl_state, state.mtl))
      bad = jnp.logical_not(ok).astype(jnp.int32)
      metrics = {"train/loss": loss, "grad_norm": optax.tree.norm(grads),
                 "nonfinite": bad, "skipped": bad}
      metrics.update({f"train/{t}/loss": v for t, v in per_task.items()})
      metrics.update({f"train/{t}/weight": w[i] for i, t in enumerate(names) if t in batch})
      metrics.update(grad_coef)
      return new_state, metrics

  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh, rep, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=0)
  synced = distributed.first_run_sync(jitted, "train_step")

  def step_fn(state: TrainState, batch: Batch, val_metric: Any = 0.0, val_count: Any = 0):
    unknown = sorted(set(batch) - set(kinds))
    if unknown:
      raise KeyError(f"batch has tasks {unknown} that are not in task_kinds {sorted(kinds)}.")
    if balancing.task_grads and len(batch) != len(kinds):
      raise ValueError(f"mtl.gradient = {balancing.gradient!r} / mtl.weighting = "
                       f"{balancing.weighting.name!r} need every task in every batch "
                       f"(data.mixing = 'mixed'); this batch has {sorted(batch)}")
    sharding_lib.check_batch(batch, mesh, rules)
    return synced(state, batch, jnp.asarray(val_metric, jnp.float32),
                  jnp.asarray(val_count, jnp.int32))

  step_fn.jitted = jitted  # type: ignore[attr-defined]
  step_fn.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
  return step_fn


def make_predict_fn(graphdef: nnx.GraphDef, config: Any, state_shardings: TrainState,
                    mesh: Mesh) -> Callable[..., dict[str, jax.Array]]:
  """Returns `fn(params, rest, task_batch, task) -> outputs`, the jitted deterministic forward.

  `task` is static (one compilation per task and batch shape); the batch is sharded by the
  `batch` rule (its rows must be a multiple of the batch shards: ValueError otherwise),
  parameters as in `state_shardings`. With several processes, each new executable's first run
  waits for every process (`distributed.first_run_sync`). The jitted function is `fn.jitted`.
  """
  rules = tuple(tuple(r) for r in config.mesh.rules)
  batch_sh = sharding_lib.batch_sharding(mesh, rules)

  def predict(params: nnx.State, rest: nnx.State, task_batch: Mapping[str, Any], task: str):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      model = nnx.merge(graphdef, params, rest)
      return model(task_batch, task=task, deterministic=True, rngs=None)

  jitted = jax.jit(predict, static_argnums=3,
                   in_shardings=(state_shardings.params, state_shardings.rest, batch_sh))
  synced = distributed.first_run_sync(jitted, "predict")

  def predict_fn(params: nnx.State, rest: nnx.State, task_batch: Mapping[str, Any],
                 task: str) -> dict[str, jax.Array]:
    sharding_lib.check_batch({task: task_batch}, mesh, rules)
    return synced(params, rest, task_batch, task)

  predict_fn.jitted = jitted  # type: ignore[attr-defined]
  return predict_fn
