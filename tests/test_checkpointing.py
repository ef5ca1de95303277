"""Orbax checkpoints of the sharded TrainState and the data iterator's position."""
import jax
import numpy as np
import pytest

from configs import uad
from uad_jax import sharding
from uad_jax.training import checkpointing, train_state


def test_round_trip_with_a_relative_directory_keeps_values_and_shardings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = uad.get_config("synthetic")
  with config.unlocked():
    config.model.image_size = (32, 16)
    config.mesh = (("data", 4), ("model", 2))
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_state.create_train_state(config, 8, 5, mesh, log=None)
  state = state.replace(prototypes=state.prototypes + 0.5)
  checkpoints = checkpointing.Checkpointer("workdir/checkpoints")
  checkpoints.save(7, state, {"position": [3, 1]})
  checkpoints.wait()
  restored, data_state = checkpointing.Checkpointer("workdir/checkpoints").restore(
      checkpointing.abstract_state(state, shardings))
  assert data_state == {"position": [3, 1]}
  assert restored.prototypes.sharding == state.prototypes.sharding
  np.testing.assert_array_equal(restored.prototypes, state.prototypes)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
  assert (tmp_path / "workdir" / "checkpoints" / "7").is_dir()


def test_restore_without_a_checkpoint_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
    checkpointing.Checkpointer(str(tmp_path / "empty")).restore(None)
