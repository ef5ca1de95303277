"""The inference function as an ONNX model (jax2onnx), run with ONNX Runtime.

The same function as ``serving_export``: uint8 RGB images [batch, H, W, 3] already resized to the
model's H×W in, float32 pre-BN global features [batch, D] out, normalised inside as
``augment.normalize`` does; the batch dimension is dynamic (``batch``). The parameters are the
graph's initializers, so the .onnx file is the whole model. Its manifest (JSON) is the model's
``metadata_props["uad_jax.manifest"]``, which ONNX Runtime reads back as custom metadata.

Compute dtype: the graph is always the model's float32 policy (the same parameters, products in
fp32). jax2onnx converts the bfloat16 policy too, but ONNX Runtime's CPU kernels have no bfloat16
Einsum, so that graph does not load; the manifest records the dtype the model trained with.

This is the only module that imports jax2onnx, onnx and onnxruntime, lazily: they are an extra,
installed with ``INSTALL`` on top of requirements.txt (see requirements-onnx.txt for why
``--no-deps``).
"""
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import logging
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.data import augment
from uad_jax.models import serving_export

FORMAT = "uad-jax-onnx-features"
FORMAT_VERSION = 1
OPSET = 23                      # ONNX Runtime 1.31 runs up to opset 23 on CPU
MANIFEST_KEY = "uad_jax.manifest"
INSTALL = "pip install --no-deps -r requirements-onnx.txt"


def _require(*names):
  """The named modules, or an ImportError that says how to install the extra."""
  modules = []
  for name in names:
    try:
      modules.append(importlib.import_module(name))
    except ImportError as error:
      raise ImportError(f"ONNX export needs {name}, which is not importable ({error}). Install "
                        f"the ONNX extra on top of requirements.txt: `{INSTALL}`") from error
  return modules


def require():
  """Fails now, naming the install command, if the ONNX extra is missing (before a long job)."""
  _require("jax2onnx", "onnx", "onnxruntime")


class _DropKnownNoise(logging.Filter):
  """jax2onnx loads every plugin it ships and warns, with a traceback, about those for Equinox and
  dm-pix, which are not installed (our model uses neither); onnx-ir warns of untyped shape
  constants whose value info it skips. Neither changes the graph."""

  def filter(self, record):
    message = record.getMessage()
    return not ("No module named 'equinox'" in message or "No module named 'dm_pix'" in message
                or message.startswith("The value type for shape"))


@contextlib.contextmanager
def _quiet_conversion():
  loggers = [logging.getLogger(n) for n in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")]
  noise = _DropKnownNoise()
  for logger in loggers:
    logger.addFilter(noise)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(noise)


def export_onnx(model, variables, image_size, path, *, metadata: dict | None = None,
                overwrite: bool = False, opset: int = OPSET) -> dict:
  """Writes ``model``'s inference function with ``variables`` to the .onnx file ``path``,
  atomically; returns its manifest. An existing file is replaced only with ``overwrite=True``."""
  jax2onnx, onnx = _require("jax2onnx", "onnx")
  height, width = serving_export.check_image_size(model, image_size)
  metadata = dict(metadata or {})
  json.dumps(metadata, allow_nan=False)
  path = pathlib.Path(path)
  if path.suffix != ".onnx":
    raise ValueError(f"{path}: ONNX models are written as .onnx files")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

  fp32_model = model.clone(dtype=jnp.float32)
  values = serving_export.inference_variables(variables)

  def features(images):
    out = fp32_model.apply(values, augment.normalize_batch(images), train=False)
    return out.astype(jnp.float32)

  spec = jax.ShapeDtypeStruct((serving_export.BATCH, height, width, 3), jnp.uint8)
  with _quiet_conversion(), nn.logical_axis_rules(()):
    proto = jax2onnx.to_onnx(features, [spec], model_name="uad_features", opset=opset,
                             input_names=["images"], output_names=["features"])
  feature_dim = int(proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
  manifest = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "image_size": [height, width],
      "input": {"name": "images", "dtype": "uint8",
                "shape": [serving_export.BATCH, height, width, 3],
                "description": serving_export.INPUT_DESCRIPTION},
      "output": {"name": "features", "dtype": "float32",
                 "shape": [serving_export.BATCH, feature_dim],
                 "description": "pre-BN global feature (final-LayerNorm CLS token)"},
      "feature_dim": feature_dim,
      "dynamic_batch": True,
      "model": {"class": type(model).__name__, "variant": model.variant, "stem": model.stem,
                "dtype": jnp.dtype(model.dtype).name},
      "compute_dtype": "float32",
      "compute_dtype_note": ("the model's float32 policy: ONNX Runtime's CPU kernels have no "
                             "bfloat16 Einsum" if jnp.dtype(model.dtype) != jnp.float32
                             else "the model's own dtype"),
      "opset": opset,
      "jax_version": jax.__version__, "jax2onnx_version": _version("jax2onnx"),
      "onnx_version": onnx.__version__,
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "metadata": metadata,
  }
  entry = proto.metadata_props.add()
  entry.key, entry.value = MANIFEST_KEY, json.dumps(manifest, ensure_ascii=False, allow_nan=False)
  _save_atomically(proto, path, overwrite)
  return manifest


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def _save_atomically(proto, path: pathlib.Path, overwrite: bool):
  """A temporary sibling renamed into place: readers see the old file or the whole new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(proto.SerializeToString())
      f.flush()
      os.fsync(f.fileno())
    if path.exists() and not overwrite:       # again: another writer may have finished first
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


class OnnxFeatures:
  """An exported .onnx in an ONNX Runtime session: ``features = onnx_features(images_uint8)``."""

  def __init__(self, path, session, manifest: dict):
    self.path = pathlib.Path(path)
    self.manifest = manifest
    self.image_size = tuple(manifest["image_size"])
    self._session = session

  def __call__(self, images) -> np.ndarray:
    """uint8 RGB [batch, H, W, 3] (H×W = ``image_size``) → float32 features [batch, D]."""
    images = np.asarray(serving_export.checked_images(images, self.image_size, self.path))
    return self._session.run(["features"], {"images": images})[0]


def load_onnx(path, providers=("CPUExecutionProvider",)) -> OnnxFeatures:
  """An ONNX Runtime session of an .onnx written by ``export_onnx``, checked."""
  (ort,) = _require("onnxruntime")
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such ONNX model")
  try:
    session = ort.InferenceSession(str(path), providers=list(providers))
  except Exception as error:  # noqa: BLE001 - onnxruntime's errors of a damaged file
    raise serving_export.DamagedExport(f"{path}: ONNX Runtime cannot load it ({error})") from error
  text = session.get_modelmeta().custom_metadata_map.get(MANIFEST_KEY)
  manifest = json.loads(text) if text else None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise serving_export.DamagedExport(f"{path}: not a {FORMAT} model (no manifest)")
  return OnnxFeatures(path, session, manifest)
