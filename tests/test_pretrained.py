"""The ImageNet checkpoint importer against what the reference computes with timm.

The small committed fixtures (tests/fixtures, made by make_pretrained_fixtures.py) hold a tiny
random timm ViT in the three formats and the torch model's features; all three load without torch.
The full ViT-B/16 check runs where torch and timm are installed and is skipped elsewhere.
"""
import os
import sys
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from uad_jax.models import pretrained, reid_model
from uad_jax.testing import timm_peer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)
from make_pretrained_fixtures import fixture_images  # noqa: E402


def _model_and_params(variant="mu/16"):
  model = reid_model.UADNet(num_classes=5, variant=variant)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      np.zeros((1, 256, 128, 3), np.float32), train=True))
  return model, nn.unbox(shapes["params"])


def _features(model, params, images):
  return np.asarray(model.apply({"params": params}, images, train=False))


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_tiny_checkpoint_gives_the_torch_features(fmt):
  model, params = _model_and_params()
  expected = np.load(os.path.join(FIXTURES, "tiny_vit_expected.npz"))
  loaded, report = pretrained.load_backbone(os.path.join(FIXTURES, f"tiny_vit.{fmt}"), params,
                                            grid_hw=model.patch_grid, log=None)
  assert report.missing == []
  head = ["head/bias", "head/kernel"] if fmt == "npz" else ["head.bias", "head.weight"]
  assert report.unexpected == head
  assert report.pos_embed_resized == ((14, 14), (16, 8))
  np.testing.assert_allclose(loaded["backbone"]["pos_embed"], expected["pos_embed"], atol=1e-6)
  np.testing.assert_allclose(_features(model, loaded, fixture_images()), expected["features"],
                             atol=1e-4, rtol=0)
  # Leaves outside the backbone are left exactly as given.
  assert loaded["classifier"]["kernel"] is params["classifier"]["kernel"]


def test_resize_follows_torch_bilinear_align_corners_false():
  grid = np.array([[0.0, 1.0], [2.0, 3.0]])[..., None]
  up = pretrained.resize_bilinear(grid, (4, 4))[..., 0]
  np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
                                  [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]])
  # Downsampling samples two neighbours, no antialiasing over the whole footprint.
  line = np.arange(8.0).reshape(1, 8, 1)
  np.testing.assert_allclose(pretrained.resize_bilinear(line, (1, 2))[0, :, 0], [1.5, 5.5])


def test_shape_mismatch_names_the_tensor(tmp_path):
  _, params = _model_and_params("Ti/16")
  with pytest.raises(ValueError, match=r"backbone/\S+ has shape"):
    pretrained.load_backbone(os.path.join(FIXTURES, "tiny_vit.safetensors"), params,
                             grid_hw=(16, 8), log=None)


def test_missing_and_unexpected_tensors_are_reported(tmp_path):
  model, params = _model_and_params()
  state = load_file(os.path.join(FIXTURES, "tiny_vit.safetensors"))
  del state["blocks.1.mlp.fc2.bias"]
  state["some.extra"] = np.zeros(3, np.float32)
  path = str(tmp_path / "partial.safetensors")
  save_file(state, path)
  logged = []
  loaded, report = pretrained.load_backbone(path, params, grid_hw=model.patch_grid,
                                            log=logged.append)
  assert report.missing == ["block1/mlp/fc2/bias"]
  assert "some.extra" in report.unexpected
  assert "block1/mlp/fc2/bias" in logged[0]
  assert isinstance(loaded["backbone"]["block1"]["mlp"]["fc2"]["bias"], jax.ShapeDtypeStruct)


def test_bad_paths_and_formats_fail_clearly(tmp_path):
  _, params = _model_and_params()
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    pretrained.load_backbone(str(tmp_path / "nope.npz"), params, log=None)
  odd = tmp_path / "weights.ckpt"
  odd.write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown checkpoint format .*weights.ckpt"):
    pretrained.load_backbone(str(odd), params, log=None)
  with pytest.raises(ValueError, match="grid_hw"):
    pretrained.load_backbone(os.path.join(FIXTURES, "tiny_vit.npz"), params, log=None)
  garbage = tmp_path / "x.pth"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="x.pth is not a torch zip checkpoint"):
    pretrained.load_backbone(str(garbage), params, log=None)


def test_pth_needs_no_torch_and_runs_nothing_from_the_pickle(tmp_path, monkeypatch):
  model, params = _model_and_params()
  monkeypatch.setitem(sys.modules, "torch", None)      # as if torch were not installed
  _, report = pretrained.load_backbone(os.path.join(FIXTURES, "tiny_vit.pth"), params,
                                       grid_hw=model.patch_grid, log=None)
  assert report.missing == []
  marker = tmp_path / "pwned"
  # torch's layout around a pickle that would run a shell command if its globals were resolved.
  evil = tmp_path / "evil.pth"
  with zipfile.ZipFile(evil, "w") as archive:
    archive.writestr("evil/data.pkl", f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
  with pytest.raises(ValueError, match=r"evil.pth: refusing the global os\.system"):
    pretrained.load_backbone(str(evil), params, log=None)
  assert not marker.exists()


def test_vit_b16_in_every_format_matches_timm(tmp_path):
  if not timm_peer.available():
    pytest.skip("torch/timm not installed: the full-size comparison needs them")
  import torch
  from safetensors.torch import save_file as save_torch
  timm = timm_peer.import_timm()
  torch.manual_seed(0)
  source = timm.create_model("vit_base_patch16_224", pretrained=False)
  images = fixture_images(batch=1)
  want_feats, want_pos = timm_peer.reid_reference_features(source, images)
  state = {k: v.contiguous() for k, v in source.state_dict().items()}
  paths = {"safetensors": tmp_path / "vit.safetensors", "pth": tmp_path / "vit.pth",
           "npz": tmp_path / "vit.npz"}
  save_torch(state, str(paths["safetensors"]))
  torch.save(state, str(paths["pth"]))
  timm_peer.state_dict_to_google_npz(state, str(paths["npz"]), num_heads=12)
  del source, state
  model, params = _model_and_params("B/16")
  for fmt, path in paths.items():
    loaded, report = pretrained.load_backbone(str(path), params, grid_hw=model.patch_grid,
                                              log=None)
    assert report.missing == [], fmt
    np.testing.assert_allclose(loaded["backbone"]["pos_embed"], want_pos, atol=1e-6)
    np.testing.assert_allclose(_features(model, loaded, images), want_feats, atol=1e-4, rtol=0,
                               err_msg=fmt)
    os.remove(path)
