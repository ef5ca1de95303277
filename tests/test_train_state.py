"""Creating the train state: the same values as the plain init, and no scratch beyond the state."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from configs import uad
from uad_jax import sharding
from uad_jax.training import fused_threefry, train_state

DRAWS = {
    "normal": lambda k, s: jax.random.normal(k, s),
    "truncated_normal": lambda k, s: jax.random.truncated_normal(k, -2.0, 2.0, s),
    "uniform": lambda k, s: jax.random.uniform(k, s),
    "bits32": lambda k, s: jax.random.bits(k, s),
    "bits8": lambda k, s: jax.random.bits(k, s, jnp.uint8),
}


def _config(mesh):
  c = uad.get_config("synthetic")
  with c.unlocked():
    c.model.variant, c.model.stem, c.model.image_size = "mu/16", "patch", (32, 16)
    c.mesh = (("data", mesh[0]), ("model", mesh[1]))
  return c


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (64, 1000), (2, 3, 4, 5)])
@pytest.mark.parametrize("draw", sorted(DRAWS))
def test_fused_key_draws_the_default_keys_numbers(draw, shape):
  key = jax.random.fold_in(jax.random.key(1234), 7)
  expected = DRAWS[draw](key, shape)
  np.testing.assert_array_equal(DRAWS[draw](fused_threefry.fused(key), shape), expected)
  np.testing.assert_array_equal(jax.jit(DRAWS[draw], static_argnums=1)(
      fused_threefry.fused(key), shape), expected)


def test_without_partitionable_threefry_the_fused_key_draws_jaxs_other_layout():
  key = jax.random.key(11)
  with jax.threefry_partitionable(False):
    expected = jax.random.normal(key, (64, 100))
    np.testing.assert_array_equal(jax.random.normal(fused_threefry.fused(key), (64, 100)),
                                  expected)
  assert not np.array_equal(expected, jax.random.normal(key, (64, 100)))


def test_fused_key_splits_and_folds_like_the_default_key():
  key = jax.random.key(3)
  fused = fused_threefry.fused(key)
  for a, b in [(jax.random.split(key, 4), jax.random.split(fused, 4)),
               (jax.random.fold_in(key, 9), jax.random.fold_in(fused, 9))]:
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_a_key_of_another_prng_is_left_as_it_is():
  key = jax.random.key(3, impl="rbg")
  assert fused_threefry.fused(key) is key


def test_a_sharded_fused_draw_is_the_whole_draw_split():
  mesh = sharding.make_mesh((("data", 2), ("model", 4)))
  out = NamedSharding(mesh, PartitionSpec("data", "model"))
  key = jax.random.key(5)
  draw = jax.jit(lambda k: jax.random.normal(k, (6, 4000)), out_shardings=out)
  fused = draw(fused_threefry.fused(key))
  assert {s.data.shape for s in fused.addressable_shards} == {(3, 1000)}
  np.testing.assert_array_equal(fused, jax.random.normal(key, (6, 4000)))


def _state_leaves(state):
  leaves = traverse_util.flatten_dict(
      {"params": state.params, "batch_stats": state.batch_stats}, sep="/")
  return {k: np.asarray(v) for k, v in leaves.items()}


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)])
def test_state_holds_the_plain_inits_values(mesh):
  """The plain, unsharded flax init with the default key on one device is the reference."""
  config, num_classes = _config(mesh), 4000
  state, _ = train_state.create_train_state(
      config, num_classes, 5, sharding.make_mesh(config.mesh, jax.devices()[:mesh[0] * mesh[1]]))
  model = train_state.build_model(config, num_classes)
  key = jax.random.key(config.seed)
  plain = nn.unbox(jax.jit(lambda k: train_state._init_variables(model, k))(key))
  expected = _state_leaves(state.replace(params=plain["params"], batch_stats=plain["batch_stats"]))
  got = _state_leaves(state)
  assert got.keys() == expected.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                jax.random.key_data(jax.random.fold_in(key, 1)))
  assert not np.any(np.asarray(state.prototypes))
  for trace in jax.tree.leaves(state.opt_state):
    if trace.ndim:
      assert not np.any(np.asarray(trace))


def _bytes_per_device(abstract):
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)])
def test_creating_a_million_identity_state_needs_almost_no_scratch(mesh):
  """Per device, the compiled init's scratch is a small fraction of the state it writes, and no
  array of the whole classifier or memory appears in its program."""
  config, num_classes = _config(mesh), 1_000_000
  mesh_ = sharding.make_mesh(config.mesh)
  abstract, _ = train_state.create_train_state(config, num_classes, 5, mesh_, abstract_only=True)
  state_bytes = _bytes_per_device(abstract)
  compiled = train_state.compiled_init(config, num_classes, 5, mesh_)
  memory = compiled.memory_analysis()
  assert memory.output_size_in_bytes == pytest.approx(state_bytes, rel=0.01)
  assert memory.temp_size_in_bytes <= 0.02 * state_bytes, (memory.temp_size_in_bytes, state_bytes)
  hlo = compiled.as_text()
  assert "[64,1000000]" not in hlo and "[1000000,64]" not in hlo
