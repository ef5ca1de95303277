"""The WHU-MARS evaluation protocols (spec §7): every cell is `metrics.evaluate` on its subsets.

- AS-ReID: every query against the whole mixed gallery.
- modality: the 3×3 query-modality × gallery-modality matrix, each cell on its own sub-gallery.
- viewpoint (AG-ReID): aerial→ground and ground→aerial.
- cross_spectral (VI-ReID): the off-diagonal modality cells, e.g. TIR→RGB (not recomputed).
- scenario: the 6×6 matrix over (modality, viewpoint) scenarios.

All cells use the same camera rule. With `top_k` every cell uses the reference's truncated mode,
and the results say so. `metrics.evaluate_cells` computes them all in one pass over the gallery
(each cell's gallery is a union of scenarios), so the whole report costs about one AS-ReID
evaluation and one compilation. `evaluate_protocols_reranked` gives the same cells on k-reciprocal
re-ranked distances (`reranking`).
"""
import dataclasses
import itertools
from typing import Optional

import jax.numpy as jnp
import numpy as np

from uad_jax.evaluation import metrics
from uad_jax.evaluation import reranking
from uad_jax.numerics import l2_normalize

MODALITIES = ("RGB", "NIR", "TIR")
VIEWPOINTS = ("ground", "aerial")
SCENARIOS = tuple(f"{m}-{v}" for m, v in itertools.product(MODALITIES, VIEWPOINTS))
ARROW = "→"


@dataclasses.dataclass(frozen=True)
class RetrievalSide:
  """Features and per-image metadata of the query or the gallery set.

  modalities index MODALITIES (0 RGB, 1 NIR, 2 TIR); viewpoints index VIEWPOINTS (0 ground,
  1 aerial).
  """
  feats: np.ndarray
  ids: np.ndarray
  cams: np.ndarray
  modalities: np.ndarray
  viewpoints: np.ndarray

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, np.asarray(getattr(self, field.name)))
    for name, values, bound in (("modalities", self.modalities, len(MODALITIES)),
                                ("viewpoints", self.viewpoints, len(VIEWPOINTS))):
      if values.shape != (len(self.feats),):
        raise ValueError(f"{name} must have one entry per feature row ({len(self.feats)}), got "
                         f"shape {values.shape}")
      if values.size and (values.min() < 0 or values.max() >= bound):
        raise ValueError(f"{name} must hold ints in [0, {bound}), got {np.unique(values)}")

  @property
  def scenarios(self) -> np.ndarray:
    """Index into SCENARIOS."""
    return self.modalities * len(VIEWPOINTS) + self.viewpoints

  def subset(self, mask: np.ndarray) -> "RetrievalSide":
    return RetrievalSide(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))


def protocol_cells(query: RetrievalSide, gallery: RetrievalSide) -> dict:
  """{protocol: {cell name: (query mask, gallery mask)}} of every computed protocol."""
  def pairs(q_groups, g_groups, names, keep=lambda a, b: True):
    return {f"{names[a]}{ARROW}{names[b]}": (q_groups == a, g_groups == b)
            for a, b in itertools.product(range(len(names)), repeat=2) if keep(a, b)}

  everything = (np.ones(len(query.feats), bool), np.ones(len(gallery.feats), bool))
  return {
      "as_reid": {f"all{ARROW}all": everything},
      "modality": pairs(query.modalities, gallery.modalities, MODALITIES),
      "viewpoint": pairs(query.viewpoints, gallery.viewpoints, VIEWPOINTS,
                         keep=lambda a, b: a != b),
      "scenario": pairs(query.scenarios, gallery.scenarios, SCENARIOS),
  }


def evaluate_protocols(query: RetrievalSide, gallery: RetrievalSide, *, camera_rule: str = "sysu",
                       top_k: Optional[int] = None, max_rank: int = 50,
                       **evaluate_kwargs) -> dict:
  """Metrics of every protocol cell.

  Returns {"camera_rule", "truncated_top_k", "protocols": {protocol: {cell: metrics}}} where a
  cell's metrics are those of `metrics.evaluate` plus "num_gallery". `evaluate_kwargs` are
  `evaluate`'s other options (normalize, devices, chunk_size, memory_budget_bytes).
  """
  cells = [(protocol, name, masks) for protocol, named in protocol_cells(query, gallery).items()
           for name, masks in named.items()]
  results = metrics.evaluate_cells(
      query.feats, gallery.feats, query.ids, gallery.ids, query.cams, gallery.cams,
      [masks for _, _, masks in cells], camera_rule=camera_rule, top_k=top_k, max_rank=max_rank,
      **evaluate_kwargs)
  protocols = {}
  for (protocol, name, (_, gallery_mask)), cell in zip(cells, results):
    protocols.setdefault(protocol, {})[name] = {**cell, "num_gallery": int(gallery_mask.sum())}
  protocols["cross_spectral"] = {name: cell for name, cell in protocols["modality"].items()
                                 if len(set(name.split(ARROW))) == 2}
  return {"camera_rule": camera_rule, "truncated_top_k": top_k, "protocols": protocols}


def evaluate_protocols_reranked(query: RetrievalSide, gallery: RetrievalSide, *,
                                settings: reranking.RerankSettings, camera_rule: str = "sysu",
                                max_rank: int = 50, normalize: bool = True,
                                **reranker_kwargs) -> dict:
  """Metrics of every protocol cell on k-reciprocal re-ranked distances.

  As the reference does, the re-ranked query × gallery distances are computed once, over the
  whole query and gallery sets, and each cell ranks the sub-matrix of its query and gallery
  masks; so, unlike in `evaluate_protocols`, a cell's distances depend on the images outside it.
  The distances come by blocks of queries and are never all held at once; each block's
  per-query values are kept for every cell.

  Returns `evaluate_protocols`' structure plus "reranking": the settings. `normalize`
  L2-normalises the features first; `reranker_kwargs` go to `reranking.Reranker` (devices,
  memory_budget_bytes).
  """
  if camera_rule not in metrics.CAMERA_RULES:
    raise ValueError(f"camera_rule must be one of {metrics.CAMERA_RULES}, got {camera_rule!r}")
  if not isinstance(max_rank, (int, np.integer)) or isinstance(max_rank, bool) or max_rank < 1:
    raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
  feats = [np.asarray(side.feats, np.float32) for side in (query, gallery)]
  if normalize:
    feats = [np.asarray(l2_normalize(jnp.asarray(f))) for f in feats]
  reranker = reranking.Reranker(*feats, settings, **reranker_kwargs)
  cells = [(protocol, name, q_mask, g_mask)
           for protocol, named in protocol_cells(query, gallery).items()
           for name, (q_mask, g_mask) in named.items()]
  gallery_labels = [(np.flatnonzero(g_mask), gallery.ids[g_mask], gallery.cams[g_mask])
                    for _, _, _, g_mask in cells]
  per_query = [([], [], []) for _ in cells]     # AP, INP, first-hit rank of each valid query
  for start, stop, block in reranker.blocks():
    for (_, _, q_mask, _), (columns, g_ids, g_cams), values in zip(cells, gallery_labels,
                                                                   per_query):
      rows = start + np.flatnonzero(q_mask[start:stop])
      if not len(rows):
        continue
      valid, *cell_values = metrics.per_query_metrics_of_distances(
          block[np.ix_(rows - start, columns)], query.ids[rows], g_ids, query.cams[rows], g_cams,
          camera_rule=camera_rule)
      for kept, value in zip(values, cell_values):
        kept.append(value[valid])

  protocols = {}
  for (protocol, name, q_mask, g_mask), values in zip(cells, per_query):
    summary = metrics.summarize_per_query(
        int(q_mask.sum()), *(np.concatenate(v) if v else np.empty(0) for v in values),
        max_rank=max_rank)
    protocols.setdefault(protocol, {})[name] = {**summary, "num_gallery": int(g_mask.sum())}
  protocols["cross_spectral"] = {name: cell for name, cell in protocols["modality"].items()
                                 if len(set(name.split(ARROW))) == 2}
  return {"camera_rule": camera_rule, "truncated_top_k": None, "protocols": protocols,
          "reranking": dataclasses.asdict(settings)}
