"""The convolutional stems: the ICS stem of ``vit_ics_lup`` (its norms against NumPy statements of
torch's rules, per-group statistics, its convolutions' mixed-precision products, the model options
that select it; its import against the torch reference is in test_pretrained.py), the light conv
stem, and the export of a backbone that the importer reads back."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import traverse_util

from uad_jax.models import (backbone_export, conv_stem, norms, precision, pretrained,
                            reid_model, vit)

IMAGE = (64, 32)


def _bn_reference(x, groups, eps=1e-5):
  """torch's BatchNorm in training, run on each replica group alone: (y, mean, unbiased var)."""
  g = x.astype(np.float64).reshape(groups, -1, x.shape[-1])
  mean, var = g.mean(1, keepdims=True), g.var(1, keepdims=True)              # biased
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y, mean[:, 0].mean(0), g.var(1, ddof=1).mean(0)


def test_batch_norm_2d_statistics_are_per_group_over_rows_and_positions():
  rng = np.random.RandomState(0)
  x = (rng.randn(4, 5, 3, 6) * 2 + rng.randn(6)).astype(np.float32)
  bn = norms.GroupBatchNorm(num_groups=2, axis_name="stem")
  variables = bn.init(jax.random.key(0), jnp.asarray(x), train=True)
  y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  want, mean, unbiased = _bn_reference(x, 2)       # each group: 2 images × 5 × 3 positions
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
  y_eval = bn.apply({**variables, **updates}, jnp.asarray(x), train=False)
  np.testing.assert_allclose(y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5),
                             rtol=1e-4, atol=1e-5)


def test_ibn_is_instance_norm_on_the_first_half_and_batch_norm_on_the_rest():
  rng = np.random.RandomState(1)
  x = (rng.randn(4, 6, 4, 7) * 3 + 1).astype(np.float32)        # odd: 3 IN + 4 BN channels
  ibn = conv_stem.IBN(num_groups=2)
  variables = ibn.init(jax.random.key(0), jnp.asarray(x), train=True)
  params = jax.tree.map(lambda a: a + rng.randn(*a.shape).astype(np.float32) * 0.3,
                        nn.unbox(variables["params"]))
  y = ibn.apply({"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x),
                train=True, mutable=["batch_stats"])[0]
  a = x[..., :3].astype(np.float64)
  mean, var = a.mean((1, 2), keepdims=True), a.var((1, 2), keepdims=True)    # per image
  inst = (a - mean) / np.sqrt(var + 1e-5)
  inst = inst * params["instance_norm"]["scale"] + params["instance_norm"]["bias"]
  batch = _bn_reference(x[..., 3:], 2)[0]
  batch = batch * params["batch_norm"]["scale"] + params["batch_norm"]["bias"]
  np.testing.assert_allclose(y, np.concatenate([inst, batch], -1), rtol=1e-4, atol=1e-4)
  assert set(variables["batch_stats"]) == {"batch_norm"}        # InstanceNorm keeps no stats
  # Instance statistics are used in evaluation too: the output of an image is its own.
  y_eval = ibn.apply({"params": params, "batch_stats": variables["batch_stats"]},
                     jnp.asarray(x), train=False)
  y_one = ibn.apply({"params": params, "batch_stats": variables["batch_stats"]},
                    jnp.asarray(x[:1]), train=False)
  np.testing.assert_allclose(y_eval[:1], y_one, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y_eval[..., :3], inst, rtol=1e-4, atol=1e-4)


def test_stem_batch_norm_moves_by_the_average_of_its_groups_statistics():
  stem = conv_stem.ICSStem(width=8, num_groups=2)
  x = jnp.asarray(np.random.RandomState(2).randn(4, 16, 8, 3), jnp.float32)
  variables = stem.init(jax.random.key(0), x, train=True)
  out, state = stem.apply(variables, x, train=True, capture_intermediates=True,
                          mutable=["batch_stats", "intermediates"])
  assert out.shape == (4, 8, 4, 8) and out.dtype == jnp.float32
  conv3 = np.asarray(state["intermediates"]["conv3"]["__call__"][0])      # bn3's input
  _, mean, unbiased = _bn_reference(conv3, 2)
  stats = state["batch_stats"]["bn3"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased, rtol=1e-4)


def _ics_model(bn_groups, **kwargs):
  return reid_model.UADNet(num_classes=7, variant="mu/16", image_size=IMAGE, stem="ics",
                           stochastic_depth=0.0, bn_groups=bn_groups, **kwargs)


def test_two_replica_groups_are_two_independent_batches():
  x = jnp.asarray(np.random.RandomState(3).randn(4, *IMAGE, 3), jnp.float32)
  variables = _ics_model(2).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                                 train=True)

  def train(model, images):
    return model.apply(variables, images, train=True, mutable=["batch_stats"])

  (logits, feats), both = train(_ics_model(2), x)
  halves = [train(_ics_model(1), x[i:i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(logits, np.concatenate([h[0][0] for h in halves]), atol=2e-5)
  np.testing.assert_allclose(feats, np.concatenate([h[0][1] for h in halves]), atol=2e-5)
  average = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  for got, want in zip(jax.tree.leaves(both), jax.tree.leaves(average)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert "stem" in both["batch_stats"]["backbone"]


def test_inference_needs_batch_stats_with_the_ics_stem_only():
  x = jnp.zeros((2, *IMAGE, 3), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  ics = _ics_model(1)
  variables = ics.init(rngs, x, train=True)
  assert ics.apply(variables, x, train=False).shape == (2, 64)
  with pytest.raises(ValueError, match=r"backbone/stem/ibn1/batch_norm .*'batch_stats'"):
    ics.apply({"params": variables["params"]}, x, train=False)
  patch = reid_model.UADNet(num_classes=7, variant="mu/16", image_size=IMAGE)
  params = patch.init(rngs, x, train=True)["params"]
  assert patch.apply({"params": params}, x, train=False).shape == (2, 64)


def test_stem_width_follows_the_variant_and_the_parameters_carry_axis_names():
  x = jnp.zeros((1, *IMAGE, 3), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = _ics_model(1).init(rngs, x, train=True)
  stem = nn.unbox(variables["params"])["backbone"]["stem"]
  assert stem["conv1"]["kernel"].shape == (7, 7, 3, 16)                     # mu: 16 channels
  assert stem["ibn1"]["instance_norm"]["scale"].shape == (8,)
  assert nn.unbox(variables["params"])["backbone"]["patch_embed"]["kernel"].shape == (8 * 8 * 16,
                                                                                      64)
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
  specs = nn.get_partition_spec(variables["params"])["backbone"]["stem"]
  assert tuple(specs["conv2"]["kernel"]) == (None, None, "stem_in", "stem")
  wide = _ics_model(1, stem_width=32).init(rngs, x, train=True)
  assert nn.unbox(wide["params"])["backbone"]["stem"]["conv3"]["kernel"].shape == (3, 3, 32, 32)


def test_ics_vit_b16_parameter_count():
  model = reid_model.UADNet(num_classes=10, variant="B/16", stem="ics")
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((1, 256, 128, 3)), train=True))
  # The patch stem's 85,746,432, less its 16·16·3×768 projection, plus the stem's convolutions
  # (3·64·7·7 + 2·64·64·3·3), its norms' scales and biases (2·(32+32)·2 + 64·2) and the
  # 8·8·64×768 projection.
  stem = 3 * 64 * 49 + 2 * 64 * 64 * 9 + 2 * 64 * 2 + 64 * 2
  want = 85_746_432 - 16 * 16 * 3 * 768 + stem + 8 * 8 * 64 * 768
  assert reid_model.backbone_param_count(shapes["params"]) == want == 88_385_856
  stats = jax.tree.leaves(shapes["batch_stats"]["backbone"])
  assert sum(a.size for a in stats) == 2 * (32 + 32 + 64)
  assert model.patch_grid == (16, 8)


def test_unknown_stem_fails_clearly():
  with pytest.raises(ValueError, match="unknown ViT stem 'convs'"):
    vit.ViT("mu/16", IMAGE, stem="convs").init(jax.random.key(0), jnp.zeros((1, *IMAGE, 3)))


@pytest.mark.parametrize("size,stride,pad,hw", [(7, 2, 3, (17, 9)), (3, 1, 1, (12, 6)),
                                                (8, 8, 0, (16, 8)), (3, 2, 0, (11, 7))])
def test_conv_backward_products_are_the_transposes_of_the_forward(size, stride, pad, hw):
  """The stated backward convs, run in fp32, give autodiff's gradients exactly."""
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, *hw, 3), jnp.float32)
  w = jnp.asarray(rng.randn(size, size, 3, 5), jnp.float32)
  padding = ((pad, pad), (pad, pad))

  def ref(a, b):
    return jax.lax.conv_general_dilated(a, b, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")

  def ours(a, b):
    return precision._lowp_conv(a, b, jnp.dtype(jnp.float32), a.dtype, b.dtype,
                                (stride, stride), padding)

  y, back = jax.vjp(ours, x, w)
  want_y, want_back = jax.vjp(ref, x, w)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  for got, want in zip(back(g), want_back(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_bf16_conv_has_fp32_results_and_gradients():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 16, 8, 3), jnp.float32)
  w = jnp.asarray(rng.randn(7, 7, 3, 4) * 0.1, jnp.float32)
  pad = ((3, 3), (3, 3))
  out = precision.conv(x, w, jnp.bfloat16, (2, 2), pad)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, precision.conv(x, w, jnp.float32, (2, 2), pad), rtol=2e-2,
                             atol=5e-2)

  def loss(a, b, dtype):
    return jnp.sum(jnp.sin(precision.conv(a, b, dtype, (2, 2), pad)))

  for got, want in zip(jax.grad(loss, (0, 1))(x, w, jnp.bfloat16),
                       jax.grad(loss, (0, 1))(x, w, jnp.float32)):
    assert got.dtype == jnp.float32
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 2e-2


# ---------------------------------------------------------------- the light conv stem ("conv")

def _conv_model(groups):
  return reid_model.UADNet(num_classes=5, variant="mu/8", image_size=IMAGE, stem="conv",
                           stochastic_depth=0.0, bn_groups=groups)


def test_conv_stem_is_stride_two_convs_with_batch_norm_down_to_the_patch_grid():
  x = np.random.RandomState(5).randn(2, *IMAGE, 3).astype(np.float32)
  stem = conv_stem.EarlyConvStem(patch=8, width=4, max_width=6)
  variables = stem.init(jax.random.key(0), jnp.asarray(x), train=True)
  params = nn.unbox(variables["params"])
  assert [params[f"conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [(3, 3, 3, 4), (3, 3, 4, 6),
                                                                      (3, 3, 6, 6)]
  y, _ = stem.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  # The same stages stated with lax convolutions and the BatchNorm reference.
  h = x
  for i in (1, 2, 3):
    h = np.asarray(jax.lax.conv_general_dilated(
        h, params[f"conv{i}"]["kernel"], (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST))
    h = np.maximum(_bn_reference(h, 1)[0], 0.0)
  assert y.shape == (2, IMAGE[0] // 8, IMAGE[1] // 8, 6)
  np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="power of 2"):
    conv_stem.EarlyConvStem(patch=6).init(jax.random.key(0), jnp.asarray(x), train=True)


def test_conv_stem_replica_groups_are_independent_batches_and_inference_needs_stats():
  x = jnp.asarray(np.random.RandomState(6).randn(4, *IMAGE, 3), jnp.float32)
  variables = _conv_model(2).init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  x, train=True)
  (_, feats), both = _conv_model(2).apply(variables, x, train=True, mutable=["batch_stats"])
  halves = [_conv_model(1).apply(variables, x[i:i + 2], train=True, mutable=["batch_stats"])
            for i in (0, 2)]
  np.testing.assert_allclose(feats, np.concatenate([h[0][1] for h in halves]), atol=2e-5)
  average = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  for got, want in zip(jax.tree.leaves(both), jax.tree.leaves(average)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="batch_stats"):
    _conv_model(1).apply({"params": variables["params"]}, x, train=False)


@pytest.mark.parametrize("stem", ["patch", "ics", "conv"])
def test_an_exported_backbone_reads_back_exactly_through_the_importer(stem, tmp_path):
  model = reid_model.UADNet(num_classes=3, variant="mu/8", image_size=IMAGE, stem=stem)
  variables = nn.unbox(model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  jnp.zeros((2, *IMAGE, 3)), train=True))
  keys = iter(jax.random.split(jax.random.key(2), 1000))   # every leaf its own values
  variables = jax.tree.map(lambda a: a + jax.random.normal(next(keys), a.shape), variables)
  path = backbone_export.save_backbone(str(tmp_path / "b.safetensors"), variables)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  loaded, report = pretrained.load_backbone_variables(path, abstract, grid_hw=model.patch_grid,
                                                      log=None)
  assert report.missing == [] and report.unexpected == []
  flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  for collection in ("params", "batch_stats"):
    want = {k: v for k, v in flat(variables[collection]).items() if k.startswith("backbone/")}
    got = flat(loaded[collection])
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  names = set(safetensors_names(path))
  assert ("patch_embed.conv.0.weight" in names) == (stem == "ics")
  assert ("patch_embed.stem.0.conv.weight" in names) == (stem == "conv")
  with pytest.raises(ValueError, match="safetensors"):
    backbone_export.save_backbone(str(tmp_path / "b.pth"), variables)


def safetensors_names(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(path).keys()
