"""The inference function as a self-contained StableHLO artifact (``jax.export``), for serving.

An export is a folder of three files:
  model.jaxexport  ``Exported.serialize()`` of f(p0000, …, pNNNN, images) → features
  params.npz       the parameter leaves p0000, p0001, … in argument order, in their own dtypes
  export.json      what it is: format, input and output, versions, platforms, checksums, the
                   compatibility window, and the caller's metadata

``images`` are uint8 RGB [batch, H, W, 3], already resized to the model's H×W (evaluation resizes
with PIL bilinear, ``augment.test_resize``); the function normalises them bit for bit as
``augment.normalize`` does (fp32) and returns the float32 [batch, D] pre-BN global features that
evaluation ranks by (``model.apply(variables, normalised, train=False)``). The batch dimension is
symbolic, so one artifact serves every batch size. Only the leaves inference reads are exported:
the classifier and the BNNeck, which may dwarf the backbone, are left out.

Running an export needs nothing but jax and numpy (not this package):

    import numpy as np
    from jax import export
    exported = export.deserialize(bytearray(open("EXPORT/model.jaxexport", "rb").read()))
    with np.load("EXPORT/params.npz") as npz:
      params = [npz[f"p{i:04d}"] for i in range(len(npz.files))]
    features = np.asarray(exported.call(*params, images))  # images: uint8 [B, H, W, 3]

``load`` does the same with checks (checksums, shapes, dtypes) and clear errors.

One artifact is lowered for CPU, CUDA and TPU together: ``jax.export``'s multi-platform lowering
works on a CPU-only machine, and the module holds one lowering per platform only for the few
primitives whose lowering differs. (The tests run the CPU lowering; the CUDA and TPU ones are
lowered but not run where no accelerator is at hand.)

How long an export stays loadable is ``COMPATIBILITY`` (also in every export.json): the Orbax
checkpoint stays the source of truth, and an export is re-made from it after JAX upgrades.
"""
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import export as jax_export

from uad_jax.data import augment

FORMAT = "uad-jax-stablehlo-features"
FORMAT_VERSION = 1
MODULE_FILE, PARAMS_FILE, MANIFEST_FILE = "model.jaxexport", "params.npz", "export.json"
PLATFORMS = ("cpu", "cuda", "tpu")
BATCH = "batch"             # the symbolic batch dimension's name

# What jax.export promises, in its documentation's "Compatibility guarantees".
COMPATIBILITY_SOURCE = "https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees"
COMPATIBILITY = (
    "jax.export guarantees that this artifact can be compiled and run by a JAX runtime whose "
    "jaxlib was built up to 6 months after the jaxlib that exported it (6 months backward "
    "compatibility) and by one built up to 3 weeks before it (3 weeks forward compatibility); "
    "what counts is when the exporting and the consuming jaxlib were built, not when the export "
    "was made or run, so export with the newest jaxlib and consume with the same one where "
    "possible. The guarantee covers StableHLO and JAX's stable custom calls only, and calling "
    "convention versions older than 6 months may stop being accepted. The Orbax checkpoint stays "
    "the source of truth: after upgrading JAX/jaxlib past this window, re-make the export from "
    "the checkpoint rather than carrying this file forward.")


class DamagedExport(ValueError):
  """An export whose files are damaged, truncated or do not match each other."""


def export(model, variables, image_size, out_dir, *, metadata: dict | None = None,
           platforms=PLATFORMS, overwrite: bool = False) -> dict:
  """Writes the inference function of ``model`` with ``variables`` ({"params", "batch_stats"},
  boxed or not) to the folder ``out_dir``, atomically; returns its manifest.

  ``image_size``: the model's (H, W). ``metadata``: JSON-ready facts to keep with the export
  (checkpoint step, config, …). An existing export is replaced only with ``overwrite=True``, and
  a folder that is not an export never is.
  """
  height, width = check_image_size(model, image_size)
  # One module serves every platform, so it takes the form every platform lowers: fp32
  # activations and the portable attention (a GPU's "auto" would embed cuDNN's).
  model = model.clone(activations=jnp.float32)
  metadata = dict(metadata or {})
  json.dumps(metadata, allow_nan=False)  # fails now, not after the work, if it is not JSON
  out_dir = pathlib.Path(out_dir)
  _check_replaceable(out_dir, overwrite)

  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(inference_variables(variables))
  leaves = [x for _, x in paths_leaves]
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in paths_leaves]

  def lower(kept, batch):
    specs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in kept]
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    fn = jax.jit(_features_fn(model, treedef, leaves, kept))
    # No logical axis rules: the export holds no sharding and runs on any one device.
    with nn.logical_axis_rules(()):
      return jax_export.export(fn, platforms=tuple(platforms))(*specs, images)

  # Lowered once over every leaf to learn which ones inference reads (jax.export prunes unused
  # arguments only for static shapes), then over those alone with the symbolic batch.
  everything = tuple(range(len(leaves)))
  kept = tuple(i for i in lower(everything, 1).module_kept_var_idx if i < len(leaves))
  exported = lower(kept, jax_export.symbolic_shape(BATCH)[0])
  feature_dim = int(exported.out_avals[0].shape[1])

  manifest = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "function": f"f(p0000, ..., p{len(kept) - 1:04d}, images) -> features",
      "image_size": [height, width],
      "input": {"name": "images", "dtype": "uint8", "shape": [BATCH, height, width, 3],
                "description": INPUT_DESCRIPTION},
      "output": {"name": "features", "dtype": "float32",
                 "shape": [BATCH, feature_dim],
                 "description": "pre-BN global feature (final-LayerNorm CLS token)"},
      "feature_dim": feature_dim,
      "num_params": len(kept),
      "param_elements": int(sum(leaves[i].size for i in kept)),
      "params": [{"name": _param_name(j), "path": names[i], "shape": list(leaves[i].shape),
                  "dtype": np.dtype(leaves[i].dtype).name} for j, i in enumerate(kept)],
      "model": {"class": type(model).__name__, "variant": model.variant, "stem": model.stem,
                "dtype": jnp.dtype(model.dtype).name, "activations": "float32"},
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "serialization_version": _serialization_version(),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "compatibility": {"backward": "6 months", "forward": "3 weeks",
                        "source": COMPATIBILITY_SOURCE, "statement": COMPATIBILITY},
      "metadata": metadata,
  }
  _write_folder(out_dir, overwrite, exported.serialize(),
                {_param_name(j): np.asarray(jax.device_get(leaves[i]))
                 for j, i in enumerate(kept)}, manifest)
  return manifest


INPUT_DESCRIPTION = (f"RGB, NHWC, 0..255, already resized to image_size; normalised inside as "
                     f"float32 (x / 255 - {augment.PIXEL_MEAN}) / {augment.PIXEL_STD}")


def check_image_size(model, image_size) -> tuple[int, int]:
  """(H, W) as ints, which must be the model's."""
  height, width = (int(v) for v in image_size)
  if (height, width) != tuple(model.image_size):
    raise ValueError(f"image_size {tuple(image_size)} is not the model's "
                     f"{tuple(model.image_size)} (H, W)")
  return height, width


def inference_variables(variables) -> dict:
  """{"params", "batch_stats"} of ``variables``, unboxed, where they are (only the leaves an
  export keeps are ever copied to the host: the classifier can be gigabytes)."""
  return nn.unbox({k: v for k, v in variables.items() if k in ("params", "batch_stats")})


def _features_fn(model, treedef, leaves, kept):
  """f(*kept leaves, uint8 images) → fp32 features; leaves not kept are never read, and stand in
  as zeros of their shape so the variables keep their structure."""
  def features(*args):
    *kept_values, images = args
    values = [jnp.zeros(x.shape, x.dtype) for x in leaves]
    for i, value in zip(kept, kept_values):
      values[i] = value
    out = model.apply(jax.tree.unflatten(treedef, values), augment.normalize_batch(images),
                      train=False)
    return out.astype(jnp.float32)
  return features


def _param_name(i: int) -> str:
  return f"p{i:04d}"


def _serialization_version():
  """The flatbuffer format version ``Exported.serialize`` writes (not public API: None if moved)."""
  try:
    from jax._src.export import serialization
    return int(serialization._SERIALIZATION_VERSION)
  except (ImportError, AttributeError):
    return None


def _is_export(path: pathlib.Path) -> bool:
  return (path / MANIFEST_FILE).is_file()


def _check_replaceable(out_dir: pathlib.Path, overwrite: bool):
  if not out_dir.exists():
    return
  if not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_export(out_dir)):
    raise FileExistsError(f"{out_dir} exists and is not an export; refusing to replace it")
  if _is_export(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already holds an export; pass overwrite=True to replace it")


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _write_synced(path: pathlib.Path, write):
  with open(path, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())


def _write_folder(out_dir: pathlib.Path, overwrite, module: bytes, params: dict, manifest):
  """Writes a sibling temporary folder, then renames it to ``out_dir``: readers see the old
  export or the whole new one, and a failure leaves no half-written export behind."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
  aside = out_dir.parent / f".{out_dir.name}.old-{tag}"
  tmp.mkdir()
  try:
    _write_synced(tmp / MODULE_FILE, lambda f: f.write(module))
    _write_synced(tmp / PARAMS_FILE, lambda f: np.savez(f, **params))
    manifest["files"] = {name: {"bytes": (tmp / name).stat().st_size,
                                "sha256": _sha256(tmp / name)}
                         for name in (MODULE_FILE, PARAMS_FILE)}
    text = json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False)
    _write_synced(tmp / MANIFEST_FILE, lambda f: f.write(text.encode("utf-8")))
    _check_replaceable(out_dir, overwrite)     # again: another writer may have finished first
    if out_dir.exists():
      os.rename(out_dir, aside)
    try:
      os.rename(tmp, out_dir)
    except BaseException:
      if aside.exists():
        os.rename(aside, out_dir)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(aside, ignore_errors=True)


class LoadedExport:
  """A loaded export: ``features = loaded(images_uint8)``; ``manifest`` is its export.json."""

  def __init__(self, path, manifest: dict, exported, params):
    self.path = pathlib.Path(path)
    self.manifest = manifest
    self.image_size = tuple(manifest["image_size"])
    self.feature_dim = manifest["feature_dim"]
    self._exported = exported
    self._params = [jax.device_put(p) for p in params]
    self._call = jax.jit(exported.call)

  def __call__(self, images) -> np.ndarray:
    """uint8 RGB [batch, H, W, 3] (H×W = ``image_size``) → float32 features [batch, D]."""
    images = checked_images(images, self.image_size, self.path)
    return np.asarray(self._call(*self._params, images))


def checked_images(images, image_size, path):
  """`images` (an array) if they are what an export takes; else an error naming `path`."""
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"{path}: images must be uint8 RGB 0..255, got {images.dtype}")
  expected = (*image_size, 3)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
    raise ValueError(f"{path}: images must be [batch >= 1, {expected[0]}, {expected[1]}, 3] "
                     f"(resized to the model's H×W), got {tuple(images.shape)}")
  return images


def load(out_dir) -> LoadedExport:
  """Reads and checks an export folder written by ``export``."""
  out_dir = pathlib.Path(out_dir)
  manifest = _read_manifest(out_dir)
  for name in (MODULE_FILE, PARAMS_FILE):
    path = out_dir / name
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing; the export in {out_dir} is incomplete")
    recorded = manifest.get("files", {}).get(name, {}).get("sha256")
    if recorded is not None and _sha256(path) != recorded:
      raise DamagedExport(f"{path}: damaged (its sha256 is not the one {MANIFEST_FILE} records)")
  module_path = out_dir / MODULE_FILE
  try:
    exported = jax_export.deserialize(bytearray(module_path.read_bytes()))
  except Exception as error:  # noqa: BLE001 - whatever a damaged flatbuffer raises
    raise DamagedExport(f"{module_path}: cannot be deserialised ({error})") from error
  params = _read_params(out_dir / PARAMS_FILE, exported)
  return LoadedExport(out_dir, manifest, exported, params)


def _read_manifest(out_dir: pathlib.Path) -> dict:
  path = out_dir / MANIFEST_FILE
  if not out_dir.is_dir():
    raise FileNotFoundError(f"{out_dir}: no such export folder")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; {out_dir} is not a complete export")
  try:
    manifest = json.loads(path.read_text("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise DamagedExport(f"{path}: not valid JSON ({error})") from error
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DamagedExport(f"{path}: not a {FORMAT} manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise DamagedExport(f"{path}: format version {manifest.get('format_version')}, this code "
                        f"reads version {FORMAT_VERSION}")
  return manifest


def _read_params(path: pathlib.Path, exported) -> list[np.ndarray]:
  """The leaves p0000… of ``path``, each checked against the exported function's arguments."""
  expected = exported.in_avals[:-1]
  try:
    with np.load(path, allow_pickle=False) as npz:
      names = [_param_name(i) for i in range(len(expected))]
      if sorted(npz.files) != names:
        raise DamagedExport(f"{path}: holds {len(npz.files)} arrays, the module takes "
                            f"{len(expected)} parameters ({names[0]}…)")
      params = [npz[name] for name in names]   # reads every member whole: zip checks its CRC
  except DamagedExport:
    raise
  except Exception as error:  # noqa: BLE001 - zipfile / numpy errors of a damaged archive
    raise DamagedExport(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
  for name, x, aval in zip(names, params, expected):
    if x.shape != tuple(aval.shape) or x.dtype != aval.dtype:
      raise DamagedExport(f"{path}: {name} is {x.dtype}{list(x.shape)}, the module takes "
                          f"{aval.dtype}{list(aval.shape)}")
  return params
