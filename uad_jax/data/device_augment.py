"""`augment.train_transform` inside the jitted train step: uint8 pixels and each image's draws
(`augment.train_params`) in; float32 images out.

The pixels are either resized by the host or, for images no larger than the output
(`augment.train_pixels`), the decoded image itself in the top-left corner with its size beside it;
those are resized here with Pillow's bicubic arithmetic (`pil_bicubic`'s integer tables), so the
result is the host's resize bit for bit.

Bit for bit the host's output everywhere but inside the erase box (same flip, crop, normalisation
table and box), where the N(0, 1) noise comes from ``jax.random.key(noise seed)`` instead of the
host's generator. Every row depends only on its own pixels and parameters, so the output does not
depend on the batch size, the sharding or the device count.
"""
import jax
import jax.numpy as jnp

from uad_jax.data import augment, pil_bicubic

_P = {name: index for index, name in enumerate(augment.PARAMS)}


def _resample(pixels, starts, weights):
  """One Pillow pass over axis 0 of uint8 `pixels`: int32 sums of the taps, rounded, clipped."""
  last = pixels.shape[0] - 1
  sums = jnp.full((starts.shape[0], *pixels.shape[1:]), pil_bicubic.ROUNDING, jnp.int32)
  for k in range(weights.shape[1]):  # a few taps: one gathered row block each
    rows = pixels[jnp.minimum(starts + k, last)].astype(jnp.int32)
    sums = sums + rows * weights[:, k, None, None]
  return jnp.clip(sums >> pil_bicubic.PRECISION_BITS, 0, 255).astype(jnp.uint8)


def resize(pixels, raw_size):
  """One image [H, W, 3] whose top-left `raw_size` (h, w) holds a decoded image with h ≤ H and
  w ≤ W → that image bicubic-resized to H×W as `Image.resize` does (horizontal pass first, its
  result rounded to uint8, then vertical). (H, W) itself is the identity."""
  height, width = pixels.shape[:2]
  x_starts, x_weights = (jnp.asarray(t) for t in pil_bicubic.axis_tables(width, width))
  y_starts, y_weights = (jnp.asarray(t) for t in pil_bicubic.axis_tables(height, height))
  raw_h, raw_w = raw_size[0], raw_size[1]
  rows = _resample(pixels.swapaxes(0, 1), x_starts[raw_w], x_weights[raw_w]).swapaxes(0, 1)
  return _resample(rows, y_starts[raw_h], y_weights[raw_h])


def flip_shift(pixels, flip, dy, dx):
  """`augment.flip_shift` of one image [H, W, C]: a gather of the source row and column of every
  output pixel, and 0 where there is none."""
  height, width = pixels.shape[:2]
  rows, cols = jnp.arange(height) + dy, jnp.arange(width) + dx
  inside = (((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :])
  cols = jnp.where(flip, width - 1 - cols, cols)
  moved = pixels[jnp.clip(rows, 0, height - 1)][:, jnp.clip(cols, 0, width - 1)]
  return jnp.where(inside[..., None], moved, jnp.zeros((), pixels.dtype))


def erase(x, top, left, height, width, seed):
  """`x` [H, W, C] with the box (top, left, height, width) filled with N(0, 1) noise of `seed`.

  The whole image's worth of noise is drawn and masked: a box of traced size cannot be drawn
  alone, and the draw is small beside the model's step."""
  rows, cols = jnp.arange(x.shape[0]), jnp.arange(x.shape[1])
  box = (((rows >= top) & (rows < top + height))[:, None] &
         ((cols >= left) & (cols < left + width))[None, :])
  noise = jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
  return jnp.where(box[..., None], noise, x)


def augment_image(pixels, params):
  """One uint8 image [H, W, 3] and its int32 `augment.PARAMS` → float32 [H, W, 3]."""
  p = {name: params[index] for name, index in _P.items()}
  x = augment.normalize_batch(flip_shift(pixels, p["flip"] != 0, p["shift_y"], p["shift_x"]))
  return erase(x, p["erase_top"], p["erase_left"], p["erase_height"], p["erase_width"],
               p["noise_seed"])


def augment_batch(pixels, params, raw_sizes=None):
  """uint8 [n, H, W, 3] and int32 [n, len(augment.PARAMS)] → float32 [n, H, W, 3]; with
  `raw_sizes` (int32 [n, 2]), each image is first resized from its top-left (h, w)."""
  if raw_sizes is not None:
    pixels = jax.vmap(resize)(pixels, raw_sizes)
  return jax.vmap(augment_image)(pixels, params)
