"""Vision Transformer backbone (pre-norm, CLS token, learned position embedding).

Parameters are fp32 and carry logical axis names; the sharding rules that map them to a mesh are
config data (``uad_jax.sharding``). ``dtype`` selects the compute dtype of the matrix products and
``activations`` what they return (``uad_jax.models.precision``); the residual stream, LayerNorms and
softmax statistics stay fp32.

Three stems put the image into tokens: ``"patch"``, the plain stride-16 patch projection;
``"ics"``, the reference's ``vit_ics_lup`` convolutional stem (``conv_stem``) before a stride-8
projection of its half-resolution map; ``"conv"``, a light stack of 3×3 stride-2 convs (Xiao et
al. 2021) and a 1×1 projection. All give the same token grid and the same body.
"""
import dataclasses
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.models import conv_stem, precision

# width, depth, heads, mlp width, ICS stem channels. "mu" is a tiny model for CPU tests and the
# synthetic demo. Its stem is 16 channels, not the reference's 64: a 64-channel stem's 8·8·64 → 64
# projection alone would hold 4× the parameters of mu's two blocks.
VARIANTS = {
    "mu": (64, 2, 2, 128, 16),
    "Ti": (192, 12, 3, 768, 64),
    "S": (384, 12, 6, 1536, 64),
    "B": (768, 12, 12, 3072, 64),
}
STEMS = ("patch", "ics", "conv")

# Logical axis names. Activations get names of their own so that an FSDP rule on parameter
# axes never shards activations by accident.
BATCH, TOKENS, ACT_EMBED = "act_batch", "act_tokens", "act_embed"


@dataclasses.dataclass(frozen=True)
class ViTShape:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  stem_width: int
  patch: int


def parse_variant(variant: str) -> ViTShape:
  """'B/16' → ViTShape. Raises with the known names on a typo."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"unknown ViT variant {variant!r}; expected one of "
                     f"{[k + '/16' for k in VARIANTS]}")
  return ViTShape(*VARIANTS[name], patch=int(patch))


def input_problem(patch: int, stem: str, image_size) -> str | None:
  """Why a ViT of ``patch``-pixel patches with ``stem`` cannot take (H, W) ``image_size`` images,
  or None. Every stem ends on the same token grid, so both sides must be multiples of the patch."""
  if stem == "ics" and patch % conv_stem.STRIDE:
    return f"the ICS stem halves the image, so the patch size ({patch}) must be even"
  if stem == "conv" and patch & (patch - 1):
    return (f"the conv stem downsamples by 2 per stage, so the patch size ({patch}) must be a "
            "power of 2")
  if any(side % patch for side in image_size):
    return f"the image size {tuple(image_size)} is not a multiple of the patch size {patch}"
  return None


def _kernel_init(axes):
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


class Dense(nn.Module):
  """Linear layer whose product runs in ``dtype`` and returns ``out_dtype``; fp32 kernel and
  bias."""
  features: int
  axes: tuple[str, str]
  dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Any = None
  out_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = self.kernel_init or _kernel_init(self.axes)
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    y = precision.matmul(x, kernel, self.dtype, self.out_dtype)
    if self.use_bias:
      y = y + self.param("bias", _zeros(self.axes[1:]), (self.features,)).astype(y.dtype)
    return y


def _layer_norm(name):
  return nn.LayerNorm(
      epsilon=1e-6, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=_zeros(("embed",)))


def _fused_attention(q, k, v):
  """cuDNN's fused attention on a GPU, ``jax.nn.dot_product_attention``'s XLA form where cuDNN
  refuses these shapes or this GPU: both take q, k, v [B, N, heads, head_dim] in bf16 and keep
  the softmax statistics in fp32."""
  if jax.default_backend() == "gpu":
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as e:
      _note_cudnn_refusal(q, e)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


# Why cuDNN refused, by q's shape and dtype: the fallback costs speed, not correctness, so it
# warns once per shape and keeps the reason for benchmarks to print (bench/accelerator.py).
CUDNN_REFUSALS: dict[tuple[tuple[int, ...], str], str] = {}


def _note_cudnn_refusal(q, error):
  key = (tuple(q.shape), jnp.dtype(q.dtype).name)
  if key not in CUDNN_REFUSALS:
    CUDNN_REFUSALS[key] = f"{type(error).__name__}: {error}"
    warnings.warn(f"cuDNN refused fused attention for q {key[0]} {key[1]} "
                  f"({CUDNN_REFUSALS[key]}); using XLA's attention")


class Attention(nn.Module):
  heads: int
  dtype: Any
  activations: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.heads
    act = self.activations
    qkv = Dense(3 * d, ("embed", "qkv"), self.dtype, name="qkv", out_dtype=act)(x)
    # q, k, v by a split, not three slices: its gradient is one concatenation, not three padded
    # sums (4-7% of the ViT-B/16 step on the CPU).
    if act != jnp.float32 and jax.default_backend() != "cpu":
      qkv = qkv.reshape(b, n, 3, self.heads, head_dim)                          # [B, N, 3, H, hd]
      q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
      out = _fused_attention(q, k, v).reshape(b, n, d)
    else:
      # XLA:CPU has no fused attention, and its batched products are fastest in this layout.
      qkv = qkv.reshape(b, n, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
      q, k, v = (t[0] for t in jnp.split(qkv, 3))
      q = q * jnp.asarray(head_dim**-0.5, act)
      attn = jax.nn.softmax(precision.bmm(q, k.swapaxes(-1, -2), self.dtype), axis=-1)
      out = precision.bmm(attn.astype(act), v, self.dtype, act)
      out = out.transpose(0, 2, 1, 3).reshape(b, n, d)
    return Dense(d, ("heads", "embed"), self.dtype, name="proj", out_dtype=act)(out)


@jax.custom_jvp
def gelu(x):
  """Exact GELU, x·Φ(x), written with erf as torch's nn.GELU is; computed in fp32, returned in
  x's dtype.

  ``jax.nn.gelu(approximate=False)`` goes through erfc, whose piecewise XLA expansion (and its
  derivative) is several times dearer on the CPU than erf's single rational approximation. The
  derivative Φ(x) + x·φ(x) is stated directly so the backward pass reuses Φ, and kept in x's
  dtype so that bf16 activations keep a bf16 residual.
  """
  x32 = x.astype(jnp.float32)
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  x32 = x.astype(jnp.float32)
  cdf = 0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF)
  pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return (x32 * cdf).astype(x.dtype), (cdf + x32 * pdf).astype(x.dtype) * t


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


class Mlp(nn.Module):
  hidden: int
  dtype: Any
  activations: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Dense(self.hidden, ("embed", "mlp"), self.dtype, name="fc1", out_dtype=self.activations)(x)
    h = gelu(h)
    return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="fc2",
                 out_dtype=self.activations)(h)


class Block(nn.Module):
  heads: int
  mlp_dim: int
  drop_path: float
  dtype: Any
  activations: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # Stochastic depth: drop the whole residual branch per sample, scaled by 1/keep. The branches
    # return the activation dtype; the residual stream they add to stays fp32.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    attn = Attention(self.heads, self.dtype, self.activations, name="attn")
    x = x + drop(attn(_layer_norm("norm1")(x))).astype(jnp.float32)
    mlp = Mlp(self.mlp_dim, self.dtype, self.activations, name="mlp")
    x = x + drop(mlp(_layer_norm("norm2")(x))).astype(jnp.float32)
    return nn.with_logical_constraint(x, (BATCH, TOKENS, ACT_EMBED))


class ViT(nn.Module):
  """Maps NHWC images to the final-LayerNorm CLS token (fp32).

  ``activations``: what the blocks' products return (``precision.activation_dtype``); with fp32
  products (``dtype``) it is fp32 whatever is asked.

  With a convolutional stem ("ics", "conv") the stem's BatchNorms compute per-replica-group
  statistics over ``bn_groups`` contiguous row blocks in training, and evaluation needs their
  ``batch_stats``.
  """
  variant: str = "B/16"
  image_size: tuple[int, int] = (256, 128)
  stochastic_depth: float = 0.1
  dtype: Any = jnp.float32
  stem: str = "patch"                 # "patch" | "ics" | "conv" (STEMS)
  stem_width: int | None = None       # stem channels (first stage's for "conv"); None: default
  bn_groups: int = 1                  # replica groups of the stems' BatchNorms
  activations: Any = jnp.float32      # dtype the products return (precision.activation_dtype)

  @nn.compact
  def __call__(self, images, train: bool = False):
    shape = parse_variant(self.variant)
    b, h, w, _ = images.shape
    p = shape.patch
    if (h, w) != tuple(self.image_size):
      raise ValueError(f"images are {h}×{w}, the model was built for {self.image_size}")
    if self.stem not in STEMS:
      raise ValueError(f"unknown ViT stem {self.stem!r}; expected one of {STEMS}")
    problem = input_problem(p, self.stem, (h, w))
    if problem:
      raise ValueError(f"ViT {self.variant!r} with the {self.stem} stem: {problem}")
    gh, gw = h // p, w // p
    act = jnp.float32 if jnp.dtype(self.dtype) == jnp.float32 else jnp.dtype(self.activations)
    x = images
    if self.stem == "ics":
      x = conv_stem.ICSStem(self.stem_width or shape.stem_width, self.bn_groups, self.dtype,
                            name="stem")(images, train)
      p //= conv_stem.STRIDE
    elif self.stem == "conv":
      x = conv_stem.EarlyConvStem(p, self.stem_width or min(64, shape.width // 2), shape.width,
                                  self.bn_groups, self.dtype, name="stem")(images, train)
      p = 1
    c = x.shape[-1]
    # Stride-p patch embedding as a product: (ph, pw, c) flattening matches an HWIO conv kernel.
    patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c)
    x = Dense(shape.width, ("patch", "embed"), self.dtype, name="patch_embed",
              kernel_init=nn.with_logical_partitioning(
                  nn.initializers.lecun_normal(), ("patch", "embed")), out_dtype=act)(patches)
    x = x.astype(jnp.float32)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, shape.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, shape.width)), x], axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "tokens", "embed")),
        (1, 1 + gh * gw, shape.width))
    x = nn.with_logical_constraint(x + pos, (BATCH, TOKENS, ACT_EMBED))
    for i, rate in enumerate(np.linspace(0.0, self.stochastic_depth, shape.depth)):
      x = Block(shape.heads, shape.mlp_dim, float(rate), self.dtype, act, name=f"block{i}")(x, train)
    return _layer_norm("norm")(x[:, 0])
