"""Cloud TPU generations and slice names: the one table `jmtl compile --topology` and
launch/tpu_vm.py both read.

Standard library only and no jmtl imports: launch/ loads this file by path without importing
jmtl or jax.

A slice name is GEN-N. GEN is the generation as Google Cloud's TPU pages name it (v4, v5e, v5p,
v6e) or as `gcloud --accelerator-type` spells it (v5litepod for v5e; the others are the same),
so `v5e-16` and `v5litepod-16` are one slice. N counts TensorCores for v4 and v5p (two per chip,
so `v4-32` is 16 chips) and chips for v5e and v6e. Sources: the Cloud TPU documentation's v4,
v5e, v5p and v6e pages ("supported configurations", HBM per chip, runtime versions).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30

# Chip grids of the slice sizes Cloud TPU offers (the same names MaxText's
# accelerator_to_spec_map uses).
GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
           256: (16, 16)}
GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
           128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Generation:
  """One Cloud TPU generation.

  name: the documentation's name (v5e); gcloud: the --accelerator-type prefix (v5litepod);
  prefix: libtpu's topology prefix ("v5e:4x4"); hbm_bytes: HBM per chip; cores_in_name:
  TensorCores per chip that the slice name counts; chip_config: "megacore" (two cores = one JAX
  device) or "default"; shapes: chips -> chip grid; runtime: the default TPU VM software version.
  """
  name: str
  gcloud: str
  prefix: str
  hbm_bytes: int
  cores_in_name: int
  chip_config: str
  shapes: dict[int, tuple[int, ...]]
  runtime: str


# HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB.
GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("v4", "v4", "v4", 32 * GIB, 2, "megacore", GRID_3D, "tpu-ubuntu2204-base"),
    Generation("v5e", "v5litepod", "v5e", 16 * GIB, 1, "default", GRID_2D, "v2-alpha-tpuv5-lite"),
    Generation("v5p", "v5p", "v5", 95 * GIB, 2, "megacore", GRID_3D, "v2-alpha-tpuv5"),
    Generation("v6e", "v6e", "v6e", 32 * GIB, 1, "default", GRID_2D, "v2-alpha-tpuv6e"),
)}
# Every spelling of a generation -> its documentation name.
SPELLINGS: dict[str, str] = {**{g.name: g.name for g in GENERATIONS.values()},
                             **{g.gcloud: g.name for g in GENERATIONS.values()}}


def known() -> str:
  """The generations for a message: "v4, v5e (or v5litepod), v5p, v6e"."""
  return ", ".join(g.name + (f" (or {g.gcloud})" if g.gcloud != g.name else "")
                   for g in GENERATIONS.values())


def slice_names(gen: Generation) -> list[str]:
  """Every slice name of `gen` (documentation spelling), smallest first."""
  return [f"{gen.name}-{c * gen.cores_in_name}" for c in sorted(gen.shapes)]


def parse(name: str) -> tuple[Generation, int]:
  """(generation, chips) of a slice name in either spelling ("v5e-16", "v5litepod-16").

  Raises ValueError with one line: "unknown accelerator type ..." for a generation not in the
  table or a name that is not GEN-N; "no such <gen> slice ..." with the known sizes for a size
  that generation does not come in.
  """
  gen_name, _, count = name.rpartition("-")
  if gen_name not in SPELLINGS or not count.isdigit():
    raise ValueError(f"unknown accelerator type {name!r}: want GEN-N with GEN one of {known()} "
                     f"(e.g. v5e-16 = v5litepod-16, v4-32, v5p-8, v6e-8)")
  gen = GENERATIONS[SPELLINGS[gen_name]]
  chips, rem = divmod(int(count), gen.cores_in_name)
  if rem or chips not in gen.shapes:
    raise ValueError(f"{name!r}: no such {gen.name} slice; known sizes: "
                     f"{', '.join(slice_names(gen))}")
  return gen, chips


def gcloud_name(name: str) -> str:
  """The --accelerator-type gcloud takes for a slice name in either spelling (v5e-16 ->
  v5litepod-16). Raises ValueError as `parse` does."""
  gen, _ = parse(name)
  return f"{gen.gcloud}-{name.rpartition('-')[2]}"
