"""Orbax checkpoints of the train state together with the data iterator's position.

One checkpoint step holds the whole TrainState (parameters, BN statistics, optimizer state, the
prototype memory, the RNG) and the input pipeline's state, so a resumed run continues exactly
where the interrupted one stopped. Orbax writes each step to a temporary directory and renames it
when complete: an interrupted save never reads as a checkpoint, and earlier steps stay intact.
This is the only module that imports orbax.
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 2):
    # Orbax refuses relative paths; a workdir given relative to the current folder is fine here.
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict | None = None) -> None:
    items = {"state": ocp.args.StandardSave(_with_key_data(state))}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state, step: int | None = None):
    """Returns ``(state, data_state or None)``; ``abstract_state`` carries target shardings."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
    items = {"state": ocp.args.StandardRestore(_with_key_data(abstract_state))}
    if "data" in self._manager.item_metadata(step):
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    state = state.replace(rng=jax.random.wrap_key_data(state.rng))
    return state, restored.get("data")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_state(state, shardings):
  """The restore target for ``state``: its shapes and dtypes with these shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _with_key_data(state):
  """Typed PRNG keys are stored as their raw uint32 data."""
  rng = state.rng
  if isinstance(rng, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, rng)
    rng = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding)
  elif jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return state.replace(rng=rng)
