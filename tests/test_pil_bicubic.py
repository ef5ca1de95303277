"""Pillow's bicubic weights as integer tables (`pil_bicubic`), against Pillow itself."""
import numpy as np
import pytest
from PIL import Image

from uad_jax.data import pil_bicubic


def _one_pass(row, starts, weights):
  """Pillow's fixed-point pass over one row [w, 3], stated directly: per output pixel, half a unit
  plus the taps' products, shifted back, clipped to 0..255."""
  out = []
  for start, taps in zip(starts, weights):
    total = pil_bicubic.ROUNDING
    for k, weight in enumerate(taps):
      if weight:
        total += int(weight) * row[start + k].astype(np.int64)
    out.append(np.clip(total >> pil_bicubic.PRECISION_BITS, 0, 255))
  return np.array(out, np.uint8)


def test_axis_weights_give_pillows_resize_of_a_row_shrinking_and_enlarging():
  rng = np.random.default_rng(0)
  pairs = [(1, 1), (1, 7), (7, 1), (128, 128), (600, 128), (129, 128), (5, 300), (1000, 3)]
  pairs += [(int(rng.integers(1, 700)), int(rng.integers(1, 300))) for _ in range(80)]
  for in_len, out in pairs:
    row = rng.integers(0, 256, (in_len, 3), dtype=np.uint8)
    if rng.random() < 0.5:  # black and white: overshooting sums, so the clipping counts
      row = np.repeat(rng.integers(0, 2, (in_len, 1)) * 255, 3, axis=1).astype(np.uint8)
    want = np.asarray(Image.fromarray(row[None]).resize((out, 1), Image.BICUBIC))[0]
    starts, weights = pil_bicubic.axis_weights(in_len, out)
    assert weights.shape == (out, pil_bicubic.taps(in_len, out))
    assert np.all(starts >= 0)
    np.testing.assert_array_equal(_one_pass(row, starts, weights), want,
                                  err_msg=f"{in_len}→{out}")


def test_tables_hold_every_input_length_padded_to_one_tap_count():
  starts, weights = pil_bicubic.axis_tables(40, 32)
  assert starts.shape == (41, 32) and weights.shape == (41, 32, pil_bicubic.taps(40, 32))
  assert not starts.flags.writeable and not weights.flags.writeable
  assert not starts[0].any() and not weights[0].any()
  for in_len in (1, 17, 32, 40):
    s, w = pil_bicubic.axis_weights(in_len, 32)
    np.testing.assert_array_equal(starts[in_len], s)
    np.testing.assert_array_equal(weights[in_len, :, :w.shape[1]], w)
    assert not weights[in_len, :, w.shape[1]:].any()
  # Each output's weights sum to one in fixed point, give or take the per-tap rounding.
  sums = weights[1:].sum(-1)
  assert np.all(np.abs(sums - (1 << pil_bicubic.PRECISION_BITS)) <= weights.shape[-1])
  # At equal lengths the table is the identity: one weight of exactly one.
  identity = weights[32]
  assert np.all(identity.max(-1) == 1 << pil_bicubic.PRECISION_BITS)
  assert np.all(np.count_nonzero(identity, axis=-1) == 1)


@pytest.mark.parametrize("in_len,out", [(0, 4), (4, 0)])
def test_empty_axes_are_refused(in_len, out):
  with pytest.raises(ValueError, match="cannot resize"):
    pil_bicubic.axis_weights(in_len, out)
