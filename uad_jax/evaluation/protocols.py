"""The WHU-MARS evaluation protocols (spec §7), each cell one `metrics.evaluate` call.

- AS-ReID: every query against the whole mixed gallery.
- modality: the 3×3 query-modality × gallery-modality matrix, each cell on its own sub-gallery.
- viewpoint (AG-ReID): aerial→ground and ground→aerial.
- cross_spectral (VI-ReID): the off-diagonal modality cells, e.g. TIR→RGB (not recomputed).
- scenario: the 6×6 matrix over (modality, viewpoint) scenarios.

All cells use the same camera rule. With `top_k` every cell uses the reference's truncated mode,
and the results say so. The cells of a matrix split the query × gallery pairs, so a matrix costs
about one AS-ReID evaluation.
"""
import dataclasses
import itertools
from typing import Optional

import numpy as np

from uad_jax.evaluation import metrics

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
  cell's metrics are those of `metrics.evaluate` plus "num_gallery". `evaluate_kwargs` go to
  every `evaluate` call (normalize, devices, chunk_size, memory_budget_bytes).
  """
  protocols = {}
  for protocol, cells in protocol_cells(query, gallery).items():
    protocols[protocol] = {}
    for name, (query_mask, gallery_mask) in cells.items():
      q, g = query.subset(query_mask), gallery.subset(gallery_mask)
      cell = metrics.evaluate(q.feats, g.feats, q.ids, g.ids, q.cams, g.cams,
                              camera_rule=camera_rule, top_k=top_k, max_rank=max_rank,
                              **evaluate_kwargs)
      protocols[protocol][name] = {**cell, "num_gallery": len(g.feats)}
  protocols["cross_spectral"] = {name: cell for name, cell in protocols["modality"].items()
                                 if len(set(name.split(ARROW))) == 2}
  return {"camera_rule": camera_rule, "truncated_top_k": top_k, "protocols": protocols}
