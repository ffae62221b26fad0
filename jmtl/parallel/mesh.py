"""Device meshes from the config: axes ("data", "fsdp", "tensor"), all `AxisType.Auto`; a
federated run puts `site` outermost: ("site", "data", "fsdp", "tensor")."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
SITE_AXIS = "site"


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes: at most one -1, which takes the remaining devices.

  The product of the resolved sizes must equal `num_devices`; otherwise a ValueError names
  `mesh.data/fsdp/tensor`, the sizes and the device count.
  """
  sizes = tuple(int(s) for s in sizes)
  names = "/".join(MESH_AXES[: len(sizes)]) if len(sizes) <= len(MESH_AXES) else "axes"
  where = f"mesh.{names}={sizes}"
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{where}: sizes must be positive or -1 (got {sizes}).")
  if sizes.count(-1) > 1:
    raise ValueError(f"{where}: at most one axis may be -1 (got {sizes}).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"{where}: the fixed sizes multiply to {known}, which does not divide the "
          f"{num_devices} available devices.")
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"{where}: the sizes multiply to {math.prod(sizes)} but there are {num_devices} "
        "devices; the product must equal the device count (use -1 for one axis to take "
        "the remaining devices).")
  return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh from `config.mesh` over `devices` (default: all).

  Every axis is `AxisType.Auto` (the compiler propagates shardings, as with classic pjit). With
  `mesh.dcn_data = K > 1` (multislice) the data axis is K slices x data/K devices inside each
  slice, slices outermost, so that only the data-parallel gradient reduction crosses the
  data-center network (MaxText's hybrid mesh, `mesh_utils.create_hybrid_device_mesh`). A slice
  is a TPU slice where devices have `slice_index`, else a process. Raises ValueError when the
  sizes do not fit the devices or the slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given.")
  sizes = mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  dcn = int(getattr(mesh_cfg, "dcn_data", 1) or 1)
  if dcn == 1:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
  if sizes[0] % dcn:
    raise ValueError(f"mesh.dcn_data={dcn} does not divide the data axis size {sizes[0]}.")
  by_slice = hasattr(devices[0], "slice_index")
  granules = {getattr(d, "slice_index", None) if by_slice else d.process_index for d in devices}
  if len(granules) != dcn:
    raise ValueError(
        f"mesh.dcn_data={dcn} but the devices form {len(granules)} "
        f"{'slices' if by_slice else 'processes'}; set mesh.dcn_data to that number.")
  ici = (sizes[0] // dcn, sizes[1], sizes[2])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices,
                                              process_is_granule=not by_slice)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def abstract_mesh(mesh_cfg: Any, num_devices: int) -> AbstractMesh:
  """The ("data", "fsdp", "tensor") mesh of `config.mesh` over `num_devices` devices that need
  not exist here (a target topology): shapes and names only, every axis `AxisType.Auto`.

  Raises ValueError as `mesh_shape` does when the sizes do not multiply to `num_devices`.
  """
  sizes = mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), num_devices)
  return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_site_mesh(mesh_cfg: Any, sites: int, devices_per_site: int,
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The federated mesh ("site", "data", "fsdp", "tensor") of shape (sites, d, f, t).

  Site k owns the k-th block of `devices_per_site` consecutive devices of `devices` (default:
  all); (d, f, t) are `config.mesh` resolved over `devices_per_site` (`mesh_shape`), so a site is
  a sub-mesh with the axes of a plain training mesh. Every axis is `AxisType.Auto`. ValueError
  when sites x devices_per_site exceeds the devices or the inner sizes do not fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  need = int(sites) * int(devices_per_site)
  if sites < 1 or devices_per_site < 1 or need > len(devices):
    raise ValueError(f"{sites} sites x {devices_per_site} devices need {need} devices; "
                     f"{len(devices)} are available")
  inner = mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), int(devices_per_site))
  axes = (SITE_AXIS,) + MESH_AXES
  return jax.make_mesh((int(sites),) + inner, axes, axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices[:need])
