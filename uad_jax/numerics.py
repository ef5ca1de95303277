"""fp32 promotion, torch-style L2 normalisation and a finiteness check, shared by the losses,
the evaluator and the loop."""
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


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every entry of every array in `tree` is finite; one reduction on the devices, so a
  sharded state is never gathered to check it."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
