"""Meshes from config and the logical-axis rules table (8 fake CPU devices)."""

import jax
import ml_collections
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib


def _cfg(data, fsdp, tensor):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("sizes,expected", [
    ((-1, 1, 1), (8, 1, 1)), ((1, -1, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)), ((-1, 2, 2), (2, 2, 2))])
def test_make_mesh_shapes(sizes, expected):
  mesh = mesh_lib.make_mesh(_cfg(*sizes))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_device_subset():
  mesh = mesh_lib.make_mesh(_cfg(1, 1, 1), devices=jax.devices()[:1])
  assert mesh.devices.size == 1


@pytest.mark.parametrize("sizes,fragment", [
    ((3, 1, 1), "multiply to 3 but there are 8 devices"),
    ((2, 2, 1), "multiply to 4 but there are 8 devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((-1, 3, 1), "does not divide the 8 available devices"),
    ((0, 8, 1), "positive or -1")])
def test_make_mesh_errors_name_the_keys(sizes, fragment):
  with pytest.raises(ValueError) as err:
    mesh_lib.make_mesh(_cfg(*sizes))
  assert "mesh.data/fsdp/tensor" in str(err.value) and str(sizes) in str(err.value)
  assert fragment in str(err.value)


@pytest.fixture(scope="module")
def mesh222():
  return mesh_lib.make_mesh(_cfg(2, 2, 2))


RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("vocab", "tensor"), ("labels", None), ("both", ("fsdp", "tensor")))


def test_rules_unknown_mesh_axis_names_the_rule(mesh222):
  with pytest.raises(ValueError, match=r"mesh.rules\[1\] = \('mlp', 'model'\).*'model'"):
    sharding_lib.rules_table((("embed", "fsdp"), ("mlp", "model")), mesh222)


@pytest.mark.parametrize("bad", [(("embed",),), (("embed", 3),), (("embed", "fsdp"), ("embed", None))])
def test_rules_malformed(mesh222, bad):
  with pytest.raises(ValueError, match="mesh.rules"):
    sharding_lib.rules_table(bad, mesh222)


def test_logical_to_spec_by_hand(mesh222):
  spec = lambda axes, shape: sharding_lib.logical_to_spec(axes, shape, RULES, mesh222)
  assert spec(("embed", "mlp"), (64, 128)) == P("fsdp", "tensor")
  assert spec(("vocab", "embed"), (128, 64)) == P("tensor", "fsdp")
  assert spec(("embed", "labels"), (64, 3)) == P("fsdp")
  assert spec((None, "mlp"), (5, 8)) == P(None, "tensor")
  assert spec(("both",), (8,)) == P(("fsdp", "tensor"))
  assert spec(("batch", None), (8, 16)) == P(("data", "fsdp"))


def test_logical_to_spec_fallback_and_strict(mesh222, caplog):
  # 3 is not divisible by tensor=2: that dimension is replicated, with a warning naming it.
  with caplog.at_level("WARNING"):
    got = sharding_lib.logical_to_spec(("vocab", "embed"), (3, 64), RULES, mesh222, name="emb")
  assert got == P(None, "fsdp")
  assert "emb" in caplog.text and "size 3" in caplog.text
  # ("fsdp","tensor") over a dimension of 6: keeps the prefix ("fsdp",) that divides it.
  assert sharding_lib.logical_to_spec(("both",), (6,), RULES, mesh222) == P("fsdp")
  # An axis already used by an earlier dimension is not used twice.
  assert sharding_lib.logical_to_spec(("embed", "both"), (4, 4), RULES, mesh222) == P("fsdp")
  with pytest.raises(ValueError, match="layer0/kernel: dimension 0 \\('vocab', size 3\\)"):
    sharding_lib.logical_to_spec(("vocab", "embed"), (3, 64), RULES, mesh222,
                                 name="layer0/kernel", strict=True)


def test_logical_to_spec_unknown_logical_axis(mesh222):
  with pytest.raises(ValueError, match="w: logical axis 'heads' has no rule"):
    sharding_lib.logical_to_spec(("heads",), (8,), RULES, mesh222, name="w")
  with pytest.raises(ValueError, match="rank 1"):
    sharding_lib.logical_to_spec(("embed", "mlp"), (8,), RULES, mesh222, name="w")


def test_batch_sharding_and_check(mesh222):
  assert sharding_lib.batch_sharding(mesh222, RULES).spec == P(("data", "fsdp"))
  assert sharding_lib.batch_shards(mesh222, RULES) == 4
  assert sharding_lib.replicated(mesh222).spec == P()
  import numpy as np
  sharding_lib.check_batch({"sst2": {"input_ids": np.zeros((8, 4))}}, mesh222, RULES)
  with pytest.raises(ValueError, match=r"batch\['sst2'\]\['labels'\].*multiple of 4"):
    sharding_lib.check_batch({"sst2": {"labels": np.zeros((6,))}}, mesh222, RULES)
  with pytest.raises(ValueError, match="no rule for the logical axis 'batch'"):
    sharding_lib.batch_sharding(mesh222, (("embed", "fsdp"),))
