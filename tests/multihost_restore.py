"""One process of the 2-process restore test (tests/test_multihost_restore.py).

  python tests/multihost_restore.py PORT PROCESS_ID DIRECTORY PHASE

PHASE "save": saves steps 1 and 2 of `{"x": arange(8 * COLS).reshape(8, COLS) + 1e4 * step}`
(float32, rows sharded over the 8 devices of both processes; 4 KiB a shard, too large for
Orbax's OCDBT store to inline in its index, so each shard lies in a data file of the process
that wrote it). PHASE "restore": `restore_latest` in a fresh Checkpointer; prints one JSON
line: the step restored and this process's shards of x by first row (or the error).
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jmtl.parallel import distributed
from jmtl.train import checkpoint


COLS = 1024


def main(port: int, pid: int, directory: str, phase: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, PartitionSpec("data"))

  def x(step):
    full = np.arange(8 * COLS, dtype=np.float32).reshape(8, COLS) + 1e4 * step
    return jax.make_array_from_callback((8, COLS), sharding, lambda index: full[index])

  if phase == "save":
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    for step in (1, 2):
      ckpt.save(step, {"x": x(step)}, {"pos": step}, {"step": step})
      ckpt.wait()
    ckpt.close()
    return
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  abstract = {"x": jax.ShapeDtypeStruct((8, COLS), np.float32, sharding=sharding)}
  try:
    step, state, data, meta = ckpt.restore_latest(abstract)
    shards = {str(s.index[0].start): np.asarray(s.data).tolist()
              for s in state["x"].addressable_shards}
    out = {"step": step, "data": data, "meta": meta, "shards": shards}
  except Exception as e:  # noqa: BLE001 - reported to the test
    out = {"error": f"{type(e).__name__}: {e}"}
  ckpt.close()
  distributed.barrier("multihost_restore_done")
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
