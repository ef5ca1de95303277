"""Imports timm beside the CPU torch wheel, for fixtures and peer benchmarks only.

timm imports torchvision at import time, and PyPI's torchvision does not load beside the torch
CPU wheel used here. timm's ViT needs none of torchvision, so a stand-in package that answers any
``torchvision.*`` import with placeholder classes is installed first when the real one is absent.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _AnyAttribute(type):
  # timm reads class attributes such as InterpolationMode.NEAREST at import time.

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return f"{cls.__name__}.{name}"


class _Placeholder(metaclass=_AnyAttribute):

  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is stubbed out in uad_jax.testing.timm_peer")


class _StubModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return type(name, (_Placeholder,), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, fullname, path=None, target=None):
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def _real_torchvision_loads() -> bool:
  if importlib.util.find_spec("torchvision") is None:
    return False
  try:
    import torchvision  # noqa: F401
    return True
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    return False


def import_timm():
  """Returns the timm module, or raises ImportError when torch or timm is not installed."""
  import torch  # noqa: F401  (an ImportError here means: no torch)
  if "torchvision" not in sys.modules and not _real_torchvision_loads():
    sys.meta_path.insert(0, _StubFinder())
  import timm
  return timm


def available() -> bool:
  try:
    import_timm()
    return True
  except ImportError:
    return False


def reid_reference_features(timm_model_224, images_nhwc, image_size=(256, 128)):
  """What the reference computes: a 224-trained timm ViT moved to ``image_size`` the TransReID way
  (position grid resized bilinearly, align_corners=False, no antialias), CLS feature after the
  final norm, in eval mode. Returns (features [B, D], resized pos_embed [1, 1+h·w, D]) as NumPy.
  """
  import torch
  import torch.nn.functional as F
  timm = import_timm()
  src = timm_model_224
  patch = src.patch_embed.patch_size[0]
  grid_hw = (image_size[0] // patch, image_size[1] // patch)
  state = {k: v.detach().clone() for k, v in src.state_dict().items()
           if not k.startswith("head.")}
  pos = state["pos_embed"]
  side = int(round((pos.shape[1] - 1)**0.5))
  grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=grid_hw, mode="bilinear", align_corners=False)
  state["pos_embed"] = torch.cat(
      [pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)], dim=1)
  target = timm.models.vision_transformer.VisionTransformer(
      img_size=image_size, patch_size=patch, embed_dim=src.embed_dim,
      depth=len(src.blocks), num_heads=src.blocks[0].attn.num_heads,
      mlp_ratio=src.blocks[0].mlp.fc1.out_features / src.embed_dim, qkv_bias=True,
      num_classes=0)
  target.load_state_dict(state, strict=True)
  target.eval()
  with torch.no_grad():
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
    feats = target(x)
  return feats.numpy(), state["pos_embed"].numpy()


def state_dict_to_google_npz(state_dict, path, num_heads):
  """Writes a timm ViT state dict in Google's original ViT .npz layout (head included)."""
  import numpy as np
  sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}
  width = sd["cls_token"].shape[-1]
  heads = num_heads
  out = {
      "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": sd["patch_embed.proj.bias"],
      "cls": sd["cls_token"],
      "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
      "Transformer/encoder_norm/scale": sd["norm.weight"],
      "Transformer/encoder_norm/bias": sd["norm.bias"],
      "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
  }
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    qkv_w = sd[b + "attn.qkv.weight"].T.reshape(width, 3, heads, width // heads)
    qkv_b = sd[b + "attn.qkv.bias"].reshape(3, heads, width // heads)
    for j, name in enumerate(("query", "key", "value")):
      out[f"{g}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[:, j]
      out[f"{g}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j]
    out[f"{g}MultiHeadDotProductAttention_1/out/kernel"] = (
        sd[b + "attn.proj.weight"].T.reshape(heads, width // heads, width))
    out[f"{g}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
    for ln, google_ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[f"{g}{google_ln}/scale"] = sd[f"{b}{ln}.weight"]
      out[f"{g}{google_ln}/bias"] = sd[f"{b}{ln}.bias"]
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[f"{g}MlpBlock_3/{dense}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
      out[f"{g}MlpBlock_3/{dense}/bias"] = sd[f"{b}mlp.{fc}.bias"]
  np.savez(path, **out)

