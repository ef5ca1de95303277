"""Matrix products in a chosen compute dtype, with fp32 results and fp32 parameters.

Why not just ``dtype=bfloat16`` on Flax layers: XLA:CPU lowers a bf16×bf16→bf16 dot at fp32 speed,
while a dot that asks for an fp32 result (``preferred_element_type=float32``) reaches the CPU's bf16
matrix units (and is what TPUs and GPUs do natively anyway). Autodiff's transposes of such a dot
ask for bf16 results again, so the backward products are written out here in the same fast form.
The residual stream, norms, softmax and every loss head stay in fp32.
"""
import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _dot(a, b, contract, batch=((), ())):
  return jax.lax.dot_general(a, b, (contract, batch), preferred_element_type=_F32)


# matmul and bmm keep separate VJPs on purpose: writing matmul as a batch-1 bmm made XLA:CPU take
# its batched-dot path and the ViT-B/16 step 18% slower (bench/model.py).
# The cotangents must come back in the primals' dtypes, which are static arguments because
# residuals can only be arrays.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lowp_matmul(x, w, dtype, x_dtype, w_dtype):
  del x_dtype, w_dtype
  return _dot(x.astype(dtype), w.astype(dtype), ((x.ndim - 1,), (0,)))


def _lowp_matmul_fwd(x, w, dtype, x_dtype, w_dtype):
  xl, wl = x.astype(dtype), w.astype(dtype)
  return _lowp_matmul(xl, wl, dtype, x_dtype, w_dtype), (xl, wl)


def _lowp_matmul_bwd(dtype, x_dtype, w_dtype, res, g):
  xl, wl = res
  gl = g.astype(dtype)
  dx = _dot(gl, wl, ((g.ndim - 1,), (1,))).astype(x_dtype)
  lead = tuple(range(g.ndim - 1))
  dw = _dot(xl, gl, (lead, lead)).astype(w_dtype)
  return dx, dw


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """``x[..., K] @ w[K, N]`` computed in ``dtype``; the result is fp32."""
  if jnp.dtype(dtype) == _F32:
    return jnp.matmul(x.astype(_F32), w.astype(_F32))
  return _lowp_matmul(x, w, jnp.dtype(dtype), x.dtype, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lowp_bmm(a, b, dtype, a_dtype, b_dtype):
  del a_dtype, b_dtype
  n = a.ndim
  return _dot(a.astype(dtype), b.astype(dtype), ((n - 1,), (n - 2,)),
              (tuple(range(n - 2)), tuple(range(n - 2))))


def _lowp_bmm_fwd(a, b, dtype, a_dtype, b_dtype):
  al, bl = a.astype(dtype), b.astype(dtype)
  return _lowp_bmm(al, bl, dtype, a_dtype, b_dtype), (al, bl)


def _lowp_bmm_bwd(dtype, a_dtype, b_dtype, res, g):
  al, bl = res
  gl = g.astype(dtype)
  n = g.ndim
  batch = (tuple(range(n - 2)), tuple(range(n - 2)))
  da = _dot(gl, bl, ((n - 1,), (n - 1,)), batch)           # g·bᵀ: [..., M, K]
  db = _dot(al, gl, ((n - 2,), (n - 2,)), batch)           # aᵀ·g: [..., K, N]
  return da.astype(a_dtype), db.astype(b_dtype)


_lowp_bmm.defvjp(_lowp_bmm_fwd, _lowp_bmm_bwd)


def bmm(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """Batched ``a[..., M, K] @ b[..., K, N]`` computed in ``dtype``; the result is fp32."""
  if jnp.dtype(dtype) == _F32:
    return jnp.matmul(a.astype(_F32), b.astype(_F32))
  return _lowp_bmm(a, b, jnp.dtype(dtype), a.dtype, b.dtype)
