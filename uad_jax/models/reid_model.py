"""The UAD re-identification network: ViT backbone, BNNeck and identity classifier."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.models import vit


class BNNeck(nn.Module):
  """BatchNorm1d with torch's conventions, computed per replica group.

  torch normalises with the biased batch variance but tracks the unbiased one, momentum 0.1 on
  the new value; eps 1e-5. The batch is ``num_groups`` independent replica batches (the reference
  ran one per GPU without SyncBN), so statistics are per group; the running statistics move by the
  average of the groups' statistics. The bias exists (as in the reference's state dict) but is
  never trained: the optimizer freezes it.
  """
  num_groups: int = 1
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (d,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (d,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      groups = x.reshape(self.num_groups, -1, d)
      n = groups.shape[1]
      mean = jnp.mean(groups, axis=1, keepdims=True)
      var = jnp.mean(jnp.square(groups - mean), axis=1, keepdims=True)
      y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean, axis=(0, 1))
        ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(var, axis=(0, 1)) * n / max(n - 1, 1)
    else:
      y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    return y * scale + bias


class UADNet(nn.Module):
  """Training forward → (classifier logits, pre-BN global_feat); inference → global_feat.

  Both outputs are fp32 whatever the backbone's compute dtype, so the loss heads run in fp32.
  """
  num_classes: int
  variant: str = "B/16"
  image_size: tuple[int, int] = (256, 128)
  stochastic_depth: float = 0.1
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @property
  def patch_grid(self) -> tuple[int, int]:
    """(H/patch, W/patch): the position grid a pretrained checkpoint is resized to."""
    patch = vit.parse_variant(self.variant).patch
    return self.image_size[0] // patch, self.image_size[1] // patch

  @nn.compact
  def __call__(self, images, train: bool = False):
    global_feat = vit.ViT(self.variant, tuple(self.image_size), self.stochastic_depth,
                          self.dtype, name="backbone")(images, train)
    if not train:
      return global_feat
    bn_feat = BNNeck(self.bn_groups, name="bnneck")(global_feat, train)
    logits = vit.Dense(self.num_classes, ("embed", "classes"), jnp.float32, use_bias=False,
                       name="classifier",
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.normal(0.001), ("embed", "classes")))(bn_feat)
    return logits, global_feat


def backbone_param_count(params) -> int:
  """Number of backbone parameters (the 85.7M the paper reports for ViT-B/16 at 256×128)."""
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)["backbone"]))
