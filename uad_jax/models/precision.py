"""Matrix products in a chosen compute dtype with fp32 sums, and the activation policy.

Why not just ``dtype=bfloat16`` on Flax layers: XLA:CPU lowers a bf16×bf16→bf16 dot at fp32 speed,
while a dot that asks for an fp32 result (``preferred_element_type=float32``) reaches the CPU's bf16
matrix units. Autodiff's transposes of such a dot ask for bf16 results again, so the backward
products are written out here in the same fast form.

The activation policy (``config.model.activations``) says what the products return. "float32":
fp32 results. "bfloat16": bf16 results of fp32 sums, the norm on GPUs and TPUs, where it halves the
activations' memory and bandwidth; on the CPU such a product is the fp32-result dot followed by a
rounding, which XLA fuses, because XLA:CPU's bf16-result dot runs at half speed. "auto" picks
float32 on the CPU and bfloat16 elsewhere (``activation_dtype``). Either way the parameters, the
residual stream, the norms, the softmax statistics and every loss head stay fp32.
"""
import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# What config.model.dtype may name. float16 would also run, but its narrow range needs loss
# scaling, which the train step does not do.
COMPUTE_DTYPES = ("float32", "bfloat16")
# What config.model.activations may name.
ACTIVATION_FORMS = ("auto", "float32", "bfloat16")


def activation_dtype(compute_dtype, activations: str, platform: str | None = None):
  """The dtype the products return under ``activations`` on ``platform`` (default: JAX's
  default backend). Products computed in fp32 always return fp32."""
  if activations not in ACTIVATION_FORMS:
    raise ValueError(f"activations={activations!r}; expected one of {ACTIVATION_FORMS}")
  if jnp.dtype(compute_dtype) == _F32 or activations == "float32":
    return jnp.dtype(_F32)
  if activations == "auto" and (platform or jax.default_backend()) == "cpu":
    return jnp.dtype(_F32)
  return jnp.dtype(compute_dtype)


def _dot(a, b, contract, batch=((), ()), result=_F32):
  """fp32 sums of the products of ``a`` and ``b``, returned as ``result``."""
  result = jnp.dtype(result)
  if result != _F32 and jax.default_backend() == "cpu":
    return jax.lax.dot_general(a, b, (contract, batch), preferred_element_type=_F32).astype(result)
  return jax.lax.dot_general(a, b, (contract, batch), preferred_element_type=result)


def _result(dtype, low):
  """What a cotangent's product returns: the primal's own dtype when that is the low-precision
  one (bf16 activations), else fp32 (cast to the primal's dtype afterwards)."""
  return low if dtype == low else _F32


# matmul and bmm keep separate VJPs on purpose: writing matmul as a batch-1 bmm made XLA:CPU take
# its batched-dot path and the ViT-B/16 step 18% slower (bench/model.py).
# The cotangents must come back in the primals' dtypes, which are static arguments because
# residuals can only be arrays.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _lowp_matmul(x, w, dtype, x_dtype, w_dtype, out_dtype):
  del x_dtype, w_dtype
  return _dot(x.astype(dtype), w.astype(dtype), ((x.ndim - 1,), (0,)), result=out_dtype)


def _lowp_matmul_fwd(x, w, dtype, x_dtype, w_dtype, out_dtype):
  xl, wl = x.astype(dtype), w.astype(dtype)
  return _lowp_matmul(xl, wl, dtype, x_dtype, w_dtype, out_dtype), (xl, wl)


def _lowp_matmul_bwd(dtype, x_dtype, w_dtype, out_dtype, res, g):
  del out_dtype
  xl, wl = res
  gl = g.astype(dtype)
  dx = _dot(gl, wl, ((g.ndim - 1,), (1,)), result=_result(x_dtype, dtype)).astype(x_dtype)
  lead = tuple(range(g.ndim - 1))
  dw = _dot(xl, gl, (lead, lead)).astype(w_dtype)
  return dx, dw


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype, out_dtype=_F32) -> jax.Array:
  """``x[..., K] @ w[K, N]`` computed in ``dtype`` with fp32 sums; the result is ``out_dtype``
  (fp32 unless the activation policy asks for bf16)."""
  if jnp.dtype(dtype) == _F32:
    return jnp.matmul(x.astype(_F32), w.astype(_F32))
  return _lowp_matmul(x, w, jnp.dtype(dtype), x.dtype, w.dtype, jnp.dtype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _lowp_bmm(a, b, dtype, a_dtype, b_dtype, out_dtype):
  del a_dtype, b_dtype
  n = a.ndim
  return _dot(a.astype(dtype), b.astype(dtype), ((n - 1,), (n - 2,)),
              (tuple(range(n - 2)), tuple(range(n - 2))), out_dtype)


def _lowp_bmm_fwd(a, b, dtype, a_dtype, b_dtype, out_dtype):
  al, bl = a.astype(dtype), b.astype(dtype)
  return _lowp_bmm(al, bl, dtype, a_dtype, b_dtype, out_dtype), (al, bl)


def _lowp_bmm_bwd(dtype, a_dtype, b_dtype, out_dtype, res, g):
  del out_dtype
  al, bl = res
  gl = g.astype(dtype)
  n = g.ndim
  batch = (tuple(range(n - 2)), tuple(range(n - 2)))
  da = _dot(gl, bl, ((n - 1,), (n - 1,)), batch, _result(a_dtype, dtype))   # g·bᵀ: [..., M, K]
  db = _dot(al, gl, ((n - 2,), (n - 2,)), batch, _result(b_dtype, dtype))   # aᵀ·g: [..., K, N]
  return da.astype(a_dtype), db.astype(b_dtype)


_lowp_bmm.defvjp(_lowp_bmm_fwd, _lowp_bmm_bwd)


def bmm(a: jax.Array, b: jax.Array, dtype, out_dtype=_F32) -> jax.Array:
  """Batched ``a[..., M, K] @ b[..., K, N]`` computed in ``dtype`` with fp32 sums; the result is
  ``out_dtype``."""
  if jnp.dtype(dtype) == _F32:
    return jnp.matmul(a.astype(_F32), b.astype(_F32))
  return _lowp_bmm(a, b, jnp.dtype(dtype), a.dtype, b.dtype, jnp.dtype(out_dtype))


# Convolutions (the ICS stem): NHWC images, HWIO kernels. Autodiff's transposes of a conv with an
# fp32 result would upcast the stored low-precision operand and run in fp32, so the two backward
# convs are stated here, again with low-precision operands and fp32 results.
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                      preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _lowp_conv(x, w, dtype, x_dtype, w_dtype, strides, padding):
  del x_dtype, w_dtype
  return _conv(x.astype(dtype), w.astype(dtype), strides, padding)


def _lowp_conv_fwd(x, w, dtype, x_dtype, w_dtype, strides, padding):
  xl, wl = x.astype(dtype), w.astype(dtype)
  return _lowp_conv(xl, wl, dtype, x_dtype, w_dtype, strides, padding), (xl, wl)


def _lowp_conv_bwd(dtype, x_dtype, w_dtype, strides, padding, res, g):
  xl, wl = res
  gl = g.astype(dtype)
  in_hw, kernel_hw, out_hw = xl.shape[1:3], wl.shape[:2], g.shape[1:3]
  # Input gradient: the cotangent dilated by the stride, correlated with the flipped kernel; the
  # padding makes the output exactly the input's size. Kernel gradient: the padded input
  # correlated with the stride-dilated cotangent, batch and channel axes swapped.
  dx_pad, dw_pad = [], []
  for n_in, k, n_out, s, (lo, _) in zip(in_hw, kernel_hw, out_hw, strides, padding):
    dx_pad.append((k - 1 - lo, n_in + lo - 1 - (n_out - 1) * s))
    dw_pad.append((lo, k + (n_out - 1) * s - n_in - lo))
  dx = jax.lax.conv_general_dilated(
      gl, jnp.flip(wl, (0, 1)), (1, 1), dx_pad, lhs_dilation=strides,
      dimension_numbers=("NHWC", "HWOI", "NHWC"), preferred_element_type=_F32)
  dw = jax.lax.conv_general_dilated(
      xl, gl, (1, 1), dw_pad, rhs_dilation=strides,
      dimension_numbers=("CHWN", "IHWO", "HWNC"), preferred_element_type=_F32)
  return dx.astype(x_dtype), dw.astype(w_dtype)


_lowp_conv.defvjp(_lowp_conv_fwd, _lowp_conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, dtype, strides=(1, 1), padding=((0, 0), (0, 0))):
  """2-D convolution of NHWC ``x`` with an HWIO ``kernel`` computed in ``dtype``; fp32 result.

  ``padding`` is explicit ((top, bottom), (left, right)), as torch's symmetric integer padding.
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if jnp.dtype(dtype) == _F32:
    return _conv(x.astype(_F32), kernel.astype(_F32), strides, padding)
  return _lowp_conv(x, kernel, jnp.dtype(dtype), x.dtype, kernel.dtype, strides, padding)
