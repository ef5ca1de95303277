"""The GPD prototype memory: one unit vector per training identity, updated by EMA from anchors."""
import jax
import jax.numpy as jnp

from uad_jax import numerics


def update(prototypes: jax.Array, center_ids: jax.Array, centers: jax.Array,
           momentum: float = 0.2, *, enabled: jax.Array | bool = True) -> jax.Array:
  """Π_c ← normalize((1−momentum)·Π_c + momentum·c̄) for the ids present in ``center_ids``.

  ``c̄`` is the normalised mean of the anchors given for id c (an id may appear once per replica
  group). Rows of absent ids are untouched; a zero row becomes c̄. Only the n present rows are
  gathered and scattered, never a temporary of the memory's size. ``enabled=False`` (a traced
  flag: the train step's "this step was finite") writes the old rows back unchanged.
  """
  prototypes = jnp.asarray(prototypes)
  centers = numerics.at_least_f32(jax.lax.stop_gradient(centers))
  same_id = (center_ids[:, None] == center_ids[None, :]).astype(jnp.float32)
  mean_centers = numerics.l2_normalize(
      jnp.dot(same_id, centers, precision=jax.lax.Precision.HIGHEST)
      / jnp.sum(same_id, axis=1, keepdims=True))
  old = numerics.at_least_f32(prototypes[center_ids])
  new = numerics.l2_normalize((1.0 - momentum) * old + momentum * mean_centers)
  new = jnp.where(enabled, new, old)
  # Duplicate ids scatter identical rows, so the write order does not matter.
  return prototypes.at[center_ids].set(new.astype(prototypes.dtype))
