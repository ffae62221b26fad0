"""The train state (a plain pytree) and its creation directly sharded over a mesh."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmtl import optim
from jmtl.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  step: int32 scalar, the number of batches processed (advances on skipped updates too).
  params: nnx.State of `nnx.Param` (the trainable weights).
  rest: nnx.State of the remaining model variables (may be empty).
  opt_state: the optimizer state for `params`.
  rng: a typed JAX PRNG key; step t uses `fold_in(rng, t)` for dropout.
  mtl: the task-balancing state of `jmtl.mtl` (a dict of small replicated arrays: learned
    task weights, their Adam moments, DWA's loss history; {} for stateless weightings).
  """
  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  rng: jax.Array
  mtl: Any = flax.struct.field(default_factory=dict)


def abstract_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], seed: int,
                         tx: optax.GradientTransformation, mesh: Mesh | AbstractMesh,
                         rules: sharding_lib.Rules, *, strict: bool = False,
                         mtl_init: Callable[[], Any] = dict,
                         ) -> tuple[TrainState, nnx.GraphDef, TrainState, Callable[[], TrainState]]:
  """The state's shapes and shardings without allocating it: `jax.eval_shape` of the init.

  `mesh` may be an `AbstractMesh` (a target topology with no devices here: `jmtl compile`).
  Returns (abstract state of `jax.ShapeDtypeStruct` leaves, graphdef, state_shardings, init)
  where `init()` builds the concrete state (for a jit with `out_shardings=state_shardings`).
  The sharding rules are those of `init_train_state`.
  """
  tx = optax.with_extra_args_support(tx)
  graphdefs: list[nnx.GraphDef] = []
  params_key, rng = jax.random.split(jax.random.key(seed))

  def init() -> TrainState:
    model = model_fn(nnx.Rngs(params_key))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    graphdefs.append(graphdef)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=tx.init(params), rng=rng, mtl=mtl_init())

  with nnx.use_eager_sharding(False), jax.sharding.use_abstract_mesh(_abstract(mesh)), \
      nnx.logical_axis_rules(tuple(rules)):
    abstract = jax.eval_shape(init)
  shardings = _state_shardings(abstract, tx, mesh, rules, strict)
  return abstract, graphdefs[-1], shardings, init


def _abstract(mesh: Mesh | AbstractMesh) -> AbstractMesh:
  return mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh


def init_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], seed: int,
                     tx: optax.GradientTransformation, mesh: Mesh, rules: sharding_lib.Rules,
                     *, strict: bool = False, mtl_init: Callable[[], Any] = dict,
                     ) -> tuple[TrainState, nnx.GraphDef, TrainState]:
  """Creates the state sharded by the logical-axis `rules`, without a host or single-device copy.

  `jax.eval_shape` of the init gives the abstract state and its logical axes; their
  NamedShardings (`tree_shardings`) become the `out_shardings` of the jitted init, so every
  device materialises only its own shards. Optimizer state leaves with their parameter's shape
  (moments) take that parameter's sharding, leaves broadcast over some of its axes (block_nu's
  per-neuron second moment) its sharding on the other axes, and every other leaf (counts,
  Adafactor's factored row and column statistics) is replicated (`like_param`). `mtl_init()`
  gives the task-balancing state (`jmtl.mtl`), replicated. Returns (state, graphdef,
  state_shardings).
  """
  _, graphdef, shardings, init = abstract_train_state(model_fn, seed, tx, mesh, rules,
                                                      strict=strict, mtl_init=mtl_init)
  # Variables are placed by our out_shardings, not by flax's eager sharding, so that the
  # divisibility fallback of `jmtl.parallel.sharding` applies and merges stay constraint-free.
  with nnx.use_eager_sharding(False), jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    state = jax.jit(init, out_shardings=shardings)()
  return state, graphdef, shardings


def _state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: Mesh,
                     rules: sharding_lib.Rules, strict: bool) -> TrainState:
  """NamedShardings for `abstract` (see `init_train_state` for the optimizer state rule)."""
  rep = sharding_lib.replicated(mesh)
  params = sharding_lib.tree_shardings(abstract.params, mesh, rules, strict=strict)
  rest = sharding_lib.tree_shardings(abstract.rest, mesh, rules, strict=strict)
  opt_state = optax.tree_map_params(tx, lambda s, p, sh: like_param(s.shape, p.shape, sh, mesh),
                                    abstract.opt_state, abstract.params, params,
                                    transform_non_params=lambda s: rep)
  mtl = jax.tree.map(lambda _: rep, abstract.mtl)
  return TrainState(step=rep, params=params, rest=rest, opt_state=opt_state, rng=rep, mtl=mtl)


def like_param(shape: tuple[int, ...], param_shape: tuple[int, ...],
               param_sharding: NamedSharding, mesh: Mesh) -> NamedSharding:
  """The sharding of an optimizer-state leaf of `shape` kept for a parameter.

  Same shape: the parameter's sharding. Same rank with every axis either the parameter's size
  or 1 (a statistic broadcast over some axes, e.g. one second moment per output neuron): the
  parameter's mesh axes on the kept axes, none on the size-1 ones. Anything else (Adafactor's
  factored rows / columns, counts): replicated.
  """
  if tuple(shape) == tuple(param_shape):
    return param_sharding
  axes = optim.broadcast_axes(shape, param_shape)
  if axes is not None:
    spec = tuple(param_sharding.spec) + (None,) * (len(shape) - len(param_sharding.spec))
    kept = [None if i in axes else ax for i, ax in enumerate(spec)]
    while kept and kept[-1] is None:  # P(None, None) is written P()
      kept.pop()
    return NamedSharding(mesh, P(*kept))
  return sharding_lib.replicated(mesh)


def create_train_state(config: Any, head_specs: Mapping[str, Any], vocab_size: int,
                       tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[TrainState, nnx.GraphDef, TrainState]:
  """Builds `MultiTaskModel(config.model, vocab_size, head_specs)` and its optimizer state, sharded.

  Seeds come from `config.seed`; the sharding rules from `config.mesh.rules`; the
  task-balancing state from `config.mtl` (`jmtl.mtl.build`). Returns
  (state, graphdef, state_shardings); `state_shardings` mirrors `state` with NamedShardings.
  """
  from jmtl import mtl as mtl_lib  # pylint: disable=import-outside-toplevel
  from jmtl.model.multitask import MultiTaskModel  # pylint: disable=import-outside-toplevel

  def model_fn(rngs: nnx.Rngs) -> nnx.Module:
    return MultiTaskModel(config.model, vocab_size, head_specs, rngs=rngs)

  balancing = mtl_lib.build(config.mtl, list(head_specs))
  return init_train_state(model_fn, int(config.seed), tx, mesh, config.mesh.rules,
                          mtl_init=balancing.weighting.init)
