"""Serving exports: the StableHLO artifact (jax.export) and the ONNX model give the live model's
features, for any batch size, and a damaged or clashing export fails loudly."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from uad_jax.data import augment
from uad_jax.models import onnx_export, serving_export
from uad_jax.testing import configs
from uad_jax.training import train_state

STEMS = ("conv", "patch")   # the synthetic demo's stem and the reference's
TOLERANCE = 1e-5            # max abs difference of the features
# Batch sizes never seen at export (the batch is symbolic there); init uses 2.
BATCHES = (3, 5)


def _model_and_variables(stem):
  """The synthetic preset's tiny ViT (bfloat16 products) with this stem, and random variables of
  its init's shapes (no init run: the conv stem's forward takes seconds to compile on the CPU).
  The BatchNorms' running statistics are far from init's 0 and 1, so an export that dropped
  them would show it."""
  config = configs.with_fields({"model.stem": stem})
  model = train_state.build_model(config, num_classes=5)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((2, *model.image_size, 3)), train=True))
  rng = np.random.default_rng(0)

  def draw(path, x):
    if path[-1] == "mean":
      return rng.normal(0, 0.3, x.shape)
    if path[-1] == "var":
      return rng.uniform(0.5, 2.0, x.shape)
    if path[-1] in ("scale", "bias"):
      return (path[-1] == "scale") + rng.normal(0, 0.1, x.shape)
    return rng.normal(0, np.prod(x.shape[:-1]) ** -0.5, x.shape)

  variables = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(nn.unbox(shapes[collection]))
    variables[collection] = traverse_util.unflatten_dict(
        {path: draw(path, x).astype(x.dtype) for path, x in flat.items()})
  return model, variables


def _images(batch, image_size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, *image_size, 3), dtype=np.uint8)


def _live(model, variables, images):
  """The features evaluation computes: the test transform's normalisation, then the model."""
  normalised = np.stack([augment.normalize(image) for image in images])
  features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, normalised)
  # A comparison means something only if the features depend on the images.
  assert np.std(np.asarray(features), axis=0).max() > 1e-2
  return np.asarray(features)


def _max_error(a, b):
  assert a.shape == b.shape and a.dtype == b.dtype == np.float32, (a.shape, a.dtype, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module", params=STEMS)
def stem_export(request, tmp_path_factory):
  model, variables = _model_and_variables(request.param)
  out_dir = tmp_path_factory.mktemp(f"export_{request.param}") / "export"
  manifest = serving_export.export(model, variables, model.image_size, out_dir,
                                   metadata={"stem": request.param, "step": 7})
  return model, variables, out_dir, manifest


def test_stablehlo_round_trip_gives_the_live_features_for_any_batch(stem_export):
  model, variables, out_dir, manifest = stem_export
  loaded = serving_export.load(out_dir)
  assert loaded.manifest == manifest
  for batch in BATCHES:
    images = _images(batch, model.image_size, seed=batch)
    error = _max_error(loaded(images), _live(model, variables, images))
    print(f"{model.stem} stem, batch {batch}: StableHLO max abs error {error:.2e}")
    assert error <= TOLERANCE
  assert not isinstance(loaded._exported.in_avals[-1].shape[0], int)      # symbolic batch
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["feature_dim"] == 64 and manifest["image_size"] == list(model.image_size)
  assert manifest["metadata"] == {"stem": model.stem, "step": 7}
  assert manifest["model"]["dtype"] == "bfloat16"
  assert manifest["model"]["activations"] == "float32"      # the form every platform lowers
  assert "6 months" in manifest["compatibility"]["statement"]
  # Only what inference reads: the classifier and the BNNeck stay behind, the stem's
  # BatchNorm statistics do not.
  paths = [p["path"] for p in manifest["params"]]
  assert not any(p.startswith(("params/classifier", "params/bnneck", "batch_stats/bnneck"))
                 for p in paths)
  assert any(p.startswith("batch_stats/backbone/stem") for p in paths) == (model.stem == "conv")
  assert manifest["num_params"] == len(paths)
  with pytest.raises(TypeError, match="uint8"):
    loaded(_images(2, model.image_size).astype(np.float32))
  with pytest.raises(ValueError, match=r"\[batch >= 1, 64, 32, 3\]"):
    loaded(_images(2, (32, 64)))


def _docstring_snippet() -> str:
  """The indented block after the docstring's line about running with jax and numpy only."""
  lines = serving_export.__doc__.splitlines()
  start = next(i for i, line in enumerate(lines) if "nothing but jax and numpy" in line) + 2
  end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    "))
  return textwrap.dedent("\n".join(lines[start:end]))


def test_the_docstring_snippet_runs_with_jax_and_numpy_alone(stem_export, tmp_path):
  model, variables, out_dir, _ = stem_export
  images = _images(4, model.image_size, seed=11)
  np.save(tmp_path / "images.npy", images)
  script = "\n".join([
      "import importlib.util",
      "assert importlib.util.find_spec('uad_jax') is None, 'uad_jax is importable'",
      "import numpy as np",
      "images = np.load('images.npy')",
      _docstring_snippet().replace("EXPORT", str(out_dir)),
      "np.save('features.npy', features)"])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  features = np.load(tmp_path / "features.npy")
  np.testing.assert_array_equal(features, serving_export.load(out_dir)(images))
  assert _max_error(features, _live(model, variables, images)) <= TOLERANCE


def _listing(folder):
  return sorted(p.name for p in folder.iterdir())


def _files(folder):
  return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_export_is_replaced_only_when_asked(stem_export, tmp_path, monkeypatch):
  model, variables, _, _ = stem_export
  out_dir = tmp_path / "export"
  serving_export.export(model, variables, model.image_size, out_dir, metadata={"v": 1})
  before = _files(out_dir)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    serving_export.export(model, variables, model.image_size, out_dir, metadata={"v": 2})
  assert _files(out_dir) == before

  # A write that fails half-way leaves the old export whole and no temporary folder behind.
  def broken_savez(*args, **kwargs):
    raise OSError("disk full")
  with monkeypatch.context() as patch:
    patch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
      serving_export.export(model, variables, model.image_size, out_dir, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
      serving_export.export(model, variables, model.image_size, tmp_path / "new")
  assert _files(out_dir) == before
  assert _listing(tmp_path) == ["export"]

  serving_export.export(model, variables, model.image_size, out_dir, metadata={"v": 2},
                        overwrite=True)
  assert serving_export.load(out_dir).manifest["metadata"] == {"v": 2}
  assert _listing(tmp_path) == ["export"]

  # A folder that is not an export is never replaced, even when asked.
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not an export"):
    serving_export.export(model, variables, model.image_size, other, overwrite=True)
  assert _listing(other) == ["keep.txt"]


def _copy(out_dir, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(out_dir, target)
  return target


def test_a_missing_or_damaged_export_fails_naming_the_file(stem_export, tmp_path):
  _, _, out_dir, _ = stem_export
  missing = _copy(out_dir, tmp_path, "missing")
  (missing / "model.jaxexport").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing/model\.jaxexport: missing"):
    serving_export.load(missing)
  no_manifest = _copy(out_dir, tmp_path, "no_manifest")
  (no_manifest / "export.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"no_manifest/export\.json: missing"):
    serving_export.load(no_manifest)
  with pytest.raises(FileNotFoundError, match="no such export folder"):
    serving_export.load(tmp_path / "nowhere")

  truncated = _copy(out_dir, tmp_path, "truncated")
  data = (truncated / "params.npz").read_bytes()
  (truncated / "params.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(serving_export.DamagedExport, match=r"truncated/params\.npz: damaged"):
    serving_export.load(truncated)
  # Without the recorded checksums the archive's own checks still catch it.
  manifest = json.loads((truncated / "export.json").read_text())
  del manifest["files"]
  (truncated / "export.json").write_text(json.dumps(manifest))
  with pytest.raises(serving_export.DamagedExport, match=r"truncated/params\.npz: cannot be read"):
    serving_export.load(truncated)

  flipped = _copy(out_dir, tmp_path, "flipped")
  module = bytearray((flipped / "model.jaxexport").read_bytes())
  module[len(module) // 2] ^= 0xFF
  (flipped / "model.jaxexport").write_bytes(bytes(module))
  with pytest.raises(serving_export.DamagedExport, match=r"flipped/model\.jaxexport: damaged"):
    serving_export.load(flipped)

  bad_json = _copy(out_dir, tmp_path, "bad_json")
  (bad_json / "export.json").write_text("{")
  with pytest.raises(serving_export.DamagedExport, match=r"bad_json/export\.json: not valid JSON"):
    serving_export.load(bad_json)


def test_onnx_round_trip_gives_the_live_features_for_any_batch(stem_export, tmp_path):
  if importlib.util.find_spec("jax2onnx") is None:
    pytest.skip(f"jax2onnx is not installed: {onnx_export.INSTALL}")
  model, variables, _, _ = stem_export
  path = tmp_path / "features.onnx"
  manifest = onnx_export.export_onnx(model, variables, model.image_size, path,
                                     metadata={"step": 7})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    onnx_export.export_onnx(model, variables, model.image_size, path)
  assert _listing(tmp_path) == ["features.onnx"]
  loaded = onnx_export.load_onnx(path)
  assert loaded.manifest == manifest and manifest["metadata"] == {"step": 7}
  # ONNX Runtime has no bfloat16 Einsum on CPU: the graph is the model's float32 policy.
  assert manifest["model"]["dtype"] == "bfloat16" and manifest["compute_dtype"] == "float32"
  fp32_model = model.clone(dtype=jnp.float32)
  for batch in BATCHES:
    images = _images(batch, model.image_size, seed=batch)
    error = _max_error(loaded(images), _live(fp32_model, variables, images))
    print(f"{model.stem} stem, batch {batch}: ONNX max abs error {error:.2e}")
    assert error <= TOLERANCE
  with pytest.raises(TypeError, match="uint8"):
    loaded(_images(2, model.image_size).astype(np.float32))


def test_onnx_export_without_the_extra_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)      # import raises ImportError
  model, variables = _model_and_variables("patch")
  install = r"jax2onnx.*`pip install --no-deps -r requirements-onnx\.txt`"
  with pytest.raises(ImportError, match=install):
    onnx_export.require()
  with pytest.raises(ImportError, match=install):
    onnx_export.export_onnx(model, variables, model.image_size, "/nonexistent/x.onnx")
