"""fp32 promotion and torch-style L2 normalisation, shared by the losses and the evaluator."""
import jax
import jax.numpy as jnp

# torch.nn.functional.normalize's default eps.
NORMALIZE_EPS = 1e-12


def at_least_f32(x: jax.Array) -> jax.Array:
  """fp32 for bf16/fp16 inputs; float64 stays float64 (finite-difference tests run in it)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(|x|, 1e-12): zero rows stay zero, as in torch's F.normalize."""
  x = at_least_f32(x)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, NORMALIZE_EPS)
