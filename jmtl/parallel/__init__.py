"""jmtl.parallel: device meshes from the config and logical-axis sharding rules."""

from jmtl.parallel.mesh import MESH_AXES, make_mesh
from jmtl.parallel.sharding import (batch_sharding, batch_shards, check_batch, logical_to_spec,
                                    replicated, rules_table, tree_shardings)

__all__ = ["MESH_AXES", "make_mesh", "batch_sharding", "batch_shards", "check_batch",
           "logical_to_spec", "replicated", "rules_table", "tree_shardings"]
