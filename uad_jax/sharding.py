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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)  # the mesh axes the code knows; DATA is the one the batch splits over
# Logical names of the prototype memory [identities, dim]: sharded like the classifier's columns.
PROTOTYPE_AXES = ("classes", "embed")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """``(("data", -1), ("model", 2))`` → a Mesh; one -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {tuple(mesh_config)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {tuple(mesh_config)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {tuple(mesh_config)} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} are available")
  # Auto axes: the compiler propagates shardings from the annotated inputs and constraints.
  return Mesh(np.asarray(devices).reshape(sizes), names,
              axis_types=(AxisType.Auto,) * len(names))


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
