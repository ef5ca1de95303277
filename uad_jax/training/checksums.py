"""Exact checksums of (sharded, global) arrays, computed on their devices.

A checkpoint stores one checksum per array so that a restore can prove it read back the very bits
that were saved. Each checksum is a wrapping uint32 sum over the array's bits, so the device
reduction is exact and independent of the order XLA adds the shards in: the same array gives the
same checksum on one device, on any mesh and across hosts, and nothing is gathered to one host.

Per word ``w`` at flat position ``i`` (row-major over the array's uint32 words) the two 32-bit
halves add ``mix(w) * (2i + 1)`` and ``mix(w ^ c) * (mix(i + c') | 1)``. ``mix`` is a bijection and
the multipliers are odd, so any change confined to one word changes both halves for certain; a
change spread over several words goes unnoticed only if it cancels in both sums at once, and the
position weights catch swapped or shifted words, which a plain sum would not.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec


def tree_checksums(tree) -> dict[str, str]:
  """``{name: 16 hex digits}`` for every array leaf of ``tree``: one jitted call for the leaves
  of each set of devices (one for a train state, which lives on one mesh).

  Names are the leaves' paths joined with dots (``params.backbone.cls``), as Orbax names them.
  """
  groups = {}
  for name, leaf in leaf_names(tree).items():
    devices = getattr(getattr(leaf, "sharding", None), "device_set", None)
    groups.setdefault(frozenset(devices or ()), {})[name] = leaf
  out = {}
  for group in groups.values():
    names, leaves = zip(*group.items())
    sums = np.asarray(_jitted(_replicated_like(leaves))(list(leaves)))
    out.update({name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums)})
  return {name: out[name] for name in leaf_names(tree)}


def leaf_names(tree) -> dict:
  """``{dotted path: leaf}`` in flattening order."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _replicated_like(leaves):
  # A result replicated over the leaves' mesh can be read on every host without a gather.
  for leaf in leaves:
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return NamedSharding(leaf.sharding.mesh, PartitionSpec())
  return None


@functools.lru_cache(maxsize=None)
def _jitted(out_sharding):
  # One compiled program per mesh (and per tree, by jit's own cache), reused by every save.
  return jax.jit(lambda leaves: jnp.stack([_checksum(x) for x in leaves]),
                 out_shardings=out_sharding)


def _checksum(x) -> jax.Array:
  """uint32[2]: the two halves of ``x``'s checksum."""
  w = _words(x)
  i = _flat_index(w.shape)
  a = jnp.sum(_mix(w) * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  b = jnp.sum(_mix(w ^ jnp.uint32(0x9E3779B9)) * (_mix(i + jnp.uint32(0x632BE5AB)) | jnp.uint32(1)),
              dtype=jnp.uint32)
  return jnp.stack([a, b])


def _words(x) -> jax.Array:
  """``x``'s bits as uint32 words; elements wider than 32 bits become a trailing axis."""
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size < 4:  # widen losslessly: the unsigned view of the same bits
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)


def _flat_index(shape) -> jax.Array:
  """Each element's row-major position, wrapping at 2^32; built from iotas so that it is
  sharded like the array instead of materialised whole."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _mix(h) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)
