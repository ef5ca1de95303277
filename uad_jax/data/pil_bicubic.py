"""PIL's bicubic resize as integer tables, so a device can reproduce it bit for bit.

Pillow resizes 8-bit images in two separable passes (which first: below), each output pixel
a sum of input pixels times fixed-point weights: the weights are computed in double precision
(the bicubic kernel with a = −0.5, widened by the downscaling factor so that it antialiases),
normalised to sum to 1, rounded to integers of `PRECISION_BITS` fractional bits, and every sum
starts at half a unit and is shifted back and clipped to 0..255 (Pillow's `Resample.c`:
`precompute_coeffs`, `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`). Integer sums are
exact on every backend, so these tables, computed here once in NumPy's double precision, let the
jitted train step resize a decoded image exactly as `Image.resize(..., Image.BICUBIC)` does.

The weights of one axis depend only on its input and output lengths, so one table per output
length holds every input length up to a canvas's: `axis_tables(max_in, out)`.

Pass order: Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
many pixels as the width, (h − H) > 2·max(w − W, 0) (measured against it over 1,500 random size
pairs, ties included); before 13 always the horizontal first. Images no larger than the output in
either axis, the only ones the device resizes, take the horizontal pass first in every version.
"""
import functools
import math

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8-bit pixels times weights fit an int32 sum
ROUNDING = 1 << (PRECISION_BITS - 1)  # every sum starts at half a unit
_SUPPORT = 2.0  # the bicubic kernel's half width at scale 1


def _bicubic(x: np.ndarray) -> np.ndarray:
  """The cubic convolution kernel with a = −0.5, term by term in Pillow's order."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def taps(max_in: int, out: int) -> int:
  """How many input pixels one output pixel reads, at most, for inputs of up to `max_in`."""
  support = _SUPPORT * max(max_in / out, 1.0)
  return int(math.ceil(support)) * 2 + 1


def axis_weights(in_len: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """(first input index int32 [out], fixed-point weights int32 [out, taps(in_len, out)]) of one
  axis resized from `in_len` to `out`; weights past an output's last input are 0."""
  if in_len < 1 or out < 1:
    raise ValueError(f"cannot resize an axis of {in_len} pixels to {out}")
  scale = in_len / out
  filterscale = max(scale, 1.0)
  support = _SUPPORT * filterscale
  ksize = taps(in_len, out)
  centers = (np.arange(out) + 0.5) * scale
  # Pillow rounds the window's ends with a C cast of (value + 0.5), which truncates toward zero.
  starts = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
  stops = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_len)
  offsets = np.arange(ksize)
  inside = offsets[None, :] < (stops - starts)[:, None]
  w = np.where(inside, _bicubic((offsets[None, :] + starts[:, None] - centers[:, None] + 0.5) *
                                (1.0 / filterscale)), 0.0)
  total = np.zeros(out)
  for k in range(ksize):  # Pillow sums the weights left to right
    total = total + w[:, k]
  w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
  scaled = w * (1 << PRECISION_BITS)
  fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
  return starts.astype(np.int32), fixed.astype(np.int32)


@functools.lru_cache(maxsize=16)
def axis_tables(max_in: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """`axis_weights` for every input length 0..max_in, indexed by it, padded to one tap count:
  (starts int32 [max_in + 1, out], weights int32 [max_in + 1, out, taps(max_in, out)]). Row 0
  is all zeros (no image has length 0). Read-only: the same arrays serve every caller."""
  ksize = taps(max_in, out)
  starts = np.zeros((max_in + 1, out), np.int32)
  weights = np.zeros((max_in + 1, out, ksize), np.int32)
  for in_len in range(1, max_in + 1):
    s, w = axis_weights(in_len, out)
    starts[in_len], weights[in_len, :, :w.shape[1]] = s, w
  starts.flags.writeable = weights.flags.writeable = False
  return starts, weights
