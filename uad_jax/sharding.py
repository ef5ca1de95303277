"""Meshes and logical-axis sharding from config data.

The model names its parameter and activation axes (``uad_jax.models.vit``);
``config.sharding_rules`` maps those names to mesh axes. Data parallelism, FSDP over the data axis
and an identity-sharded classifier and prototype memory are therefore rule changes, not code
changes.
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)  # the mesh axes the code knows; DATA is the one the batch splits over
# Logical names of the prototype memory [identities, dim]: sharded like the classifier's columns.
PROTOTYPE_AXES = ("classes", "embed")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """``(("data", -1), ("model", 2))`` → a Mesh; one -1 takes the remaining devices.

  Devices are laid out so that every process owns one contiguous block of the data axis and the
  other axes stay within a process (see `device_grid`): the batch rows a process loads are then
  the rows its devices hold (`check_process_batches`).
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in mesh_config)
  # Auto axes: the compiler propagates shardings from the annotated inputs and constraints.
  return Mesh(device_grid(mesh_config, devices), names,
              axis_types=(AxisType.Auto,) * len(names))


def mesh_sizes(mesh_config, num_devices: int) -> list[int]:
  """The axis sizes of ``mesh_config`` on ``num_devices`` devices, the -1 resolved."""
  sizes = [int(size) for _, size in mesh_config]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {tuple(mesh_config)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {tuple(mesh_config)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {tuple(mesh_config)} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are available")
  return sizes


def device_grid(mesh_config, devices) -> np.ndarray:
  """The devices as an array of the mesh's shape, each process owning a block of the data axis.

  With several processes the data axis is cut into one block per process (in process order) and
  every other axis is laid out within a process: JAX's hybrid-mesh utility, with processes as the
  slow network's units. Within a process (and in a single-process run) the order is
  `create_device_mesh`'s, which follows the TPU torus. A mesh whose other axes need more devices
  than a process has cannot be laid out so: its devices are put in (process, id) order, and
  `check_process_batches` refuses it naming the mesh to use instead.
  """
  names = [name for name, _ in mesh_config]
  sizes = mesh_sizes(mesh_config, len(devices))
  groups = {}
  for device in devices:
    groups.setdefault(device.process_index, []).append(device)
  groups = [sorted(groups[p], key=lambda d: d.id) for p in sorted(groups)]
  if len(groups) == 1:
    return _local_grid(sizes, devices)
  data = names.index(DATA) if DATA in names else None
  if (data is None or sizes[data] % len(groups)
      or len({len(group) for group in groups}) != 1):
    return _objects([d for group in groups for d in group]).reshape(sizes)
  per_process = list(sizes)
  per_process[data] //= len(groups)
  across = [len(groups) if axis == data else 1 for axis in range(len(sizes))]
  try:
    return mesh_utils.create_hybrid_device_mesh(per_process, across, devices,
                                                process_is_granule=True)
  except (ValueError, NotImplementedError, AssertionError):
    # A topology create_device_mesh cannot map: the same blocks, each in plain device order.
    blocks = _objects([_objects(group).reshape(per_process) for group in groups])
    return np.block(blocks.reshape(across).tolist())


def _local_grid(sizes, devices) -> np.ndarray:
  try:
    return mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Some TPU topologies cannot take every logical shape (or a subset of a host's chips); the
    # plain order is still correct, only its collectives may be slower.
    return _objects(devices).reshape(sizes)


def _objects(items) -> np.ndarray:
  """A 1-D object array of `items` (np.asarray would unpack items that are sequences)."""
  array = np.empty(len(items), object)
  array[:] = items
  return array


def check_process_batches(mesh: Mesh, rows: int, what: str, process_of=None) -> None:
  """Refuses a mesh on which the processes' own batch rows would not make the global batch.

  Process i of P loads rows [i·n, (i+1)·n) of a global batch of `rows` rows, n = rows / P (the
  input pipeline); `jax.make_array_from_process_local_data` places them on the devices of process
  i. So the devices of process i must hold exactly those rows under the batch sharding, whatever
  the mesh; this reads where the sharding actually puts each row. `process_of(device)` (default:
  its ``process_index``) lets a test pose other layouts.
  """
  process_of = process_of or (lambda device: device.process_index)
  indices = batch_sharding(mesh).devices_indices_map((rows,))
  held = {}
  for device, index in indices.items():
    start, stop, _ = index[0].indices(rows)
    held.setdefault(process_of(device), []).append((start, stop))
  processes = sorted(held)
  if len(processes) == 1:
    return
  if rows % len(processes):
    raise ValueError(f"{what} ({rows} rows) does not split into {len(processes)} equal process "
                     "slices; make it a multiple of the process count")
  n = rows // len(processes)
  for rank, process in enumerate(processes):
    covered = _merged(held[process])
    if covered != [(rank * n, (rank + 1) * n)]:
      local_devices = len(indices) // len(processes)
      suggested = tuple((name, -1 if name == DATA else math.gcd(size, local_devices))
                        for name, size in mesh.shape.items())
      raise ValueError(
          f"{what} ({rows} rows): process {process} loads rows {rank * n}–{(rank + 1) * n - 1}, "
          f"but under this mesh its devices hold rows "
          f"{', '.join(f'{a}–{b - 1}' for a, b in covered)}, so the processes' batches would not "
          f"assemble into the global batch. The data axis must be split by process, so every "
          f"other axis must fit within one process's {local_devices} devices: use "
          f"config.mesh={suggested} (the mesh is now {dict(mesh.shape)} over {len(processes)} "
          "processes)")


def _merged(spans):
  """Half-open row spans → their union as sorted disjoint spans."""
  merged = []
  for start, stop in sorted(spans):
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
    else:
      merged.append((start, stop))
  return merged


@contextlib.contextmanager
def context(mesh: Mesh, rules):
  """Where model code is traced: activation constraints resolve against this mesh and rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield


def logical_to_sharding(logical_specs, mesh: Mesh, rules):
  """A tree of logical PartitionSpecs → a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays split over the data axis along their leading (replica-group-major) axis."""
  return NamedSharding(mesh, PartitionSpec(DATA))
