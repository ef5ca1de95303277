"""Writes a backbone as a timm / TransReID state dict in ``.safetensors``: the inverse of
``pretrained``'s import, so a backbone trained here is handed on in a real format (and read back
through the same importer as an ImageNet or LUPerson checkpoint).

Names and layouts are torch's: linear weights [out, in], conv weights OIHW, the patch projection a
conv of the patch size, LayerNorm ``weight``/``bias``; the ICS stem under ``patch_embed.conv.N``
with its BatchNorm running statistics, the light conv stem under ``patch_embed.stem.<i>.{conv,bn}``.
The position embedding keeps the model's grid.
"""
import os

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from uad_jax.models import pretrained

# Ours → TransReID's PatchEmbed_ICS.conv indices, and norm sub-module names (inverses of the
# importer's tables).
_ICS_INDEX = {ours: index for index, ours in pretrained.ICS_LAYERS.items()}
_NORM_NAMES = {ours: theirs for theirs, ours in pretrained.ICS_NORMS.items()}
_TENSOR_NAMES = {ours: theirs for theirs, ours in pretrained.NORM_TENSORS.items()}


def _stem_name(path: str, ics: bool) -> str:
  """ICS: stem/ibn1/batch_norm/scale → patch_embed.conv.1.BN.weight (and conv kernels, bn3);
  the light conv stem: stem/bn2/scale → patch_embed.stem.1.bn.weight."""
  parts = path.split("/")[1:]
  layer, tensor = parts[0], parts[-1]
  if not ics:
    stage = int(layer.removeprefix("conv").removeprefix("bn")) - 1
    module = "conv" if layer.startswith("conv") else "bn"
    return f"patch_embed.stem.{stage}.{module}.{_TENSOR_NAMES.get(tensor, 'weight')}"
  if layer.startswith("conv"):
    return f"patch_embed.conv.{_ICS_INDEX[layer]}.weight"
  norm = f"{_NORM_NAMES[parts[1]]}." if len(parts) == 3 else ""
  return f"patch_embed.conv.{_ICS_INDEX[layer]}.{norm}{_TENSOR_NAMES[tensor]}"


def _to_timm(path: str, x: np.ndarray, patch_in_channels: int, ics: bool):
  """Our backbone path and array → (state-dict name, array in torch's layout)."""
  simple = {"cls_token": "cls_token", "pos_embed": "pos_embed", "norm/scale": "norm.weight",
            "norm/bias": "norm.bias", "patch_embed/bias": "patch_embed.proj.bias"}
  if path in simple:
    return simple[path], x
  if path == "patch_embed/kernel":  # [(ph, pw, c), width] → OIHW
    p = int(round((x.shape[0] // patch_in_channels) ** 0.5))
    return "patch_embed.proj.weight", x.reshape(p, p, patch_in_channels, -1).transpose(3, 2, 0, 1)
  if path.startswith("stem/"):
    return _stem_name(path, ics), x.transpose(3, 2, 0, 1) if path.endswith("kernel") else x
  block, layer = path.split("/", 1)
  index = int(block.removeprefix("block"))
  module, _, kind = layer.rpartition("/")
  if module in ("norm1", "norm2"):
    return f"blocks.{index}.{module}.{'weight' if kind == 'scale' else 'bias'}", x
  name = f"blocks.{index}.{module.replace('/', '.')}"
  return (f"{name}.weight", x.T) if kind == "kernel" else (f"{name}.bias", x)


def save_backbone(path: str, variables) -> str:
  """Writes ``variables["params"]["backbone"]`` (and the stem's ``batch_stats``, if any) to
  ``path`` (.safetensors), atomically: the file appears only once complete."""
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: backbones are written as .safetensors")
  params = traverse_util.flatten_dict(variables["params"]["backbone"], sep="/")
  stats = traverse_util.flatten_dict(
      variables.get("batch_stats", {}).get("backbone", {}), sep="/")
  stem_kernels = sorted(k for k in params if k.startswith("stem/conv"))
  in_channels = params[stem_kernels[-1]].shape[-1] if stem_kernels else 3
  ics = "stem/ibn1/instance_norm/scale" in params
  tensors = {}
  for tree in (params, stats):
    for name, x in tree.items():
      key, value = _to_timm(name, np.asarray(x, np.float32), in_channels, ics)
      tensors[key] = np.ascontiguousarray(value)
  partial = f"{path}.partial"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, partial)
  os.replace(partial, path)
  return path
