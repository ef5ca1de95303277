"""What a model's AS-ReID numbers must beat to show it learnt something: chance and raw pixels.

- chance: `metrics.chance_level`, the exact expectation of a uniformly random ranking under the
  same camera rule, from the labels alone.
- raw pixels: each image's test-transformed pixels, area-pooled to a 16×8 grid and flattened
  (384 numbers), evaluated exactly as the model's features are. `pixel_features` runs inside the
  inference step on the images already there, so the baseline costs no second decode.

A synthetic or real split where the model sits at either level has not learnt to re-identify.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.evaluation import metrics, protocols

PIXEL_GRID = (16, 8)
PIXELS_LABEL = f"raw pixels {PIXEL_GRID[0]}×{PIXEL_GRID[1]}"


@functools.lru_cache(maxsize=8)
def area_weights(size: int, bins: int) -> np.ndarray:
  """[bins, size]: row i averages the input pixels under output bin i, weighted by overlap.

  Exact area pooling for any size: blocks of size/bins pixels when it divides, fractional
  pixels at the bin edges otherwise (and one pixel's value per bin when upsampling).
  """
  edges = np.arange(bins + 1) * (size / bins)
  pixel = np.arange(size)[None, :]
  overlap = (np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel))
  return (np.clip(overlap, 0, None) / (size / bins)).astype(np.float32)


def pixel_features(images: jax.Array) -> jax.Array:
  """[B, H, W, C] images → [B, 16·8·C] fp32: each image area-pooled to the PIXEL_GRID."""
  rows = area_weights(images.shape[1], PIXEL_GRID[0])
  cols = area_weights(images.shape[2], PIXEL_GRID[1])
  pooled = jnp.einsum("ph,bhwc,qw->bpqc", rows, images.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)  # TPUs otherwise pool in bf16
  return pooled.reshape(images.shape[0], -1)


def evaluate_baselines(query_pixels: protocols.RetrievalSide,
                       gallery_pixels: protocols.RetrievalSide, *, camera_rule: str,
                       max_rank: int = 50) -> dict:
  """{"chance": …, "raw_pixels": …} AS-ReID metrics (the keys of `metrics.evaluate`).

  The sides hold `pixel_features` as their feats and the split's labels.
  """
  q, g = query_pixels, gallery_pixels
  chance = metrics.chance_level(q.ids, g.ids, q.cams, g.cams, camera_rule=camera_rule,
                                max_rank=max_rank)
  pixels = metrics.evaluate(q.feats, g.feats, q.ids, g.ids, q.cams, g.cams,
                            camera_rule=camera_rule, max_rank=max_rank)
  return {"chance": chance, "raw_pixels": {**pixels, "grid": list(PIXEL_GRID)}}
