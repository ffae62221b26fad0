"""Logical-axis sharding: one rules table maps logical axis names to mesh axes.

`config.mesh.rules` is a tuple of `(logical_name, mesh_axes)` where `mesh_axes` is a mesh axis
name, a tuple of them, or None (replicated) -- the T5X / MaxText convention. Parameters carry
their logical names in the `out_sharding` metadata set by `nnx.with_partitioning`.

Rule for a parameter dimension of size `n` whose logical name maps to mesh axes `(a1, ..., ak)`:
the dimension is split over the longest prefix `(a1, ..., aj)` whose size product divides `n`
and whose axes are not already used by an earlier dimension of the same parameter. Dropped axes
mean that (part of) the dimension is replicated; this is logged as a warning naming the
parameter. Replication is always correct and only costs memory, and the sizes that trigger it
(a trained tokenizer's vocabulary, a task's label count) come from data, not from the user, so a
hard error would make valid runs fail. Pass `strict=True` to get a ValueError instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_log = logging.getLogger(__name__)


def rules_table(rules: Rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
  """Validates `rules` against `mesh`; returns {logical_name: (mesh_axis, ...)} (() = replicated).

  Raises ValueError naming the rule for a malformed rule, a duplicate logical name, or a mesh
  axis that the mesh does not have.
  """
  table: dict[str, tuple[str, ...]] = {}
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"mesh.rules[{i}] = {rule!r}: each rule must be (logical_name, mesh_axes).")
    name, target = rule
    if target is None:
      axes: tuple[str, ...] = ()
    elif isinstance(target, str):
      axes = (target,)
    elif isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target):
      axes = tuple(target)
    else:
      raise ValueError(
          f"mesh.rules[{i}] = {rule!r}: mesh_axes must be a mesh axis name, a tuple of them or None.")
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise ValueError(
          f"mesh.rules[{i}] = {rule!r} names unknown mesh axis {unknown[0]!r}; the mesh axes are "
          f"{tuple(mesh.axis_names)}.")
    if len(set(axes)) != len(axes):
      raise ValueError(f"mesh.rules[{i}] = {rule!r} repeats a mesh axis.")
    if name in table:
      raise ValueError(f"mesh.rules[{i}] = {rule!r}: logical axis {name!r} has two rules.")
    table[name] = axes
  return table


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh: Mesh, *, name: str = "array", strict: bool = False) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dimensions have the given logical names.

  A None logical name is replicated; a name missing from `rules` is a ValueError. See the module
  docstring for the divisibility rule (`strict=True` turns fallbacks into errors).
  """
  table = rules_table(rules, mesh)
  if len(logical_axes) != len(shape):
    raise ValueError(
        f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of rank "
        f"{len(shape)} (shape {tuple(shape)}).")
  used: set[str] = set()
  spec: list[Any] = []
  for dim, (logical, size) in enumerate(zip(logical_axes, shape)):
    if logical is None:
      spec.append(None)
      continue
    if logical not in table:
      raise ValueError(
          f"{name}: logical axis {logical!r} has no rule in mesh.rules (known: {sorted(table)}).")
    wanted = table[logical]
    kept: list[str] = []
    for axis in wanted:
      if axis in used or size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        break
      kept.append(axis)
    if len(kept) != len(wanted):
      why = (f"dimension {dim} ({logical!r}, size {size}) cannot be split over mesh axes "
             f"{wanted} of sizes {tuple(mesh.shape[a] for a in wanted)}")
      if strict:
        raise ValueError(f"{name}: {why} (size not divisible or axis already used).")
      _log.warning("%s: %s; using %s (the rest is replicated).", name, why, tuple(kept) or None)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def variable_logical_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names stored by `nnx.with_partitioning` on `v` (None when unannotated)."""
  axes = v.get_metadata().get("out_sharding")
  return tuple(axes) if axes else None


def _path_name(path: Sequence[Any]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules, *, strict: bool = False) -> Any:
  """NamedShardings for every array in `tree` (same structure, Variables kept as Variables).

  Variables annotated with logical axes get the rule-table spec; every other array (optimizer
  counts, rng keys, unannotated variables) is replicated. Works on concrete or abstract trees
  (e.g. from `jax.eval_shape`), including optimizer states whose leaves are `nnx.Param`s.
  """
  def one(path, x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      axes = variable_logical_axes(x)
      if axes is None or not hasattr(value, "shape"):
        return x.replace(replicated(mesh))
      spec = logical_to_spec(axes, value.shape, rules, mesh, name=_path_name(path), strict=strict)
      return x.replace(NamedSharding(mesh, spec))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharding_problems(tree: Any, mesh: Mesh, rules: Rules) -> list[str]:
  """Every annotated array dimension of `tree` that its rule cannot split (one line each).

  The strict form of `tree_shardings`: instead of replicating a dimension whose size does not
  divide over the mesh axes of its rule (or whose axis an earlier dimension already uses), each
  such dimension gives one line naming the parameter path, the dimension, its logical name and
  size and the mesh axes with their sizes. An empty list means every rule divides. `mesh` may be
  an `AbstractMesh` (a target topology); works on abstract trees from `jax.eval_shape`.
  """
  problems: list[str] = []

  def one(path, x):
    if isinstance(x, nnx.Variable):
      axes, value = variable_logical_axes(x), x.get_value()
      if axes is not None and hasattr(value, "shape"):
        try:
          logical_to_spec(axes, value.shape, rules, mesh, name=_path_name(path), strict=True)
        except ValueError as e:
          problems.append(str(e))
    return x

  jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return problems


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of batch arrays: leading dimension over the mesh axes of the `batch` rule."""
  table = rules_table(rules, mesh)
  if "batch" not in table:
    raise ValueError("mesh.rules has no rule for the logical axis 'batch'.")
  axes = table["batch"]
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many pieces the batch dimension is split into (rows must be a multiple of this)."""
  return math.prod(mesh.shape[a] for a in rules_table(rules, mesh).get("batch", ()))


def check_batch(batch: Mapping[str, Mapping[str, Any]], mesh: Mesh, rules: Rules) -> None:
  """Raises ValueError naming the task when its row count does not split over the batch axes."""
  n = batch_shards(mesh, rules)
  for task, arrays in batch.items():
    for key, x in arrays.items():
      rows = x.shape[0] if getattr(x, "ndim", 0) else None
      if rows is None or rows % n:
        raise ValueError(
            f"batch[{task!r}][{key!r}] has shape {getattr(x, 'shape', None)}: the leading (batch) "
            f"dimension must be a multiple of {n}, the product of the mesh axes of the 'batch' "
            "rule (data.batch_size and each task's rows must divide evenly).")


def bytes_per_device(tree: Any, shardings: Any = None) -> int:
  """Bytes one device holds of `tree`: the sum over leaves of prod(shard shape) x itemsize.

  `tree` holds arrays or ShapeDtypeStructs; `shardings` mirrors it (default: each leaf's own
  `.sharding`). Every shard of a NamedSharding has the same shape, so this is the bytes of
  each device (a replicated leaf counts in full on every device).
  """
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, tree)
  sizes = jax.tree.map(
      lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
      tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))
