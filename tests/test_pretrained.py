"""The ImageNet and LUPerson checkpoint importer against what the reference computes with torch.

The small committed fixtures (tests/fixtures, made by make_pretrained_fixtures.py) hold a tiny
random timm ViT in the three formats and the torch model's features, and a tiny ICS-stem ViT
(``vit_ics_lup``) as a DINO checkpoint with its torch features; all load without torch.
The full ViT-B/16 check runs where torch and timm are installed and is skipped elsewhere.
"""
import os
import re
import sys
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from uad_jax.models import pretrained, reid_model, torch_pickle
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


@pytest.mark.parametrize("suffix", pretrained.SUFFIXES)
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 torn zip"])
def test_a_file_that_cannot_be_parsed_is_named(tmp_path, suffix, content):
  path = tmp_path / f"weights{suffix}"
  path.write_bytes(content)
  with pytest.raises(ValueError) as error:
    pretrained.read_checkpoint(str(path))
  assert str(path) in str(error.value)


def test_an_npz_holding_one_array_is_named(tmp_path):
  path = tmp_path / "single.npz"
  with open(path, "wb") as f:
    np.save(f, np.zeros(3))    # an .npy file under an .npz name
  with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable .npz")):
    pretrained.read_checkpoint(str(path))


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


# The ICS-stem backbone (vit_ics_lup) and its LUPerson / TransReID-SSL checkpoints. The fixture is
# a DINO checkpoint ({"teacher": {"module.backbone.*": ...}}) of a tiny torch ICS ViT "pretrained"
# at 192×96 (a 12×6 grid), with random stem norms and running statistics.
ICS_PTH = os.path.join(FIXTURES, "tiny_ics.pth")


def _ics_model_and_variables():
  model = reid_model.UADNet(num_classes=5, variant="mu/16", stem="ics", stochastic_depth=0.0)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         np.zeros((1, 256, 128, 3), np.float32), train=True)
  return model, {"params": nn.unbox(variables["params"]),
                 "batch_stats": variables["batch_stats"]}


def _stem_stats(batch_stats):
  flat = traverse_util.flatten_dict(batch_stats["backbone"], sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def test_ics_checkpoint_gives_the_torch_features_and_statistics():
  model, variables = _ics_model_and_variables()
  expected = np.load(os.path.join(FIXTURES, "tiny_ics_expected.npz"))
  loaded, report = pretrained.load_backbone_variables(ICS_PTH, variables,
                                                      grid_hw=model.patch_grid, log=None)
  assert report.missing == []
  assert report.unexpected == ["teacher.module.head.last_layer.weight_g"]   # DINO's head
  assert report.pos_embed_resized == ((12, 6), (16, 8))                     # read as H = 2W
  assert "batch_stats/stem/bn3/var" in report.loaded
  np.testing.assert_allclose(loaded["params"]["backbone"]["pos_embed"], expected["pos_embed"],
                             atol=1e-6)
  images = fixture_images()
  features = np.asarray(model.apply(loaded, images, train=False))
  np.testing.assert_allclose(features, expected["features"], atol=1e-4, rtol=0)
  # Training mode: the stem normalises with the batch's statistics and moves the running ones
  # from the checkpoint's, as torch does on the same batch (one replica group).
  (_, train_features), updates = model.apply(loaded, images, train=True,
                                             mutable=["batch_stats"])
  np.testing.assert_allclose(train_features, expected["train_features"], atol=1e-4, rtol=0)
  for name, want in _stem_stats(updates["batch_stats"]).items():
    np.testing.assert_allclose(want, expected[f"train_stats/{name}"], rtol=1e-5, atol=1e-6)
  # Leaves outside the backbone are left exactly as given.
  assert loaded["params"]["classifier"]["kernel"] is variables["params"]["classifier"]["kernel"]
  assert loaded["batch_stats"]["bnneck"]["var"] is variables["batch_stats"]["bnneck"]["var"]


def _teacher_backbone():
  """The fixture's backbone state dict, names without DINO's prefixes."""
  teacher = torch_pickle.load(ICS_PTH)["teacher"]
  return {k.removeprefix("module.backbone."): v for k, v in teacher.items()
          if k.startswith("module.backbone.")}


@pytest.mark.parametrize("layout", ["model", "state_dict", "model+state_dict", "teacher"])
def test_ics_checkpoint_key_layouts(layout, tmp_path, monkeypatch):
  """The reference's load_param finds the weights under model, then state_dict, then a DINO
  teacher (``module.`` stripped, ``backbone.*`` kept); every layout loads the same tensors."""
  model, variables = _ics_model_and_variables()
  state = _teacher_backbone()
  wrapped = {"model": {"model": state, "epoch": 3}, "state_dict": {"state_dict": state},
             "model+state_dict": {"model": {"state_dict": state}},
             "teacher": {"teacher": {f"backbone.{k}": v for k, v in state.items()},
                         "student": {"backbone.cls_token": np.zeros(1, np.float32)}}}[layout]
  want, _ = pretrained.load_backbone_variables(ICS_PTH, variables, grid_hw=model.patch_grid,
                                               log=None)
  monkeypatch.setattr(pretrained.torch_pickle, "load", lambda path: wrapped)
  (tmp_path / "ics.pth").write_bytes(b"")
  got, report = pretrained.load_backbone_variables(str(tmp_path / "ics.pth"), variables,
                                                   grid_hw=model.patch_grid, log=None)
  assert report.missing == [] and report.unexpected == []   # num_batches_tracked: ignored
  assert any(n.endswith("num_batches_tracked") for n in state)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_position_grid_is_read_with_the_height_width_ratio():
  assert pretrained.pos_grid_shape(128, 2) == (16, 8)        # a LUPerson 256×128 checkpoint
  assert pretrained.pos_grid_shape(72, 2) == (12, 6)
  assert pretrained.pos_grid_shape(196) == (14, 14)
  with pytest.raises(ValueError, match="128 position tokens .* hw_ratio=2"):
    pretrained.pos_grid_shape(128)
  with pytest.raises(ValueError, match="196 position tokens are no grid of height:width 2"):
    pretrained.pos_grid_shape(196, 2)
  # 16×8 → 24×8 (a 384×128 model): the grid resized bilinearly as H×W, the CLS slot kept.
  pos = np.random.RandomState(0).randn(1, 129, 4).astype(np.float32)
  out = pretrained.resize_pos_embed(pos, (24, 8), hw_ratio=2)
  assert out.shape == (1, 193, 4)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  want = pretrained.resize_bilinear(pos[0, 1:].reshape(16, 8, 4), (24, 8)).reshape(1, 192, 4)
  np.testing.assert_allclose(out[:, 1:], want, atol=1e-6)
  np.testing.assert_allclose(out[0, 1:].reshape(24, 8, 4)[:, 0, 0],   # columns stay columns
                             np.interp((np.arange(24) + 0.5) * 16 / 24 - 0.5, np.arange(16),
                                       pos[0, 1:].reshape(16, 8, 4)[:, 0, 0]), atol=1e-6)


def test_ics_import_errors_name_the_file_and_tensor(tmp_path, monkeypatch):
  model, variables = _ics_model_and_variables()
  # Running statistics would be dropped by a params-only import: refused.
  with pytest.raises(ValueError, match=r"tiny_ics.pth holds BatchNorm running statistics "
                                       r"\(batch_stats/stem/.*load_backbone_variables"):
    pretrained.load_backbone(ICS_PTH, variables["params"], grid_hw=model.patch_grid, log=None)
  # A square reading of the 12×6 grid fails, naming the file and the tensor.
  with pytest.raises(ValueError, match=r"tiny_ics.pth: tensor pos_embed \(1, 73, 64\): 72 "):
    pretrained.load_backbone_variables(ICS_PTH, variables, grid_hw=model.patch_grid, hw_ratio=1,
                                       log=None)
  # An ICS checkpoint for the patch stem, and an ImageNet one for the ICS stem.
  _, params = _model_and_params()
  with pytest.raises(ValueError, match=r"tiny_ics.pth: tensor for backbone/patch_embed/kernel "
                                       r"has shape \(1024, 64\), the model expects \(768, 64\)"):
    pretrained.load_backbone(ICS_PTH, params, grid_hw=(16, 8), log=None)
  with pytest.raises(ValueError, match=r"backbone/patch_embed/kernel has shape \(768, 64\)"):
    pretrained.load_backbone_variables(os.path.join(FIXTURES, "tiny_vit.pth"), variables,
                                       grid_hw=(16, 8), log=None)
  # A stem tensor of the wrong shape, and an unknown variables collection.
  state = _teacher_backbone()
  state["patch_embed.conv.3.weight"] = np.zeros((16, 16, 5, 5), np.float32)
  monkeypatch.setattr(pretrained.torch_pickle, "load", lambda path: {"model": state})
  (tmp_path / "bad.pth").write_bytes(b"")
  with pytest.raises(ValueError, match=r"bad.pth: tensor for backbone/stem/conv2/kernel has "
                                       r"shape \(5, 5, 16, 16\), the model expects "
                                       r"\(3, 3, 16, 16\)"):
    pretrained.load_backbone_variables(str(tmp_path / "bad.pth"), variables, grid_hw=(16, 8),
                                       log=None)
  with pytest.raises(ValueError, match="collection 'cache'"):
    pretrained.load_backbone_variables(ICS_PTH, {**variables, "cache": {}}, log=None)


def test_ics_vit_b16_matches_the_torch_reference(tmp_path):
  if not timm_peer.available():
    pytest.skip("torch/timm not installed: the full-size comparison needs them")
  import torch
  from make_pretrained_fixtures import ics_vit
  torch.manual_seed(0)
  source = ics_vit((256, 128), embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                   stem_width=64)
  with torch.no_grad():
    for name, b in source.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.3 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
    source.pos_embed.normal_(0, 0.02)
  source.eval()
  images = fixture_images(batch=1)
  with torch.no_grad():
    want = source(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  path = str(tmp_path / "lup.pth")
  torch.save({"teacher": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}},
             path)
  del source
  model = reid_model.UADNet(num_classes=5, variant="B/16", stem="ics")
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      np.zeros((1, 256, 128, 3), np.float32), train=True))
  variables = {"params": nn.unbox(shapes["params"]), "batch_stats": shapes["batch_stats"]}
  loaded, report = pretrained.load_backbone_variables(path, variables, grid_hw=model.patch_grid,
                                                      log=None)
  assert report.missing == [] and report.unexpected == []
  assert report.pos_embed_resized is None                    # 129 tokens: read as they are
  got = np.asarray(model.apply(loaded, images, train=False))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
