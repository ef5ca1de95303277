"""Imports ImageNet and LUPerson ViT checkpoints into the backbone's parameters (and statistics).

Formats, chosen by file suffix:
  * ``.npz``: Google's original ViT checkpoints (the JAX origin of timm's
    ``jx_vit_base_p16_224-80ecf9dd.pth``), keys such as
    ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``;
  * ``.safetensors``: a timm ``vit_*_patch16_224`` state dict, read without torch;
  * ``.pth`` / ``.pt`` / ``.bin``: the same state dict saved by ``torch.save``, read without torch
    by ``torch_pickle`` (which refuses anything in the pickle but tensors and plain containers);
    also a TransReID-SSL / LUPerson checkpoint: a dict holding ``model`` or ``state_dict``, or a
    DINO dict whose ``teacher`` keys are ``module.backbone.*``, with the ICS stem's
    ``patch_embed.conv.*`` tensors (``vit_ics_lup``); and the light conv stem's
    ``patch_embed.stem.<i>.{conv,bn}.*`` (``conv_stem.EarlyConvStem``, written by
    ``backbone_export``).
The classification head is dropped; the position grid is resized to the model's patch grid the way
the reference does it (bilinear, align_corners=False, no antialias), read as a grid of height:width
``hw_ratio`` (the reference's 2 for the ICS stem's LUPerson checkpoints, whose 128 tokens are 16×8).
The ICS stem's BatchNorm running statistics go to ``batch_stats``, so such a checkpoint is loaded
with ``load_backbone_variables``:

    params, _ = pretrained.load_backbone("jx_vit_base_p16_224-80ecf9dd.pth", params,
                                         grid_hw=(16, 8))
    variables, _ = pretrained.load_backbone_variables(
        "vit_base_ics_cfs_lup.pth", {"params": params, "batch_stats": batch_stats},
        grid_hw=(16, 8))
"""
import dataclasses
import math
import os
import re
import zipfile

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file

from uad_jax.models import torch_pickle

_GOOGLE_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".npz", ".safetensors") + _TORCH_SUFFIXES  # what read_checkpoint reads
# TransReID's PatchEmbed_ICS.conv is an nn.Sequential: index → our stem module (2, 5, 8: ReLUs).
_ICS_STEM = re.compile(r"^patch_embed\.conv\.(\d+)\.(?:(IN|BN)\.)?(\w+)$")
# The light conv stem: stage i (0-based) is our stem/conv{i+1} and stem/bn{i+1}.
_CONV_STEM = re.compile(r"^patch_embed\.stem\.(\d+)\.(conv|bn)\.(\w+)$")
ICS_LAYERS = {"0": "conv1", "1": "ibn1", "3": "conv2", "4": "ibn2", "6": "conv3", "7": "bn3"}
ICS_NORMS = {"IN": "instance_norm", "BN": "batch_norm"}
NORM_TENSORS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
# Converted names of running statistics carry this prefix; parameter names carry none.
STATS = "batch_stats/"
_IGNORED = "ignored"        # a tensor that is read and deliberately not used (num_batches_tracked)


@dataclasses.dataclass
class LoadReport:
  """What an import did, so the caller can log it (and tests can check it)."""
  loaded: list[str]        # parameter paths under backbone/, then batch_stats/<path>
  missing: list[str]       # backbone parameters (and statistics) the checkpoint did not provide
  unexpected: list[str]    # checkpoint tensors that map to nothing (e.g. the ImageNet head)
  pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None

  def __str__(self):
    lines = [f"loaded {len(self.loaded)} tensors"]
    if self.pos_embed_resized:
      (a, b), (c, d) = self.pos_embed_resized
      lines.append(f"position grid resized {a}x{b} -> {c}x{d}")
    lines.append(f"missing ({len(self.missing)}): {self.missing}")
    lines.append(f"unexpected, dropped ({len(self.unexpected)}): {self.unexpected}")
    return "\n".join(lines)


def resize_bilinear(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """[H, W, C] → [h, w, C] as torch's ``F.interpolate(mode='bilinear', align_corners=False)``.

  Written out rather than taken from ``jax.image.resize``, which antialiases when downsampling
  unless told otherwise; this is the exact torch rule (half-pixel centres, clamped at 0).
  """
  out = np.asarray(grid, np.float64)
  for axis, size in enumerate(out_hw):
    n_in = out.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
    out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
  return out.astype(grid.dtype)


def _from_google(name: str, x: np.ndarray):
  """Google npz name → (our backbone path, array), or None for tensors we do not use."""
  name = name.removeprefix("opt/target/")
  simple = {
      "embedding/kernel": "patch_embed/kernel", "embedding/bias": "patch_embed/bias",
      "cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed",
      "Transformer/encoder_norm/scale": "norm/scale", "Transformer/encoder_norm/bias": "norm/bias",
  }
  if name in simple:
    if name == "embedding/kernel":  # HWIO conv kernel → [(ph, pw, c), width]
      x = x.reshape(-1, x.shape[-1])
    return simple[name], x
  m = _GOOGLE_BLOCK.match(name)
  if not m:
    return None
  block, rest = f"block{m.group(1)}", m.group(2)
  per_block = {
      "LayerNorm_0/scale": "norm1/scale", "LayerNorm_0/bias": "norm1/bias",
      "LayerNorm_2/scale": "norm2/scale", "LayerNorm_2/bias": "norm2/bias",
      "MlpBlock_3/Dense_0/kernel": "mlp/fc1/kernel", "MlpBlock_3/Dense_0/bias": "mlp/fc1/bias",
      "MlpBlock_3/Dense_1/kernel": "mlp/fc2/kernel", "MlpBlock_3/Dense_1/bias": "mlp/fc2/bias",
      "MultiHeadDotProductAttention_1/out/kernel": "attn/proj/kernel",
      "MultiHeadDotProductAttention_1/out/bias": "attn/proj/bias",
  }
  if rest in per_block:
    if rest.endswith("out/kernel"):  # [heads, head_dim, width] → [width, width]
      x = x.reshape(-1, x.shape[-1])
    return f"{block}/{per_block[rest]}", x
  return None  # query/key/value are fused by _fuse_google_qkv


def _fuse_google_qkv(arrays: dict, used: set) -> dict:
  """Google keeps q, k, v apart as [width, heads, head_dim]; ours is one [width, 3·width]."""
  fused = {}
  prefix = "opt/target/" if any(k.startswith("opt/target/") for k in arrays) else ""
  i = 0
  while True:
    base = f"{prefix}Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
    names = {(p, kind): f"{base}{p}/{kind}" for p in ("query", "key", "value")
             for kind in ("kernel", "bias")}
    if not all(n in arrays for n in names.values()):
      return fused
    kernels = [arrays[names[(p, "kernel")]] for p in ("query", "key", "value")]
    biases = [arrays[names[(p, "bias")]] for p in ("query", "key", "value")]
    fused[f"block{i}/attn/qkv/kernel"] = np.concatenate(
        [k.reshape(k.shape[0], -1) for k in kernels], axis=1)
    fused[f"block{i}/attn/qkv/bias"] = np.concatenate([b.reshape(-1) for b in biases])
    used.update(names.values())
    i += 1


def _from_ics_stem(name: str, x: np.ndarray):
  """TransReID ``patch_embed.conv.*`` name → (our path, array), _IGNORED, or None."""
  m = _ICS_STEM.match(name)
  if not m or m.group(1) not in ICS_LAYERS:
    return None
  layer, norm, kind = ICS_LAYERS[m.group(1)], m.group(2), m.group(3)
  if kind == "num_batches_tracked":   # torch's counter; only a momentum=None BatchNorm reads it
    return _IGNORED
  if layer.startswith("conv"):
    if norm or kind != "weight":
      return None
    return f"stem/{layer}/kernel", x.transpose(2, 3, 1, 0)      # OIHW → HWIO
  if (norm is None) != (layer == "bn3") or kind not in NORM_TENSORS:
    return None
  path = f"stem/{layer}/{ICS_NORMS[norm]}" if norm else f"stem/{layer}"
  stats = kind.startswith("running_")
  return f"{STATS if stats else ''}{path}/{NORM_TENSORS[kind]}", x


def _from_conv_stem(name: str, x: np.ndarray):
  """``patch_embed.stem.<i>.{conv,bn}.*`` → (our path, array), _IGNORED, or None."""
  m = _CONV_STEM.match(name)
  if not m:
    return None
  stage, module, kind = int(m.group(1)) + 1, m.group(2), m.group(3)
  if module == "conv":
    return (f"stem/conv{stage}/kernel", x.transpose(2, 3, 1, 0)) if kind == "weight" else None
  if kind == "num_batches_tracked":
    return _IGNORED
  if kind not in NORM_TENSORS:
    return None
  prefix = STATS if kind.startswith("running_") else ""
  return f"{prefix}stem/bn{stage}/{NORM_TENSORS[kind]}", x


def _from_timm(name: str, x: np.ndarray):
  """timm / TransReID state-dict name → (our backbone path, array), _IGNORED, or None for tensors
  we do not use."""
  if name.startswith("patch_embed.conv."):
    return _from_ics_stem(name, x)
  if name.startswith("patch_embed.stem."):
    return _from_conv_stem(name, x)
  simple = {"cls_token": "cls_token", "pos_embed": "pos_embed",
            "norm.weight": "norm/scale", "norm.bias": "norm/bias",
            "patch_embed.proj.bias": "patch_embed/bias"}
  if name in simple:
    return simple[name], x
  if name == "patch_embed.proj.weight":  # OIHW conv → [(ph, pw, c), width]
    return "patch_embed/kernel", x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
  m = _TIMM_BLOCK.match(name)
  if not m:
    return None
  block, rest = f"block{m.group(1)}", m.group(2)
  layer, _, kind = rest.rpartition(".")
  if layer in ("norm1", "norm2"):
    return f"{block}/{layer}/{'scale' if kind == 'weight' else 'bias'}", x
  if layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
    path = f"{block}/{layer.replace('.', '/')}"
    return (f"{path}/kernel", x.T) if kind == "weight" else (f"{path}/bias", x)
  return None


def _unwrap(state):
  """The state dict inside a training checkpoint, the way the reference's ``load_param`` finds it:
  ``model``, then ``state_dict``, then DINO's ``teacher``, whose ``module.`` prefix is stripped and
  whose ``backbone.*`` tensors are the model's (the rest, DINO's projection head, keep their full
  names and are reported as unexpected)."""
  for wrapper in ("model", "state_dict"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
    backbone = {}
    for name, x in state["teacher"].items():
      short = name.removeprefix("module.")
      backbone[short.removeprefix("backbone.") if short.startswith("backbone.") else
               f"teacher.{name}"] = x
    state = backbone
  return state


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads a checkpoint file into {name: array}; returns it and the naming ('google'/'timm')."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
  # The libraries' own errors do not say which file they could not parse.
  if path.endswith(".npz"):
    try:
      with np.load(path) as f:  # allow_pickle stays off: arrays only, nothing runs
        return {k: f[k] for k in f.files}, "google"
    except (ValueError, OSError, EOFError, TypeError, zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: not a readable .npz archive of arrays "
                       f"({type(e).__name__}: {e})") from e
  if path.endswith(".safetensors"):
    try:
      return load_file(path), "timm"
    except SafetensorError as e:
      raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
  if path.endswith(_TORCH_SUFFIXES):
    state = _unwrap(torch_pickle.load(path))
    if not isinstance(state, dict):
      raise ValueError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return {k: v.astype(np.float32) for k, v in state.items() if isinstance(v, np.ndarray)}, "timm"
  raise ValueError(f"unknown checkpoint format for {path}: expected one of {SUFFIXES} (.npz: "
                   f"Google ViT; the others: a timm state dict)")


def convert(arrays: dict[str, np.ndarray], naming: str) -> tuple[dict[str, np.ndarray], list]:
  """Checkpoint tensors → our backbone paths (running statistics as ``STATS + path``).

  Returns (converted, unexpected names)."""
  converted, used = {}, set()
  if naming == "google":
    converted.update(_fuse_google_qkv(arrays, used))
  rename = _from_google if naming == "google" else _from_timm
  for name, x in arrays.items():
    if name in used:
      continue
    mapped = rename(name, np.asarray(x))
    if mapped is None:
      continue
    if mapped is not _IGNORED:
      converted[mapped[0]] = mapped[1]
    used.add(name)
  return converted, sorted(set(arrays) - used)


def pos_grid_shape(tokens: int, hw_ratio: int = 1) -> tuple[int, int]:
  """The (H, W) grid of ``tokens`` patches with H = hw_ratio·W, as the reference reads it
  (H = ⌊√(tokens·ratio)⌋, W = H / ratio). Raises when that is not the whole grid."""
  h = math.isqrt(tokens * hw_ratio)
  w = h // hw_ratio
  if h * w != tokens:
    raise ValueError(f"{tokens} position tokens are no grid of height:width {hw_ratio}"
                     + (" (a square grid; LUPerson checkpoints of the ICS stem are read with "
                        "hw_ratio=2)" if hw_ratio == 1 else ""))
  return h, w


def resize_pos_embed(pos: np.ndarray, grid_hw: tuple[int, int], hw_ratio: int = 1) -> np.ndarray:
  """[1, 1+H·W, D] → [1, 1+h·w, D]: the CLS slot is kept, the H×W grid (H = hw_ratio·W) is
  resized bilinearly to ``grid_hw``."""
  old = pos_grid_shape(pos.shape[1] - 1, hw_ratio)
  grid = resize_bilinear(pos[0, 1:].reshape(*old, -1), grid_hw)
  return np.concatenate([pos[:, :1], grid.reshape(1, grid_hw[0] * grid_hw[1], -1)], axis=1)


def _check_shapes(path, converted, targets):
  for name, x in converted.items():
    if x is not None and name in targets and tuple(x.shape) != tuple(targets[name].shape):
      raise ValueError(f"{path}: tensor for backbone/{name} has shape {tuple(x.shape)}, "
                       f"the model expects {tuple(targets[name].shape)}")


def _backbone_targets(variables) -> dict:
  """{our converted name: leaf} for the backbone's leaves of each collection."""
  targets = {}
  for collection, tree in variables.items():
    if collection not in ("params", "batch_stats"):
      raise ValueError(f"variables hold a collection {collection!r}; expected params and, "
                       "for BatchNorm statistics, batch_stats")
    prefix = "" if collection == "params" else STATS
    for key, leaf in traverse_util.flatten_dict(tree, sep="/").items():
      if key.startswith("backbone/"):
        targets[prefix + key.removeprefix("backbone/")] = leaf
  return targets


def load_backbone_variables(path: str, variables, *, grid_hw: tuple[int, int] | None = None,
                            hw_ratio: int | None = None, log=print):
  """Returns ``(variables with the backbone's tensors replaced by the checkpoint's, LoadReport)``.

  ``variables`` is ``{"params": ..., "batch_stats": ...}`` (unboxed trees or their abstract
  shapes; ``batch_stats`` may be left out when the checkpoint has no running statistics); leaves
  outside ``backbone`` are returned as given. ``grid_hw`` is the model's patch grid (H/16, W/16),
  needed when the checkpoint's grid differs. ``hw_ratio`` is the height:width of the checkpoint's
  position grid; None takes the reference's: 2 for a model with the ICS stem (``vit_ics_lup``), 1
  (square) otherwise.
  """
  arrays, naming = read_checkpoint(path)
  converted, unexpected = convert(arrays, naming)
  targets = _backbone_targets(variables)
  if hw_ratio is None:
    hw_ratio = 2 if any(k.startswith("stem/") for k in targets) else 1
  # Tensors of another backbone (a stem the model lacks, another width) say more than its grid.
  _check_shapes(path, {k: v for k, v in converted.items() if k != "pos_embed"}, targets)
  resized = None
  if "pos_embed" in converted and "pos_embed" in targets:
    pos, want = converted["pos_embed"], tuple(targets["pos_embed"].shape)
    if pos.shape != want:
      if grid_hw is None or 1 + grid_hw[0] * grid_hw[1] != want[1]:
        raise ValueError(f"{path}: position embedding {pos.shape} must be resized to {want}; "
                         f"grid_hw={grid_hw} does not give {want[1] - 1} patches")
      try:
        old = pos_grid_shape(pos.shape[1] - 1, hw_ratio)
      except ValueError as e:
        raise ValueError(f"{path}: tensor pos_embed {pos.shape}: {e}") from None
      converted["pos_embed"] = resize_pos_embed(pos, grid_hw, hw_ratio)
      resized = (old, tuple(grid_hw))
  _check_shapes(path, {"pos_embed": converted.get("pos_embed")}, targets)
  stats = sorted(k for k in converted if k.startswith(STATS))
  if stats and "batch_stats" not in variables and any(k.startswith("stem/") for k in targets):
    raise ValueError(f"{path} holds BatchNorm running statistics ({stats[0]}, ...) that the "
                     "model's ICS stem needs: load it with load_backbone_variables(path, "
                     "{'params': ..., 'batch_stats': ...})")
  unexpected += [f"(converted) {n}" for n in sorted(set(converted) - set(targets))]
  report = LoadReport(loaded=sorted(set(converted) & set(targets)),
                      missing=sorted(set(targets) - set(converted)),
                      unexpected=unexpected, pos_embed_resized=resized)
  flat = {c: traverse_util.flatten_dict(tree, sep="/") for c, tree in variables.items()}
  for name in report.loaded:
    collection = "batch_stats" if name.startswith(STATS) else "params"
    flat[collection][f"backbone/{name.removeprefix(STATS)}"] = converted[name].astype(np.float32)
  if log:
    log(f"pretrained {path} ({naming}):\n{report}")
  return {c: traverse_util.unflatten_dict(f, sep="/") for c, f in flat.items()}, report


def load_backbone(path: str, params, *, grid_hw: tuple[int, int] | None = None,
                  hw_ratio: int | None = None, log=print):
  """Returns ``(params with the backbone replaced by the checkpoint's, LoadReport)``.

  ``params`` is the model's (unboxed) parameter tree or its abstract shapes; leaves outside
  ``backbone`` are returned as given. ``grid_hw`` is the model's patch grid (H/16, W/16), needed
  when the checkpoint's grid differs (16×8 for 256×128 images from a 14×14 checkpoint). A model
  with the ICS stem also takes running statistics: use ``load_backbone_variables``.
  """
  variables, report = load_backbone_variables(path, {"params": params}, grid_hw=grid_hw,
                                              hw_ratio=hw_ratio, log=log)
  return variables["params"], report
