"""The "ICS" convolutional stem of the reference's ``vit_ics_lup`` backbone (TransReID-SSL).

Before the patch projection, the image passes
  conv 7×7 stride 2 → IBN → ReLU → conv 3×3 → IBN → ReLU → conv 3×3 → BatchNorm → ReLU,
all convs without bias; the projection then uses patch/2 patches of this half-resolution map, so
the token grid is the plain ViT's. IBN normalises the first half of the channels per image
(InstanceNorm) and the rest per replica batch (BatchNorm). The BatchNorms follow the BNNeck's
per-replica-group rule (``norms.GroupBatchNorm``) and need running statistics in evaluation.
"""
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
