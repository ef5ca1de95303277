"""Rank-list figures: what a query retrieved, and where true matches rank per scenario.

`draw_rank_lists` shows one row per query (`RankedQuery`): the query, then its top-k gallery
images framed by verdict. `draw_rank_summary` shows, per query scenario, how many true matches
each gallery scenario yields by rank r. Both write PNGs atomically, like `report`.

The rank-list figure is laid out by hand in inches rather than by the constrained layout, so that
`rank_list_layout` can say in pixels where every thumbnail is (tests read the frames back).
"""
import dataclasses
import math
import pathlib
from typing import Optional, Sequence, Union

import numpy as np

from uad_jax.evaluation.protocols import MODALITIES, SCENARIOS, VIEWPOINTS
from uad_jax.evaluation.report import _new_figure, _save_png, write_atomically

Label = Union[int, str]

# Verdict → frame colour and mark; the mark keeps the verdict readable in greyscale and for
# readers who cannot tell the green from the red.
VERDICT_COLOURS = {True: "#1a9641", False: "#d7191c", None: "#8c8c8c"}
VERDICT_MARKS = {True: "✓", False: "✗", None: "?"}
QUERY_COLOUR = "#2166ac"
QUERY_BACKGROUND = "#e3eef8"
DPI = 120

# Geometry of the rank-list figure, in inches.
_IMAGE_BOX = (0.7, 1.4)  # (w, h) every thumbnail is fitted into: person crops are about 1:2
_FRAME = 0.07
_CELL_W = _IMAGE_BOX[0] + 2 * _FRAME + 0.14
_ABOVE = 0.36            # rank, mark, distance
_BELOW = 0.44            # modality·viewpoint, identity·camera, file name
_ROW_H = _ABOVE + _IMAGE_BOX[1] + 2 * _FRAME + _BELOW
_ROW_GAP = 0.16
_MARGIN = 0.15
_SEPARATOR = 0.3         # between a query and its hits
_NOTE_W = 1.15           # after the hits: where the first true match is
_LEGEND_H = 0.32
_TITLE_LINE_H = 0.24
_MIN_WIDTH = 6.6         # room for the legend
_CAPTION_CHARS = 20      # what fits under a thumbnail at 6 pt


def _name(value, names, what):
  """A modality or viewpoint given by name or by index into `names`; None stays None."""
  if value is None:
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    if not 0 <= value < len(names):
      raise ValueError(f"{what} index must be in [0, {len(names)}) ({names}), got {value}")
    return names[int(value)]
  if value not in names:
    raise ValueError(f"{what} must be one of {names}, an index into them, or None; got {value!r}")
  return value


def _label(value):
  return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass(frozen=True, eq=False)  # an array field has no truth value to compare
class Crop:
  """One image and its caption parts; None where a part is unknown.

  image: uint8 [h, w, 3] (NIR and TIR as 3-channel grey); modality and viewpoint: a name in
  MODALITIES / VIEWPOINTS or an index into them (stored as the name).
  """
  image: np.ndarray
  identity: Optional[Label] = None
  modality: Optional[Union[str, int]] = None
  viewpoint: Optional[Union[str, int]] = None
  camera: Optional[Label] = None
  file_name: str = ""

  def __post_init__(self):
    image = np.asarray(self.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
      raise ValueError(f"image {self.file_name!r} must be a non-empty uint8 [h, w, 3] array, got "
                       f"{image.dtype} {image.shape}")
    object.__setattr__(self, "image", image)
    object.__setattr__(self, "modality", _name(self.modality, MODALITIES, "modality"))
    object.__setattr__(self, "viewpoint", _name(self.viewpoint, VIEWPOINTS, "viewpoint"))
    object.__setattr__(self, "identity", _label(self.identity))
    object.__setattr__(self, "camera", _label(self.camera))


@dataclasses.dataclass(frozen=True)
class Hit:
  """A retrieved gallery image: its distance to the query and its verdict, True for the query's
  identity, False for another, None where labels are missing."""
  crop: Crop
  distance: float
  match: Optional[bool]

  def __post_init__(self):
    if not isinstance(self.crop, Crop):
      raise ValueError(f"a hit's crop must be a Crop, got {type(self.crop).__name__}")
    if self.match is not None and not isinstance(self.match, (bool, np.bool_)):
      raise ValueError(f"match must be True, False or None, got {self.match!r}")
    object.__setattr__(self, "match", None if self.match is None else bool(self.match))
    if not math.isfinite(self.distance):
      raise ValueError(f"distance of {self.crop.file_name!r} must be finite, got {self.distance}")
    object.__setattr__(self, "distance", float(self.distance))


@dataclasses.dataclass(frozen=True)
class RankedQuery:
  """A query and its top-k hits, rank 1 first.

  first_match_rank: the 1-based rank of the query's first true match, given when it lies beyond
  the hits (it must agree with them when one of them is a true match). average_precision: the
  query's AP in [0, 1], if known.
  """
  query: Crop
  hits: Sequence[Hit]
  first_match_rank: Optional[int] = None
  average_precision: Optional[float] = None

  def __post_init__(self):
    if not isinstance(self.query, Crop):
      raise ValueError(f"query must be a Crop, got {type(self.query).__name__}")
    hits = tuple(self.hits)
    object.__setattr__(self, "hits", hits)
    for rank, hit in enumerate(hits, 1):
      if not isinstance(hit, Hit):
        raise ValueError(f"hit at rank {rank} must be a Hit, got {type(hit).__name__}")
      ids = (self.query.identity, hit.crop.identity)
      if None not in ids and hit.match is not None and (ids[0] == ids[1]) != hit.match:
        raise ValueError(f"hit at rank {rank} has match={hit.match} but identity {ids[1]!r} "
                         f"against the query's {ids[0]!r}")
    first = next((rank for rank, hit in enumerate(hits, 1) if hit.match), None)
    if self.first_match_rank is not None:
      rank = self.first_match_rank
      if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"first_match_rank must be an int ≥ 1 (1-based), got {rank!r}")
      if first is not None and rank != first:
        raise ValueError(f"first_match_rank {rank} disagrees with the hits: rank {first} is the "
                         "first true match shown")
      if first is None and rank <= len(hits):
        raise ValueError(f"first_match_rank {rank} points inside the top {len(hits)}, where no "
                         "hit is a true match")
      object.__setattr__(self, "first_match_rank", int(rank))
    ap = self.average_precision
    if ap is not None and not 0 <= ap <= 1:
      raise ValueError(f"average_precision must be in [0, 1], got {ap}")

  def note(self) -> Optional[str]:
    """What the row says after its hits about a true match it does not show."""
    k = len(self.hits)
    if self.first_match_rank is not None and self.first_match_rank > k:
      return f"first true match\nat rank {self.first_match_rank}"
    if k and all(hit.match is False for hit in self.hits):
      return f"no true match\nin the top {k}"
    return None


@dataclasses.dataclass(frozen=True)
class RankListLayout:
  """Where `draw_rank_lists` puts each thumbnail, in pixels of its PNG (x right, y down).

  Boxes are (left, top, right, bottom) of the image itself; its frame is the band frame_width
  pixels wide around that box. hit_boxes[row][rank - 1].
  """
  width: int
  height: int
  query_boxes: tuple
  hit_boxes: tuple
  frame_width: float


def _fit(image: np.ndarray):
  """(w, h) in inches of an image fitted into _IMAGE_BOX, its aspect ratio kept."""
  h, w = image.shape[:2]
  scale = min(_IMAGE_BOX[0] / w, _IMAGE_BOX[1] / h)
  return w * scale, h * scale


def _check_rows(rows) -> tuple:
  rows = tuple(rows)
  if not rows:
    raise ValueError("rows is empty: give at least one RankedQuery")
  for index, row in enumerate(rows):
    if not isinstance(row, RankedQuery):
      raise ValueError(f"rows[{index}] must be a RankedQuery, got {type(row).__name__}")
  return rows


def _geometry(rows, title):
  """Figure size and image boxes in inches, (left, top, right, bottom) from the top left."""
  k = max(len(row.hits) for row in rows)
  has_notes = any(row.note() for row in rows)
  title_lines = 0 if title is None else str(title).count("\n") + 1
  header = _MARGIN + title_lines * _TITLE_LINE_H + _LEGEND_H
  hits_left = _MARGIN + _CELL_W + _SEPARATOR
  width = max(_MIN_WIDTH, hits_left + k * _CELL_W + has_notes * _NOTE_W + _MARGIN)
  height = header + len(rows) * (_ROW_H + _ROW_GAP) - _ROW_GAP + _MARGIN
  # Whole pixels, so that the PNG is exactly this size.
  width, height = (math.ceil(v * DPI) / DPI for v in (width, height))

  def box(cell_left, row_top, image):
    w, h = _fit(image)
    x = cell_left + _CELL_W / 2
    y = row_top + _ABOVE + _FRAME + _IMAGE_BOX[1] / 2
    return (x - w / 2, y - h / 2, x + w / 2, y + h / 2)

  tops = [header + i * (_ROW_H + _ROW_GAP) for i in range(len(rows))]
  query_boxes = [box(_MARGIN, top, row.query.image) for top, row in zip(tops, rows)]
  hit_boxes = [[box(hits_left + j * _CELL_W, top, hit.crop.image) for j, hit in enumerate(row.hits)]
               for top, row in zip(tops, rows)]
  return dict(size=(width, height), header=header, tops=tops, hits_left=hits_left, k=k,
              query_boxes=query_boxes, hit_boxes=hit_boxes, title_lines=title_lines)


def rank_list_layout(rows: Sequence[RankedQuery], *, title=None) -> RankListLayout:
  """Where `draw_rank_lists(rows, …, title=title)` draws each thumbnail, in PNG pixels."""
  g = _geometry(_check_rows(rows), title)
  pixels = lambda box: tuple(DPI * v for v in box)
  return RankListLayout(
      width=round(g["size"][0] * DPI), height=round(g["size"][1] * DPI),
      query_boxes=tuple(pixels(b) for b in g["query_boxes"]),
      hit_boxes=tuple(tuple(pixels(b) for b in row) for row in g["hit_boxes"]),
      frame_width=_FRAME * DPI)


def _shorten(text: str, limit: int = _CAPTION_CHARS) -> str:
  """text cut in the middle to at most `limit` characters: file names differ at both ends."""
  if len(text) <= limit:
    return text
  head = (limit - 1) // 2
  return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _unknown(value) -> str:
  return "?" if value is None else str(value)


def _scenario_line(crop: Crop, separator: str) -> str:
  if crop.modality is None and crop.viewpoint is None:
    return "scenario ?"
  return f"{_unknown(crop.modality)}{separator}{_unknown(crop.viewpoint)}"


def _identity_line(crop: Crop) -> str:
  line = f"id {_unknown(crop.identity)}"
  return line if crop.camera is None else f"{line} · c{crop.camera}"


def draw_rank_lists(rows: Sequence[RankedQuery], path, *, title=None) -> pathlib.Path:
  """One row per query: the query (blue frame, its scenario, identity, AP), then its hits left
  to right with rank and distance, framed green / red / grey with ✓ / ✗ / ? for a true match /
  another identity / unknown. Thumbnails keep their aspect ratio; the figure grows with k and the
  number of rows. Written atomically as a PNG; returns its path."""
  from matplotlib.lines import Line2D
  from matplotlib.patches import Rectangle
  rows = _check_rows(rows)
  g = _geometry(rows, title)
  width, height = g["size"]
  figure = _new_figure((width, height))
  figure.set_layout_engine("none")  # placed by hand: rank_list_layout must hold in the PNG

  def rect(left, top, right, bottom):  # inches from the top left → figure fraction
    return (left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height)

  def text(x, y, s, **kwargs):
    figure.text(x / width, 1 - y / height, s, ha=kwargs.pop("ha", "center"),
                va=kwargs.pop("va", "center"), **kwargs)

  def rectangle(box, colour, zorder):
    left, bottom, w, h = rect(*box)
    figure.add_artist(Rectangle((left, bottom), w, h, facecolor=colour, edgecolor="none",
                                zorder=zorder, transform=figure.transFigure))

  def thumbnail(box, image, colour):
    left, top, right, bottom = box
    rectangle((left - _FRAME, top - _FRAME, right + _FRAME, bottom + _FRAME), colour, -1)
    axes = figure.add_axes(rect(*box))
    axes.imshow(image, aspect="auto")
    axes.set_axis_off()

  def captions(cell_left, row_top, above, below):
    x = cell_left + _CELL_W / 2
    for i, (s, style) in enumerate(above):
      text(x, row_top + 0.1 + 0.17 * i, s, **style)
    first_below = row_top + _ABOVE + _IMAGE_BOX[1] + 2 * _FRAME + 0.08
    for i, (s, style) in enumerate(below):
      text(x, first_below + 0.13 * i, s, **style)

  small, tiny = dict(fontsize=6.5), dict(fontsize=5.5, color="#555555")
  y = _MARGIN
  if title is not None:
    text(_MARGIN, y + g["title_lines"] * _TITLE_LINE_H / 2, str(title), ha="left",
         fontsize=11, fontweight="bold")
    y += g["title_lines"] * _TITLE_LINE_H
  legend = [(QUERY_COLOUR, "■ query"), (VERDICT_COLOURS[True], "■ ✓ same identity"),
            (VERDICT_COLOURS[False], "■ ✗ other identity"),
            (VERDICT_COLOURS[None], "■ ? unknown")]
  for i, (colour, s) in enumerate(legend):
    text(_MARGIN + 1.55 * i, y + _LEGEND_H / 2, s, ha="left", fontsize=7.5, color=colour,
         fontweight="bold")

  for index, (row, top) in enumerate(zip(rows, g["tops"])):
    bottom = top + _ROW_H
    if index:
      y = top - _ROW_GAP / 2
      figure.add_artist(Line2D([0, 1], [1 - y / height] * 2, color="#dddddd", linewidth=0.8,
                               transform=figure.transFigure))
    rectangle((_MARGIN, top, _MARGIN + _CELL_W, bottom), QUERY_BACKGROUND, -2)
    x = g["hits_left"] - _SEPARATOR / 2
    figure.add_artist(Line2D([x / width] * 2, [1 - top / height, 1 - bottom / height],
                             color="#999999", linewidth=1, transform=figure.transFigure))
    query = row.query
    above = [("QUERY", dict(fontsize=8, fontweight="bold", color=QUERY_COLOUR))]
    if row.average_precision is not None:
      above.append((f"AP {100 * row.average_precision:.1f}%", small))
    thumbnail(g["query_boxes"][index], query.image, QUERY_COLOUR)
    captions(_MARGIN, top, above,
             [(_scenario_line(query, "-"), dict(fontsize=6.5, fontweight="bold")),
              (_identity_line(query), small), (_shorten(query.file_name), tiny)])
    for rank, (hit, box) in enumerate(zip(row.hits, g["hit_boxes"][index]), 1):
      colour = VERDICT_COLOURS[hit.match]
      crop = hit.crop
      thumbnail(box, crop.image, colour)
      captions(g["hits_left"] + (rank - 1) * _CELL_W, top,
               [(f"{VERDICT_MARKS[hit.match]} #{rank}",
                 dict(fontsize=8, fontweight="bold", color=colour)),
                (f"d {hit.distance:.4g}", small)],
               [(_scenario_line(crop, "·"), small),
                (_identity_line(crop), small), (_shorten(crop.file_name), tiny)])
    note = row.note()
    if note:
      text(g["hits_left"] + len(row.hits) * _CELL_W + 0.1,
           top + _ABOVE + _FRAME + _IMAGE_BOX[1] / 2, note, ha="left",
           fontsize=7,
           color="#333333" if row.first_match_rank is not None else VERDICT_COLOURS[False])
  return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=DPI))


def _scenario_indices(values, what) -> np.ndarray:
  values = _integers(values, what)
  bad = np.flatnonzero((values < 0) | (values >= len(SCENARIOS)))
  if bad.size:
    raise ValueError(f"{what} must hold scenario indices in [0, {len(SCENARIOS)}) "
                     f"(protocols.SCENARIOS), got {values[bad[0]]} at position {bad[0]}")
  return values


def _integers(values, what) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{what} must be 1-D (one entry per query–true-match pair), got shape "
                     f"{values.shape}")
  if values.dtype.kind == "f" and np.all(np.isfinite(values) & (values == np.round(values))):
    values = values.astype(np.int64)  # whole floats, e.g. ranks computed as float
  if values.dtype.kind not in "iu" and values.size:
    raise ValueError(f"{what} must hold integers, got dtype {values.dtype}")
  return values.astype(np.int64)


def _pairs(**named):
  """The per-pair arrays, checked: scenario indices in range, ranks ≥ 1, equal lengths."""
  arrays = {name: (_integers(values, name) if name == "match_ranks" else
                   _scenario_indices(values, name)) for name, values in named.items()}
  lengths = {name: len(values) for name, values in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{', '.join(lengths)} must have one entry per (query, true match) pair, "
                     f"i.e. the same length; got lengths {lengths}")
  ranks = arrays["match_ranks"]
  bad = np.flatnonzero(ranks < 1)
  if bad.size:
    raise ValueError(f"match_ranks must be ≥ 1 (ranks are 1-based), got {ranks[bad[0]]} at "
                     f"position {bad[0]}")
  return tuple(arrays.values())


def _check_max_rank(max_rank):
  if not isinstance(max_rank, (int, np.integer)) or isinstance(max_rank, bool) or max_rank < 1:
    raise ValueError(f"max_rank must be an int ≥ 1, got {max_rank!r}")
  return int(max_rank)


def cumulative_match_fractions(query_scenarios, match_scenarios, match_ranks, max_rank: int = 50):
  """Per (query scenario, gallery scenario), the fraction of its (query, true match) pairs whose
  match ranks within r, for r = 1…max_rank.

  → (fractions [S, S, max_rank] float, NaN where a cell has no pairs; counts [S, S] int), with
  S = len(SCENARIOS) and fractions[q, g, r - 1] for rank r.
  """
  max_rank = _check_max_rank(max_rank)
  queries, matches, ranks = _pairs(query_scenarios=query_scenarios,
                                   match_scenarios=match_scenarios, match_ranks=match_ranks)
  s = len(SCENARIOS)
  # Ranks beyond max_rank go to one overflow bin: they count in the totals only.
  histogram = np.zeros((s, s, max_rank + 1), np.int64)
  np.add.at(histogram, (queries, matches, np.minimum(ranks, max_rank + 1) - 1), 1)
  counts = histogram.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    fractions = np.cumsum(histogram[..., :max_rank], -1) / counts[..., None]
  return fractions, counts


def median_match_ranks(query_scenarios, match_ranks) -> np.ndarray:
  """[S] median rank of the true matches of each query scenario's queries (over all its
  (query, true match) pairs); NaN for a scenario with none."""
  queries, ranks = _pairs(query_scenarios=query_scenarios, match_ranks=match_ranks)
  return np.array([np.median(ranks[queries == q]) if np.any(queries == q) else np.nan
                   for q in range(len(SCENARIOS))])


# Gallery scenario → curve style: colour and marker by modality (Okabe–Ito colours, markers for
# greyscale), line style by viewpoint.
_MODALITY_STYLE = {"RGB": ("#0072b2", "o"), "NIR": ("#e69f00", "s"), "TIR": ("#cc79a7", "^")}
_VIEWPOINT_STYLE = {"ground": "-", "aerial": "--"}


def draw_rank_summary(query_scenarios, match_scenarios, match_ranks, path, *, max_rank: int = 50,
                      title=None) -> pathlib.Path:
  """Where true matches rank, per scenario: one panel per query scenario (rows: viewpoint,
  columns: modality), one curve per gallery scenario of the cumulative fraction of its true
  matches within rank r, on a log rank axis; the panel title and a dotted line give the median
  rank. One entry per (query, true match) pair in the three arrays (scenario indices into
  protocols.SCENARIOS; 1-based ranks, which may exceed max_rank). Returns the PNG's path."""
  from matplotlib.ticker import FixedLocator, NullLocator
  fractions, counts = cumulative_match_fractions(query_scenarios, match_scenarios, match_ranks,
                                                 max_rank)
  medians = median_match_ranks(query_scenarios, match_ranks)
  ranks = np.arange(1, max_rank + 1)
  figure = _new_figure((3.6 * len(MODALITIES) + 0.4, 3.0 * len(VIEWPOINTS) + 0.9))
  panels = figure.subplots(len(VIEWPOINTS), len(MODALITIES), sharex=True, sharey=True,
                           squeeze=False)
  ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= max_rank]
  marks = [t - 1 for t in ticks]
  for q, name in enumerate(SCENARIOS):
    modality, viewpoint = divmod(q, len(VIEWPOINTS))
    axes = panels[viewpoint, modality]
    axes.set_xscale("log")
    axes.set_xlim(1, max(2, max_rank))
    axes.set_ylim(0, 1.02)
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_minor_locator(NullLocator())
    axes.grid(alpha=0.3)
    if viewpoint == len(VIEWPOINTS) - 1:
      axes.set_xlabel("rank r")
    if modality == 0:
      axes.set_ylabel("fraction of true matches within rank r")
    total = counts[q].sum()
    if total == 0:
      axes.set_title(f"query {name}", fontsize=9)
      axes.text(0.5, 0.5, "no queries", ha="center", va="center", fontsize=11, color="#777777",
                transform=axes.transAxes)
      continue
    median = medians[q]
    beyond = f" (> {max_rank})" if median > max_rank else ""
    axes.set_title(f"query {name}: median rank {median:g}{beyond}\n{total} true-match pairs",
                   fontsize=9)
    if median <= max_rank:
      axes.axvline(median, color="black", linestyle=":", linewidth=1)
    for gallery, gallery_name in enumerate(SCENARIOS):
      n = counts[q, gallery]
      if n == 0:
        continue
      gallery_modality, gallery_viewpoint = gallery_name.split("-")
      colour, marker = _MODALITY_STYLE[gallery_modality]
      outside = 1 - fractions[q, gallery, -1]
      axes.step(ranks, fractions[q, gallery], where="post", color=colour,
                linestyle=_VIEWPOINT_STYLE[gallery_viewpoint], marker=marker, markersize=3.5,
                markevery=marks, linewidth=2.2 if gallery == q else 1.2,
                label=f"{gallery_name} n={n}" + (f", {100 * outside:.0f}% > {max_rank}"
                                                 if outside > 0 else ""))
    # Where the curves leave room depends on the model: upper left when weak, lower right when
    # strong.
    axes.legend(fontsize=6, loc="best", title="gallery", title_fontsize=6)
  heading = (f"Where true matches rank (n = {counts.sum()} query–true-match pairs; thick: same "
             "scenario; dotted: median)")
  figure.suptitle(heading if title is None else f"{title}\n{heading}", fontsize=10)
  return _save_png(figure, path)
