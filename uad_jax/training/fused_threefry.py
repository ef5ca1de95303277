"""JAX's default threefry PRNG, with random bits that XLA:CPU can fuse into their consumer.

Same key data, same split and fold-in, and bit for bit the same random bits as
``jax.random.key(seed)`` under ``jax_threefry_partitionable`` (JAX's default): bits at position
``n`` of a draw are ``x0 ^ x1`` of Threefry-2x32(key, (hi(n), lo(n))), ``n`` the flat index.

Why: on CPU, JAX lowers the threefry hash as a 5-iteration while loop, and a loop's state cannot
be fused, so every draw of N numbers holds 3·N uint32 in scratch (the counters and the two hash
words).
Drawing the 10^6-identity classifier of ViT-B/16 on 8 devices thus took 1.15 GB of scratch per
device beside its own 384 MB shard. Written as plain element-wise operations (the form TPU and GPU
already get), the hash, the uniform-to-normal transform and the scaling fuse into one loop that
writes each shard in place: no scratch at all. The counters come from a sharded iota, so each
device computes only its own shard.

Threefry-2x32 with 20 rounds, as specified by Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011): rotations (13, 15, 26, 6) and (17, 29, 16, 24) alternating every 4 rounds, a
key injection after each 4 rounds with the third key word ``k0 ^ k1 ^ 0x1BD11BDA``.
"""
import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax

_STOCK = jex_random.threefry_prng_impl
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, r: int):
  return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def threefry_2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds) of the counter words (x0, x1) under the key (k0, k1)."""
  keys = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for group in range(1, 6):
    for r in _ROTATIONS[(group - 1) % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + keys[group % 3]
    x1 = x1 + keys[(group + 1) % 3] + np.uint32(group)
  return x0, x1


def _random_bits(key, bit_width, shape):
  size = math.prod(shape)
  # The flat index then fits in the low counter word (hi(n) = 0). Other widths, larger draws and
  # the non-partitionable layout are JAX's own draw: identical bits, unfused.
  if (bit_width != 32 or not shape or size >= 2**32
      or not jax.config.jax_threefry_partitionable):
    return _STOCK.random_bits(key, bit_width, shape)
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  flat_index = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
                   for d, stride in enumerate(strides))
  x0, x1 = threefry_2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), flat_index)
  return x0 ^ x1


IMPL = jex_random.define_prng_impl(
    key_shape=_STOCK.key_shape, seed=_STOCK.seed, split=_STOCK.split, fold_in=_STOCK.fold_in,
    random_bits=_random_bits, name="threefry2x32_fused", tag="fry_fused")


def fused(key: jax.Array) -> jax.Array:
  """The same threefry key as a key of this implementation; a key of another PRNG as it is."""
  if str(jax.random.key_impl(key)) != _STOCK.name:
    return key
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=IMPL)
