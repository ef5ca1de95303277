"""The UAD re-identification network: ViT backbone, BNNeck and identity classifier."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.models import norms, vit


class BNNeck(norms.GroupBatchNorm):
  """BatchNorm1d of the global feature, per replica group (``norms.GroupBatchNorm``).

  The bias exists (as in the reference's state dict) but is never trained: the optimizer freezes
  it.
  """


class UADNet(nn.Module):
  """Training forward → (classifier logits, pre-BN global_feat); inference → global_feat.

  Both outputs are fp32 whatever the backbone's compute dtype, so the loss heads run in fp32.
  Training applies with ``{"params", "batch_stats"}`` and ``mutable=["batch_stats"]``. Inference
  needs only ``{"params"}`` with the patch stem; the convolutional stems' BatchNorms need
  ``{"params", "batch_stats"}`` (passing batch_stats is harmless for any stem).
  """
  num_classes: int
  variant: str = "B/16"
  image_size: tuple[int, int] = (256, 128)
  stochastic_depth: float = 0.1
  dtype: Any = jnp.float32
  bn_groups: int = 1
  stem: str = "patch"                 # "patch" (vit_base) | "ics" (vit_ics_lup) | "conv" (vit.STEMS)
  stem_width: int | None = None       # stem channels; None: the stem's default for the variant
  activations: Any = jnp.float32      # dtype the backbone's products return (precision policy)

  @property
  def patch_grid(self) -> tuple[int, int]:
    """(H/patch, W/patch): the position grid a pretrained checkpoint is resized to."""
    patch = vit.parse_variant(self.variant).patch
    return self.image_size[0] // patch, self.image_size[1] // patch

  @nn.compact
  def __call__(self, images, train: bool = False):
    global_feat = vit.ViT(self.variant, tuple(self.image_size), self.stochastic_depth,
                          self.dtype, self.stem, self.stem_width, self.bn_groups,
                          self.activations, name="backbone")(images, train)
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
