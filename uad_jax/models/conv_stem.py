"""Convolutional stems before the ViT's patch projection.

``ICSStem``: the "ICS" stem of the reference's ``vit_ics_lup`` backbone (TransReID-SSL).
Before the patch projection, the image passes
  conv 7×7 stride 2 → IBN → ReLU → conv 3×3 → IBN → ReLU → conv 3×3 → BatchNorm → ReLU,
all convs without bias; the projection then uses patch/2 patches of this half-resolution map, so
the token grid is the plain ViT's. IBN normalises the first half of the channels per image
(InstanceNorm) and the rest per replica batch (BatchNorm). The BatchNorms follow the BNNeck's
per-replica-group rule (``norms.GroupBatchNorm``) and need running statistics in evaluation.

``EarlyConvStem``: the light stem of Xiao et al. (NeurIPS 2021, "Early convolutions help
transformers see better"), a stack of 3×3 stride-2 convs that replaces the patch projection's
stride altogether; the usual cure for ViTs that learn slowly from scratch (the synthetic demo's
backbone, chosen by measurement, see the README).
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uad_jax.models import norms, precision

STRIDE = 2                  # the stem's downsampling; the projection's patch is patch / STRIDE
CHANNELS = "stem"           # logical axis of the stem's channels (no rule: replicated)


class Conv(nn.Module):
  """Square conv without bias, torch's symmetric padding; product in ``dtype``, fp32 result."""
  features: int
  size: int
  stride: int
  padding: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # He initialisation over fan-out, as TransReID-SSL initialises its stem convs.
    init = nn.with_logical_partitioning(
        nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        (None, None, "stem_in", CHANNELS))
    kernel = self.param("kernel", init, (self.size, self.size, x.shape[-1], self.features))
    pad = ((self.padding, self.padding),) * 2
    return precision.conv(x, kernel, self.dtype, (self.stride,) * 2, pad)


class IBN(nn.Module):
  """InstanceNorm on the first ⌊C/2⌋ channels, per-group BatchNorm on the rest, re-joined."""
  num_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    half = x.shape[-1] // 2
    a = norms.InstanceNorm(axis_name=CHANNELS, name="instance_norm")(x[..., :half])
    b = norms.GroupBatchNorm(self.num_groups, axis_name=CHANNELS, name="batch_norm")(
        x[..., half:], train)
    return jnp.concatenate([a, b], axis=-1)


class ICSStem(nn.Module):
  """NHWC images [B, H, W, 3] → fp32 feature map [B, H/2, W/2, width]."""
  width: int = 64
  num_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    x = Conv(self.width, 7, STRIDE, 3, self.dtype, name="conv1")(images)
    x = nn.relu(IBN(self.num_groups, name="ibn1")(x, train))
    x = Conv(self.width, 3, 1, 1, self.dtype, name="conv2")(x)
    x = nn.relu(IBN(self.num_groups, name="ibn2")(x, train))
    x = Conv(self.width, 3, 1, 1, self.dtype, name="conv3")(x)
    bn = norms.GroupBatchNorm(self.num_groups, axis_name=CHANNELS, name="bn3")
    return nn.relu(bn(x, train))


class EarlyConvStem(nn.Module):
  """NHWC images [B, H, W, 3] → fp32 [B, H/patch, W/patch, C]: log2(patch) stages of 3×3 stride-2
  conv (no bias) → per-group BatchNorm → ReLU, channels doubling from ``width`` up to
  ``max_width``; the ViT then projects each position (a 1×1 patch) to its width."""
  patch: int
  width: int = 32
  max_width: int = 64
  num_groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    stages = int(round(math.log2(self.patch)))
    if 2**stages != self.patch:
      raise ValueError(f"the conv stem downsamples by 2 per stage, so the patch size must be a "
                       f"power of 2, got {self.patch}")
    x, channels = images, self.width
    for stage in range(1, stages + 1):
      x = Conv(channels, 3, 2, 1, self.dtype, name=f"conv{stage}")(x)
      bn = norms.GroupBatchNorm(self.num_groups, axis_name=CHANNELS, name=f"bn{stage}")
      x = nn.relu(bn(x, train))
      channels = min(2 * channels, self.max_width)
    return x
