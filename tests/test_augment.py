"""Train and test transforms against spec §3, on synthetic images with known content."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from uad_jax.data import augment

H, W = 64, 32


def _coordinate_image(height=H, width=W):
  """uint8 image whose pixels say where they are: R = row + 1, G = column + 1, B = 200."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], -1).astype(np.uint8)


def _photo(seed=0, size=(40, 23)):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _reference_normalize(pixels):
  return (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def test_train_output_shape_dtype_and_range():
  rng = np.random.default_rng(0)
  for size in [(H, W), (256, 128)]:
    out = augment.train_transform(_photo(), rng, size, erase_prob=0.0)
    assert out.shape == (*size, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_plain_train_path_is_bicubic_resize_then_normalise():
  image = _photo()
  out = augment.train_transform(image, np.random.default_rng(0), (H, W), flip_prob=0.0,
                                padding=0, erase_prob=0.0)
  expected = _reference_normalize(np.asarray(image.resize((W, H), Image.BICUBIC)))
  np.testing.assert_array_equal(out, expected)


def test_eval_input_is_bilinear_resize_then_normalise():
  """What evaluation feeds the model: the host's `test_resize`, normalised on the device."""
  image = _photo(1)
  expected = _reference_normalize(np.asarray(image.resize((W, H), Image.BILINEAR)))
  eval_input = np.asarray(augment.normalize_batch(augment.test_resize(image, (H, W))))
  np.testing.assert_array_equal(eval_input, expected)
  assert not np.array_equal(eval_input,
                            _reference_normalize(np.asarray(image.resize((W, H), Image.BICUBIC))))


def test_normalise_maps_0_255_to_minus_one_one():
  out = augment.normalize(np.array([[[0, 255, 51]]], np.uint8))
  np.testing.assert_allclose(out, [[[-1.0, 1.0, 51 / 127.5 - 1]]], rtol=1e-6)


def _offset_of(crop, flipped):
  """(top, left) of a crop of the zero-padded coordinate image, from any non-padding pixel."""
  row, col = np.argwhere(crop[..., 2] == 200)[0]
  source_row = crop[row, col, 0] - 1
  source_col = crop[row, col, 1] - 1
  if flipped:
    source_col = W - 1 - source_col
  return source_row - row + augment.PADDING, source_col - col + augment.PADDING


def test_flip_pad_crop_shifts_a_window_over_the_zero_padded_image():
  pixels = _coordinate_image()
  offsets = set()
  for seed in range(300):
    for flip_prob, flipped in [(0.0, False), (1.0, True)]:
      crop = augment.flip_pad_crop(pixels, np.random.default_rng(seed), flip_prob)
      assert crop.shape == pixels.shape
      top, left = _offset_of(crop, flipped)
      source = pixels[:, ::-1] if flipped else pixels
      padded = np.pad(source, ((10, 10), (10, 10), (0, 0)))
      np.testing.assert_array_equal(crop, padded[top:top + H, left:left + W])
      offsets.add((int(top), int(left)))
  tops, lefts = zip(*offsets)
  # Uniform over every crop position, both ends included.
  assert set(tops) == set(range(21)) and set(lefts) == set(range(21))


@pytest.mark.parametrize("padding", [0, 3, 40])  # 40: wider than the image, crops may be all 0
def test_crop_equals_cropping_the_padded_image_for_any_padding(padding):
  pixels = _coordinate_image()
  for seed in range(50):
    crop = augment.flip_pad_crop(pixels, np.random.default_rng(seed), 0.5, padding)
    rng = np.random.default_rng(seed)  # replays the draws: flip, top, left
    source = pixels[:, ::-1] if rng.random() < 0.5 else pixels
    top, left = rng.integers(0, 2 * padding + 1), rng.integers(0, 2 * padding + 1)
    padded = np.pad(source, ((padding, padding), (padding, padding), (0, 0)))
    np.testing.assert_array_equal(crop, padded[top:top + H, left:left + W])


def test_flip_happens_with_probability_one_half():
  pixels = _coordinate_image()
  flips, draws = 0, 4000
  for seed in range(draws):
    crop = augment.flip_pad_crop(pixels, np.random.default_rng(seed), padding=0)
    flips += bool(crop[0, 0, 1] == W)  # column W−1 came to the left edge
  # σ of the rate is 0.008 at p = 0.5: ±0.03 is ~4σ, and p = 0.55 would lie 6σ out.
  assert abs(flips / draws - 0.5) < 0.03


def test_erase_boxes_follow_the_area_and_aspect_rules():
  height, width = 256, 128
  rng = np.random.default_rng(0)
  boxes = [augment.erase_box(height, width, rng) for _ in range(3000)]
  assert all(box is not None for box in boxes)  # at 256×128 the first draws nearly always fit
  top, left, h, w = np.array(boxes).T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= height) and np.all(left + w <= width)
  assert np.all(h < height) and np.all(w < width)
  area = h * w / (height * width)
  # Rounding h and w moves the area by at most (h + w + 1)/2 pixels.
  slack = (h + w + 1) / 2 / (height * width)
  assert np.all(area >= 0.02 - slack) and np.all(area <= 1 / 3 + slack)
  aspect = h / w
  assert aspect.min() > 0.3 * 0.8 and aspect.max() < (1 / 0.3) * 1.25
  assert aspect.min() < 0.35 and aspect.max() > 2.9  # the whole log-uniform range is used
  # Tall boxes (w < W always, h may hit H) get rejected sometimes: w can never reach 128.
  assert w.max() < width
  # Top and left positions cover 0 … H−h and 0 … W−w, both ends included.
  assert np.any(top == 0) and np.any(top == height - h)
  assert np.any(left == 0) and np.any(left == width - w)


def test_erase_box_gives_up_when_no_box_fits():
  # In a 1-pixel-tall image every box has h >= round(√(0.02·1000·0.3)) = 2 > H: ten rejections.
  assert augment.erase_box(1, 1000, np.random.default_rng(0)) is None


def test_random_erasing_fills_a_box_with_standard_normal_noise():
  erased, values = 0, []
  for seed in range(200):
    x = np.full((H, W, 3), 0.25, np.float32)
    augment.random_erase(x, np.random.default_rng(seed))
    changed = x != np.float32(0.25)
    if changed.any():
      erased += 1
      rows, cols = np.nonzero(changed.any(-1))
      box = x[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert np.count_nonzero(box != np.float32(0.25)) >= box.size - 3  # one solid box
      values.append(box.ravel())
  assert 75 < erased < 125  # p = 0.5
  values = np.concatenate(values)
  assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
  assert values.dtype == np.float32


def test_train_transform_erases_in_normalised_space():
  image = _photo()
  plain = augment.train_transform(image, np.random.default_rng(3), (H, W), erase_prob=0.0)
  erased = augment.train_transform(image, np.random.default_rng(3), (H, W), erase_prob=1.0)
  changed = np.any(plain != erased, axis=-1)
  assert changed.any() and np.abs(erased).max() > 1.0  # N(0, 1) noise leaves [−1, 1]
  np.testing.assert_array_equal(plain[~changed], erased[~changed])


def test_same_seed_epoch_position_give_the_same_augmentation():
  image = _photo()
  def run(*key):
    return augment.train_transform(image, augment.image_rng(*key), (H, W))
  np.testing.assert_array_equal(run(1, 2, 3), run(1, 2, 3))
  assert not np.array_equal(run(1, 2, 3), run(1, 2, 4))
  assert not np.array_equal(run(1, 2, 3), run(1, 3, 3))


def _jpeg(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG")
  return buffer.getvalue()


def test_single_channel_images_become_three_equal_channels():
  grey = np.random.default_rng(0).integers(0, 256, (20, 10), dtype=np.uint8)
  from_bytes = np.asarray(augment.to_rgb_image(_jpeg(grey)))
  assert from_bytes.shape == (20, 10, 3)
  assert np.all(from_bytes == from_bytes[..., :1])
  from_array = np.asarray(augment.to_rgb_image(grey[..., None]))
  np.testing.assert_array_equal(from_array, np.repeat(grey[..., None], 3, -1))
  colour = np.random.default_rng(1).integers(0, 256, (20, 10, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(augment.to_rgb_image(colour)), colour)


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="uint8"):
    augment.to_rgb_image(np.zeros((4, 4), np.float32))
  with pytest.raises(TypeError, match="int"):
    augment.to_rgb_image(3)
  with pytest.raises(ValueError, match="image_size"):
    augment.test_resize(_photo(), (0, 4))


def test_erase_aspect_bounds_are_the_specs():
  assert augment.ERASE_AREA == (0.02, 1 / 3)
  assert math.isclose(augment.ERASE_MIN_ASPECT, 0.3) and augment.ERASE_ATTEMPTS == 10
