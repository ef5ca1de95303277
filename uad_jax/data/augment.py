"""Per-image train and test transforms (spec §3), NumPy + PIL.

Train, in order: PIL bicubic resize to H×W; horizontal flip p=0.5; pad 10 px with 0; random crop
back to H×W; to [0, 1]; normalise with mean 0.5, std 0.5 (→ [−1, 1]); random erasing p=0.5 of one
box filled with N(0, 1) noise in normalised space. Test: PIL bilinear resize, normalise.

The augmentation runs where `config.augment_on` says: here (`train_transform`, float32 [H, W, 3]
out) or in the jitted train step (`device_augment`), which takes uint8 pixels (`train_pixels`:
resized here, or for images no larger than H×W the decoded image itself, which the device resizes
with Pillow's arithmetic) and `train_params`, the same draws as int32 numbers, so a quarter of the
bytes cross to the device and the host does little more than decode. Both make the same resize,
flip, crop and box from the same generator; only the erased box's noise values differ (the device
draws them from a seed the generator gives).

Randomness comes only from the generator passed in; the pipeline seeds one per image from
(seed, epoch, position in the epoch) with `image_rng`, so an image's augmentation does not depend
on worker count, process count or where a run was resumed. The draws are made in a fixed order:
flip, crop top, crop left, erase decision, erase box attempts, then the erase noise (host) or the
noise seed (device).
"""
import io
import math

import numpy as np
from PIL import Image

DEFAULT_IMAGE_SIZE = (256, 128)  # H, W
FLIP_PROB = 0.5
PADDING = 10  # pixels of 0 on every side before the random crop
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
ERASE_PROB = 0.5
ERASE_AREA = (0.02, 1 / 3)  # box area as a fraction of the image
ERASE_MIN_ASPECT = 0.3  # aspect ratio h/w drawn log-uniformly in [0.3, 1/0.3]
ERASE_ATTEMPTS = 10  # box draws before giving up (the image is then left unerased)
# First word of the augmentation's seed sequence, so its draws never coincide with the sampler's.
AUGMENT_STREAM = 1


def image_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator for the image at `position` (row of the epoch's flattened steps) of `epoch`."""
  return np.random.default_rng((AUGMENT_STREAM, int(seed), int(epoch), int(position)))


def to_rgb_image(image) -> Image.Image:
  """A PIL RGB image from encoded bytes (JPEG, …), a uint8 array [H, W(, C)] or a PIL image.

  Single-channel NIR/TIR images become three equal channels, as PIL's ``convert('RGB')`` in the
  reference does.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(image)) as opened:
      return opened.convert("RGB")
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(image).convert("RGB")
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  raise TypeError(f"cannot read an image from a {type(image).__name__}")


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] → float32 (x/255 − mean)/std in a new array: torchvision's float32 steps
  (bit for bit), in place to spare two temporaries."""
  x = pixels.astype(np.float32)
  x /= np.float32(255)
  x -= np.float32(PIXEL_MEAN)
  x /= np.float32(PIXEL_STD)
  return x


# `normalize` of every uint8 value. XLA:CPU divides by a vectorised reciprocal that is off by an
# ulp for half the values, enough to flip a bf16 rounding in the model now and then; a lookup of
# the host's own results is exact on every backend.
_NORMALIZED_VALUES = normalize(np.arange(256, dtype=np.uint8))


def normalize_batch(images):
  """`normalize` of uint8 images of any shape, bit for bit, as a table lookup: NumPy arrays give
  NumPy, JAX arrays (or tracers) give a gather on their device."""
  if isinstance(images, np.ndarray):
    return _NORMALIZED_VALUES[images]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.asarray(_NORMALIZED_VALUES)[images]


def check_image_size(image_size) -> tuple[int, int]:
  """(H, W) as ints; a clear error for anything but two positive sizes."""
  if len(image_size) != 2:
    raise ValueError(f"image_size must be (H, W), got {tuple(image_size)}")
  height, width = (int(v) for v in image_size)
  if height < 1 or width < 1:
    raise ValueError(f"image_size must be positive (H, W), got {tuple(image_size)}")
  return height, width


def test_resize(image: Image.Image, image_size=DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Evaluation's resize: bilinear to H×W; uint8 [H, W, 3] (what the exports and tools take)."""
  height, width = check_image_size(image_size)
  return np.asarray(image.resize((width, height), Image.BILINEAR))


def train_resize(image: Image.Image, image_size=DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Training's resize: bicubic to H×W; uint8 [H, W, 3], what the device augmentation takes."""
  height, width = check_image_size(image_size)
  return np.asarray(image.resize((width, height), Image.BICUBIC))


def train_pixels(image: Image.Image,
                 image_size=DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """What the device needs to make `train_resize`'s pixels: (uint8 [H, W, 3], int32 (h, w)).

  An image no larger than H×W in either axis travels as it is, in the top-left corner of zeros,
  with its size, and the train step resizes it (`device_augment.resize`, Pillow's arithmetic bit
  for bit); a larger one is resized here and travels with size (H, W). The host then only
  decodes most images, and the bytes that cross are the same."""
  height, width = check_image_size(image_size)
  if image.height > height or image.width > width:
    return train_resize(image, image_size), np.array([height, width], np.int32)
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:image.height, :image.width] = np.asarray(image)
  return pixels, np.array([image.height, image.width], np.int32)


def draw_crop(rng: np.random.Generator, flip_prob: float = FLIP_PROB,
              padding: int = PADDING) -> tuple[bool, int, int]:
  """(flip, top, left): the flip, then the crop's corner in the padded image, uniform over every
  position that keeps the crop inside it."""
  flip = bool(rng.random() < flip_prob)
  top = int(rng.integers(0, 2 * padding + 1))
  left = int(rng.integers(0, 2 * padding + 1))
  return flip, top, left


def flip_shift(pixels: np.ndarray, flip: bool, dy: int, dx: int) -> np.ndarray:
  """`pixels` flipped left-right if `flip`, then cropped at (dy, dx) relative to the image's own
  corner, with 0 wherever the crop falls outside: the crop of the image padded by p at
  (dy + p, dx + p)."""
  if flip:
    pixels = pixels[:, ::-1]
  height, width = pixels.shape[:2]
  # Copying only the overlap avoids building the padded image.
  rows, cols = max(0, height - abs(dy)), max(0, width - abs(dx))  # size of the overlap
  crop = np.zeros_like(pixels)
  crop[max(0, -dy):max(0, -dy) + rows, max(0, -dx):max(0, -dx) + cols] = (
      pixels[max(0, dy):max(0, dy) + rows, max(0, dx):max(0, dx) + cols])
  return crop


def flip_pad_crop(pixels: np.ndarray, rng: np.random.Generator, flip_prob: float = FLIP_PROB,
                  padding: int = PADDING) -> np.ndarray:
  """Horizontal flip with `flip_prob`, zero padding, then a uniform crop back to the input size."""
  flip, top, left = draw_crop(rng, flip_prob, padding)
  return flip_shift(pixels, flip, top - padding, left - padding)


def erase_box(height: int, width: int,
              rng: np.random.Generator) -> tuple[int, int, int, int] | None:
  """(top, left, h, w) of a random-erasing box, or None when all attempts fall outside.

  Area fraction U(0.02, 1/3), aspect ratio exp(U(ln 0.3, ln 1/0.3)), h = round(√(A·r)),
  w = round(√(A/r)) (Python's round, half to even, as the reference), accepted if h < H and w < W;
  top and left uniform over every position that keeps the box inside.
  """
  area = height * width
  log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
  for _ in range(ERASE_ATTEMPTS):
    target_area = rng.uniform(*ERASE_AREA) * area
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def draw_erase(height: int, width: int, rng: np.random.Generator,
               prob: float = ERASE_PROB) -> tuple[int, int, int, int] | None:
  """The erase decision (probability `prob`), then `erase_box`; None: the image is not erased."""
  if rng.random() >= prob:
    return None
  return erase_box(height, width, rng)


def random_erase(x: np.ndarray, rng: np.random.Generator, prob: float = ERASE_PROB) -> np.ndarray:
  """With probability `prob`, fills one random box of normalised float32 `x` (in place) with
  per-pixel, per-channel N(0, 1) values."""
  box = draw_erase(x.shape[0], x.shape[1], rng, prob)
  if box is not None:
    top, left, h, w = box
    x[top:top + h, left:left + w] = rng.standard_normal((h, w, x.shape[2]), dtype=np.float32)
  return x


def train_transform(image: Image.Image, rng: np.random.Generator,
                    image_size=DEFAULT_IMAGE_SIZE, *, flip_prob: float = FLIP_PROB,
                    padding: int = PADDING, erase_prob: float = ERASE_PROB) -> np.ndarray:
  """Training augmentation of one RGB image; float32 [H, W, 3], mostly in [−1, 1] (erased boxes
  hold unbounded normal noise)."""
  pixels = flip_pad_crop(train_resize(image, image_size), rng, flip_prob, padding)
  return random_erase(normalize(pixels), rng, erase_prob)


# Where the train augmentation runs (config.augment_on).
AUGMENT_ON = ("device", "host")
# One image's augmentation as `device_augment` applies it, int32 in this order. The crop is a
# shift relative to the image (top − padding, left − padding), so the device needs no padding
# setting; an erase box of height and width 0 is no erasing.
PARAMS = ("flip", "shift_y", "shift_x", "erase_top", "erase_left", "erase_height", "erase_width",
          "noise_seed")


def train_params(rng: np.random.Generator, image_size=DEFAULT_IMAGE_SIZE, *,
                 flip_prob: float = FLIP_PROB, padding: int = PADDING,
                 erase_prob: float = ERASE_PROB) -> np.ndarray:
  """`train_transform`'s draws for one image as int32 [len(PARAMS)]: the same draws in the same
  order from the same generator, so the flip, crop and box are the host's; then, where the host
  draws its noise, a 32-bit seed of the device's noise."""
  height, width = check_image_size(image_size)
  flip, top, left = draw_crop(rng, flip_prob, padding)
  box = draw_erase(height, width, rng, erase_prob) or (0, 0, 0, 0)
  seed = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, endpoint=True,
                      dtype=np.int32)
  return np.array([flip, top - padding, left - padding, *box, seed], np.int32)
