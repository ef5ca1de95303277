"""Faults the resilience tests inject into a train step's batch."""
import jax.numpy as jnp


def nan_images(batch):
  """The batch with NaN images instead of its own, in the host form: uint8 pixels (the device
  augmentation's form) hold no NaN, and the step takes either form."""
  like = batch["images"] if "images" in batch else batch["pixels"]
  rest = {k: v for k, v in batch.items() if k not in ("images", "pixels", "raw_sizes", "augment")}
  return {**rest, "images": jnp.full(like.shape, jnp.nan, jnp.float32, device=like.sharding)}
