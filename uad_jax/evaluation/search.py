"""Query search: each query's top-k gallery items, and where its true matches rank.

Distances are the evaluation's (squared Euclidean of L2-normalised features, `metrics`), or the
exact k-reciprocal re-ranked ones (`reranking`), computed one block of queries at a time, so the
memory is a block × gallery, whatever the number of queries. Where both sides carry identities
and cameras, the camera rule removes the gallery items the evaluation would (`metrics`), each
query gets its AP and the ranks of all its kept true matches; where labels are unknown, nothing
is removed and matches are unknown. Ranking ties go to the lower gallery index, as in `metrics`.
"""
import dataclasses
from typing import Iterator, Optional

import numpy as np

from uad_jax.evaluation import features_file, metrics, reranking
from uad_jax.numerics import l2_normalize

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Ranking:
  """The search's result for Q queries, k = top_k."""
  top_index: np.ndarray   # [Q, k] gallery rows, best first; −1 past the kept items
  top_dist: np.ndarray    # [Q, k] their distances; inf past the kept items
  labelled: bool          # identities and cameras known on both sides
  ap: np.ndarray          # [Q] average precision; NaN without labels or true matches
  match_ranks: tuple      # per query: 1-based ranks (ascending) of its kept true matches
  match_rows: tuple       # per query: those true matches' gallery rows, in the same order
  camera_rule: str
  reranked: Optional[dict]  # the re-ranking settings, or None

  @property
  def first_match(self) -> np.ndarray:
    """[Q] rank of each query's first true match; 0 where it has none."""
    return np.array([r[0] if len(r) else 0 for r in self.match_ranks], np.int64)


def rank(query: features_file.FeatureSet, gallery: features_file.FeatureSet, *, top_k: int = 10,
         camera_rule: str = "sysu", rerank: Optional[reranking.RerankSettings] = None,
         memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> Ranking:
  """Ranks `gallery` for every query of `query`."""
  if camera_rule not in metrics.CAMERA_RULES:
    raise ValueError(f"camera rule {camera_rule!r}: expected one of {metrics.CAMERA_RULES}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if query.feats.shape[1] != gallery.feats.shape[1]:
    raise ValueError(f"query features are {query.feats.shape[1]}-d, gallery features "
                     f"{gallery.feats.shape[1]}-d: not the same model")
  labelled = all((side.person_ids >= 0).all() and (side.cameras >= 0).all()
                 for side in (query, gallery))
  k = min(top_k, len(gallery))
  top_index = np.full((len(query), k), -1, np.int64)
  top_dist = np.full((len(query), k), np.inf, np.float32)
  ap = np.full(len(query), np.nan)
  match_ranks = [np.zeros(0, np.int64)] * len(query)
  match_rows = list(match_ranks)
  for start, stop, dist in _distance_blocks(query.feats, gallery.feats, rerank,
                                            memory_budget_bytes):
    kept = np.ones(dist.shape, bool)
    if labelled:
      same_id = query.person_ids[start:stop, None] == gallery.person_ids[None, :]
      same_cam = query.cameras[start:stop, None] == gallery.cameras[None, :]
      kept = metrics.kept_by_camera_rule(camera_rule, same_id, same_cam)
    dist = np.where(kept, dist, np.inf).astype(np.float32)
    # Ranked by (distance, gallery index): a stable sort of each row.
    order = np.argsort(dist, axis=1, kind="stable")
    top_index[start:stop] = np.where(np.take_along_axis(kept, order[:, :k], 1), order[:, :k], -1)
    top_dist[start:stop] = np.take_along_axis(dist, order[:, :k], 1)
    if labelled:
      positive = same_id & kept
      ranked_positive = np.take_along_axis(positive, order, 1)
      for row in range(stop - start):
        ranks = np.flatnonzero(ranked_positive[row]) + 1
        match_ranks[start + row] = ranks
        match_rows[start + row] = order[row, ranks - 1]
      with_match = [q for q in range(start, stop) if len(match_ranks[q])]
      if with_match:
        ap[with_match] = metrics.metrics_of_ranks([match_ranks[q] for q in with_match])[0]
  return Ranking(top_index, top_dist, labelled, ap, tuple(match_ranks), tuple(match_rows),
                 camera_rule,
                 None if rerank is None else dataclasses.asdict(rerank))


def _distance_blocks(query_feats, gallery_feats, rerank, memory_budget_bytes
                     ) -> Iterator[tuple[int, int, np.ndarray]]:
  """(start, stop, distances [stop − start, G]) over the queries, in order."""
  q = np.asarray(l2_normalize(np.asarray(query_feats, np.float32)))
  g = np.asarray(l2_normalize(np.asarray(gallery_feats, np.float32)))
  if rerank is not None:
    yield from reranking.Reranker(q, g, rerank).blocks()
    return
  # A block holds a few [rows, G] arrays (distances, masks, the sort's order).
  rows = max(1, min(len(q), memory_budget_bytes // (32 * max(1, len(g)))))
  g_sq = np.sum(g * g, axis=1)
  for start in range(0, len(q), rows):
    block = q[start:start + rows]
    # |q|² + |g|² − 2 q·g, the metrics' formula (their ties are ours).
    yield start, start + len(block), np.sum(block * block, axis=1)[:, None] + g_sq - 2 * block @ g.T
