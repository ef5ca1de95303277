"""Exact retrieval metrics for re-identification (mAP, mINP, CMC), jitted and sharded over queries.

Definitions (spec §7). Distance: squared Euclidean, of L2-normalised features by default. For each
query the gallery items its camera rule removes are dropped; the rest are ranked by (distance,
gallery index), so exact ties go to the lower gallery index. A query with no remaining true match
is skipped. Over the remaining true matches ("positives") of a query, at 1-based ranks
r_1 < … < r_n: AP = (1/n)·Σ_i i/r_i, INP = n/r_n, and its CMC curve is [r_1 ≤ r]. mAP, mINP and CMC
are means over the valid queries.

How, without sorting gallery rows (XLA:CPU sorts run 10-50× slower than NumPy's): a positive's
rank is one plus the number of kept items that precede it. The host lists each query's positives.
For one chunk of queries per device and step, the device computes the distance rows with one dot,
then counts, per block of 16 positives, the kept items ranked before each of them in one fused
vectorised pass (`_count_closer`). The cost is the distance product plus about 0.05-0.1 ns per
(distance, positive) on a CPU core. Queries are sorted by their number of positives and dealt
round-robin to the devices of a 1-D mesh (balanced shards, and chunks of similar queries, which
skip the positive blocks none of them uses); the gallery is replicated. The integer counts come
back to the host, which turns the ranks into AP, INP (float64) and the first-hit rank.

Many cells at once (`evaluate_cells`, the protocol matrices): the cells' gallery masks split the
gallery into atoms; the device counts the preceding kept items per atom (the same pass, each fold
column holding one atom's items) and a cell's ranks are sums over its atoms, so all cells cost
one evaluation of the whole set and one compilation, and equal `evaluate` of each cell exactly.

In a multi-process run the queries are first dealt the same way to the processes: each computes
its share on its own devices, and the per-query counts are gathered (`process_allgather`), so
every process gets every query's values and the same means as a single process would.
"""
import functools
import inspect
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from uad_jax.numerics import l2_normalize

CAMERA_RULES = ("sysu", "market", "none")
# Per device; a chunk of queries holds about _BYTES_PER_DISTANCE bytes per (query, gallery) pair.
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
_BYTES_PER_DISTANCE = 16
_QUERY_AXIS = "queries"
# Positives whose ranks one pass over a chunk's distances counts. XLA:CPU vectorises a reduction
# over a short non-minor axis but falls back to scalar code past 32, so 16 or 32 are the fast sizes.
_POSITIVE_BLOCK = 16
# Gallery items folded into one in-register partial count (see `_count_closer`).
_FOLD = 32
# Partial counts are summed by an fp32 dot, exact while the totals stay below 2**24.
_MAX_GALLERY = 2**24
_NO_RANK = np.iinfo(np.int32).max


def kept_by_camera_rule(camera_rule: str, same_id, same_cam):
  """Which gallery items a query keeps; NumPy or JAX boolean arrays in, the same kind out."""
  if camera_rule == "sysu":
    return ~same_cam
  if camera_rule == "market":
    return ~(same_id & same_cam)
  return same_cam | True  # "none" keeps everything; `| True` keeps the array kind and shape.


def evaluate(query_feats, gallery_feats, query_ids, gallery_ids, query_cams, gallery_cams, *,
             camera_rule: str = "sysu", max_rank: int = 50, normalize: bool = True,
             top_k: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
             chunk_size: Optional[int] = None,
             memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> dict:
  """Exact mAP, mINP and CMC of the queries against the gallery.

  Args:
    query_feats, gallery_feats: [Q, D] and [G, D] features (cast to fp32).
    query_ids, gallery_ids, query_cams, gallery_cams: [Q] / [G] identity and camera labels.
    camera_rule: "sysu" drops every gallery item from the query's camera; "market" only those of
      the same identity and camera; "none" keeps all.
    max_rank: length of the CMC curve.
    normalize: L2-normalise features first (distance = 2 − 2·cos); else plain squared Euclidean.
    top_k: None for the exact protocol. An int reproduces the reference's truncated mode: only the
      k nearest gallery items (before camera removal) are retrieved, AP still divides by all kept
      positives, and a query whose hardest positive is not retrieved has INP 0. Truncated metrics
      are ≤ the exact ones; the result says "truncated_top_k".
    devices: devices to shard the queries over. Default: every process's own devices; in a
      multi-process run each process computes its share of the queries and the values are
      gathered, so every process must call `evaluate` with the same arguments. Given devices
      (`jax.local_devices()`, say) keep the whole evaluation in this process.
    chunk_size: queries per device step; default: as many as `memory_budget_bytes` allows.
    memory_budget_bytes: per-device working memory for one chunk.

  Returns:
    {"mAP", "mINP": float, "cmc": float64 [max_rank] (fractions in [0, 1]),
     "num_valid_queries", "num_queries": int, "truncated_top_k": None or k}.
    With no valid query the metrics are NaN.
  """
  return evaluate_cells(query_feats, gallery_feats, query_ids, gallery_ids, query_cams,
                        gallery_cams, [(None, None)], camera_rule=camera_rule, max_rank=max_rank,
                        normalize=normalize, top_k=top_k, devices=devices, chunk_size=chunk_size,
                        memory_budget_bytes=memory_budget_bytes)[0]


# `evaluate`'s options and their defaults, read from its signature: one place states them.
_EVALUATE_DEFAULTS = {name: parameter.default
                      for name, parameter in inspect.signature(evaluate).parameters.items()
                      if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def evaluate_cells(query_feats, gallery_feats, query_ids, gallery_ids, query_cams, gallery_cams,
                   cells: Sequence[tuple], **options) -> list[dict]:
  """`evaluate` of many (query subset, gallery subset) cells of one query and gallery set, in one
  pass over the gallery and one compilation.

  Args:
    query_feats … gallery_cams: as in `evaluate`.
    cells: (query mask [Q], gallery mask [G]) bool pairs; None stands for every row.
    **options: the keyword arguments of `evaluate`, for every cell.

  Returns:
    One result per cell: `evaluate(query_feats[q_mask], gallery_feats[g_mask], …)`, exactly
    (the same tie rule; the metrics come from the same integer ranks).

  The gallery masks split the gallery into "atoms", the sets of items that lie in the same cells
  (for the protocol matrices: the 6 scenarios). A positive's rank within a cell is one plus the
  kept items of the cell's atoms that precede it, so the device counts those per atom, at the
  cost of one `evaluate` of the whole set, and the host adds up each cell's atoms.
  """
  query_feats, gallery_feats = _check_features(query_feats, gallery_feats)
  if set(options) - set(_EVALUATE_DEFAULTS):
    raise TypeError(f"unexpected options {sorted(set(options) - set(_EVALUATE_DEFAULTS))}; "
                    f"known: {sorted(_EVALUATE_DEFAULTS)}")
  options = {**_EVALUATE_DEFAULTS, **options}
  top_k, max_rank = options.pop("top_k"), options.pop("max_rank")
  _check_options(options["camera_rule"], max_rank, top_k, options["chunk_size"],
                 options["memory_budget_bytes"])
  options["normalize"] = bool(options["normalize"])
  q_ids, q_cams, g_ids, g_cams = _coded_labels(len(query_feats), len(gallery_feats), query_ids,
                                               gallery_ids, query_cams, gallery_cams)
  q_masks, g_masks = _cell_masks(cells, len(q_ids), len(g_ids))
  # [atoms, cells]: which cells hold each atom; [G]: each gallery item's atom.
  atom_cells, g_atoms = np.unique(g_masks.T, axis=0, return_inverse=True)
  g_atoms = g_atoms.reshape(-1).astype(np.int32)
  pos_idx, num_pos = positive_table(q_ids, q_cams, g_ids, g_cams, options["camera_rule"])
  # Per query [m, P, atoms]: kept items of each atom before each positive (m = 1), then, in the
  # truncated mode, all items (m = 2). Zero for the queries no cell can use.
  counts = np.zeros((len(q_ids), 1 + (top_k is not None)) + pos_idx.shape[1:] +
                    (len(atom_cells),), np.int32)
  needed = q_masks.any(axis=0) & (num_pos > 0)
  if needed.any():
    counts[needed] = _positive_counts_of_job(
        query_feats[needed], gallery_feats, q_ids[needed], q_cams[needed], g_ids, g_cams,
        pos_idx[needed], num_pos[needed], g_atoms, len(atom_cells), truncated=top_k is not None,
        **options)
  # Each positive's atom; the slots past a query's positives get one more atom, in no cell.
  used = np.arange(pos_idx.shape[1])[None, :] < num_pos[:, None]
  pos_atoms = np.full(pos_idx.shape, len(atom_cells))
  pos_atoms[used] = g_atoms[pos_idx[used]]
  results = []
  for q_mask, atoms_in_cell in zip(q_masks, atom_cells.T):
    rows = np.flatnonzero(q_mask)
    per_query = _cell_metrics(counts[rows], pos_atoms[rows], atoms_in_cell, top_k)
    results.append(_summary(len(rows), *per_query, max_rank=max_rank, top_k=top_k))
  return results


def _cell_masks(cells, num_queries, num_gallery):
  """The cells' masks as bool arrays [cells, Q] and [cells, G], or a ValueError."""
  masks = ([], [])
  for number, cell in enumerate(cells):
    if len(cell) != 2:
      raise ValueError(f"cell {number} must be a (query mask, gallery mask) pair")
    for side, mask, size, out in zip(("query", "gallery"), cell, (num_queries, num_gallery),
                                     masks):
      mask = np.ones(size, bool) if mask is None else np.asarray(mask)
      if mask.dtype != bool or mask.shape != (size,):
        raise ValueError(f"cell {number}: the {side} mask must be a bool array of shape "
                         f"({size},), got {mask.dtype} {mask.shape}")
      out.append(mask)
  if not masks[0]:
    raise ValueError("no cells to evaluate")
  return np.stack(masks[0]), np.stack(masks[1])


def _cell_metrics(counts, pos_atoms, atoms_in_cell, top_k):
  """(AP, INP, first-hit rank) of a cell's valid queries, in query order.

  counts [n, m, P, atoms] and pos_atoms [n, P] of the cell's queries over the whole gallery;
  atoms_in_cell [atoms] bool.
  """
  in_cell = np.append(atoms_in_cell, False)[pos_atoms]
  before = counts @ atoms_in_cell.astype(np.int32)                    # [n, m, P]
  ranks = np.sort(np.where(in_cell, before[:, 0] + 1, _NO_RANK), axis=1)
  cell_pos = in_cell.sum(axis=1)
  if top_k is None:
    retrieved = cell_pos
  else:
    # Positives sit in the same order among all items as among kept ones, so those within the k
    # nearest of the cell's whole gallery are the first ones by rank.
    retrieved = np.sum(in_cell & (before[:, 1] < top_k), axis=1)
  valid = cell_pos > 0
  return _query_metrics(ranks[valid], cell_pos[valid], retrieved[valid])


def _query_metrics(ranks, num_pos, retrieved):
  """Per query: AP, INP (float64) and first-hit rank from its positives' ascending ranks [n, P].

  Only the `retrieved` best positives count (all of them in exact mode); AP still divides by all.
  """
  rows = np.arange(len(ranks))
  hit_number = np.arange(1, ranks.shape[1] + 1)[None, :]
  counted = hit_number <= retrieved[:, None]
  # A running sum, left to right: the same value however many padding slots follow, so that a
  # cell gets bit for bit what `evaluate` of its subsets does.
  precision_sums = np.cumsum(np.where(counted, hit_number / ranks, 0.0), axis=1)
  last = np.maximum(num_pos - 1, 0)
  ap = precision_sums[rows, last] / np.maximum(num_pos, 1)
  inp = np.where(retrieved >= num_pos, num_pos / ranks[rows, last], 0.0)
  first_rank = np.where(retrieved > 0, ranks[:, 0], _NO_RANK)
  return ap, inp, first_rank


def _coded_labels(num_queries, num_gallery, query_ids, gallery_ids, query_cams, gallery_cams):
  """Labels checked against the row counts, as dense int codes: (q_ids, q_cams, g_ids, g_cams)."""
  labels = _check_labels(num_queries, num_gallery, query_ids=query_ids,
                         query_cams=query_cams, gallery_ids=gallery_ids, gallery_cams=gallery_cams)
  q_ids, g_ids = _dense_codes(labels["query_ids"], labels["gallery_ids"])
  q_cams, g_cams = _dense_codes(labels["query_cams"], labels["gallery_cams"])
  return q_ids, q_cams, g_ids, g_cams


def _counts(num_queries: int, valid: np.ndarray, top_k) -> dict:
  return {"num_queries": num_queries, "num_valid_queries": int(valid.sum()),
          "truncated_top_k": top_k}


def _without_valid_queries(result: dict, max_rank: int) -> dict:
  return {**result, "mAP": math.nan, "mINP": math.nan, "cmc": np.full(max_rank, np.nan)}


def chance_level(query_ids, gallery_ids, query_cams, gallery_cams, *, camera_rule: str = "sysu",
                 max_rank: int = 50) -> dict:
  """The exact expected mAP, mINP and CMC of a uniformly random ranking, from the labels alone.

  What `evaluate` gives on average for features that carry no information, under the same camera
  rule and the same valid queries: the level a trained model must clear. For a query whose rule
  keeps N gallery items, n of them true matches, the positives sit at a uniformly random n-subset
  of the ranks 1..N, and (H_N = 1 + 1/2 + … + 1/N):
    E[AP]  = (1/N)·(H_N + (n−1)/(N−1)·(N − H_N))   (E[1/r] = H_N/N for each positive's own
             precision term, E[[r' < r]/r] = (N − H_N)/(N(N−1)) for each of the n−1 others);
    CMC(k) = 1 − C(N−n, k)/C(N, k)                 (some positive among the first k);
    E[INP] = Σ_{r=n..N} (n/r)·C(r−1, n−1)/C(N, n)  (the last positive at rank r).
  Means are over the queries with n > 0, as in `evaluate`. Returns the keys of `evaluate`.
  """
  _check_options(camera_rule, max_rank, None, None, 1)
  q_ids, q_cams, g_ids, g_cams = _coded_labels(len(query_ids), len(gallery_ids), query_ids,
                                               gallery_ids, query_cams, gallery_cams)
  kept, positives = _kept_counts(q_ids, q_cams, g_ids, g_cams, camera_rule)
  valid = positives > 0
  result = _counts(len(q_ids), valid, None)
  if not valid.any():
    return _without_valid_queries(result, max_rank)
  big_n, n = kept[valid].astype(np.float64), positives[valid].astype(np.float64)
  harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, len(g_ids) + 1))])[kept[valid]]
  others = np.where(big_n > 1, (n - 1) / np.maximum(big_n - 1, 1), 0.0)
  ap = (harmonic + others * (big_n - harmonic)) / big_n
  # P(no positive among the first k) = Π_{j<k} (N−n−j)/(N−j), zero once fewer than n items remain.
  j = np.arange(max_rank)[None, :]
  left = big_n[:, None] - n[:, None] - j
  miss = np.cumprod(np.where(left > 0, left / np.maximum(big_n[:, None] - j, 1), 0.0), axis=1)
  return {**result, "mAP": float(np.mean(ap)),
          "mINP": float(np.mean(_expected_inp(kept[valid], positives[valid]))),
          "cmc": (1.0 - miss).mean(axis=0)}


def _kept_counts(q_ids, q_cams, g_ids, g_cams, camera_rule):
  """Per query: gallery items its camera rule keeps, and how many of them are true matches.

  The gallery splits into four classes by (same identity, same camera); the rule keeps or drops
  whole classes, so counts per identity, camera and pair are enough (no query × gallery array).
  """
  num_cams = int(max(q_cams.max(initial=0), g_cams.max(initial=0))) + 1
  num_ids = int(max(q_ids.max(initial=0), g_ids.max(initial=0))) + 1
  same_id = np.bincount(g_ids, minlength=num_ids)[q_ids]
  same_cam = np.bincount(g_cams, minlength=num_cams)[q_cams]
  same_both = np.bincount(g_ids * num_cams + g_cams,
                          minlength=num_ids * num_cams)[q_ids * num_cams + q_cams]
  # Columns: same id and camera, same id only, same camera only, neither.
  classes = np.stack([same_both, same_id - same_both, same_cam - same_both,
                      len(g_ids) - same_id - same_cam + same_both], axis=1)
  class_same_id = np.array([True, True, False, False])
  keeps = kept_by_camera_rule(camera_rule, class_same_id, np.array([True, False, True, False]))
  return classes @ keeps, classes @ (keeps & class_same_id)


def _expected_inp(kept: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """E[n / rank of the last positive] per query, in log space (the binomials overflow)."""
  log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, kept.max() + 1)))])

  def log_binomial(a, b):
    return log_factorial[a] - log_factorial[b] - log_factorial[a - b]

  expected = np.empty(len(kept))
  # For one n the sums over r = n..N of every query share their terms: one running log-sum.
  for n in np.unique(positives):
    ranks = np.arange(n, kept.max() + 1)
    log_terms = np.log(n) - np.log(ranks) + log_binomial(ranks - 1, n - 1)
    running = np.logaddexp.accumulate(log_terms)
    rows = positives == n
    expected[rows] = np.exp(running[kept[rows] - n] - log_binomial(kept[rows], n))
  return expected


def _positive_counts_of_job(query_feats, gallery_feats, q_ids, q_cams, g_ids, g_cams, pos_idx,
                            num_pos, g_atoms, num_atoms, *, devices, **options):
  """Counts [Q, m, P, atoms] of every query (see `evaluate_cells`), in query order: in one process
  on `devices`, or each process's share on its own devices and gathered."""
  processes = jax.process_count()
  if devices is not None or processes == 1:
    return _positive_counts(query_feats, gallery_feats, q_ids, q_cams, g_ids, g_cams, pos_idx,
                            num_pos, g_atoms, num_atoms, devices=devices or jax.local_devices(),
                            **options)
  shares = _deal_to_processes(num_pos, processes)
  mine = shares[jax.process_index()]
  # One exact int32 gather per call, its width bucketed so that similar jobs share a compilation.
  packed = np.zeros((_bucketed(len(shares[0]), 8), 1 + options["truncated"]) + pos_idx.shape[1:]
                    + (num_atoms,), np.int32)
  if len(mine):  # else fewer queries than processes
    packed[:len(mine)] = _positive_counts(
        query_feats[mine], gallery_feats, q_ids[mine], q_cams[mine], g_ids, g_cams,
        pos_idx[mine], num_pos[mine], g_atoms, num_atoms, devices=jax.local_devices(), **options)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(packed))   # [processes, width, …]
  counts = np.empty((len(num_pos),) + packed.shape[1:], np.int32)
  for process, share in enumerate(shares):
    counts[share] = gathered[process, :len(share)]
  return counts


def _deal_to_processes(num_pos: np.ndarray, processes: int) -> list[np.ndarray]:
  """Each process's queries (indices, ascending): sorted by their number of positives and dealt
  round-robin, as `_deal_queries` deals to devices, so the processes' shares cost alike."""
  order = np.argsort(-num_pos, kind="stable")
  return [np.sort(order[p::processes]) for p in range(processes)]


def _positive_counts(query_feats, gallery_feats, q_ids, q_cams, g_ids, g_cams, pos_idx, num_pos,
                     g_atoms, num_atoms, *, camera_rule, normalize, truncated, devices, chunk_size,
                     memory_budget_bytes):
  """Counts [Q, m, P, atoms] of every query, in query order, computed on `devices` (this
  process's: a result spanning other hosts' devices could not be fetched)."""
  devices = list(devices)
  mesh = jax.make_mesh((len(devices),), (_QUERY_AXIS,), devices=devices)
  num_devices = mesh.devices.size
  at_item, position, column_atoms = _gallery_layout(g_atoms, num_atoms)
  chunk = _chunk_size(_ceil_div(len(query_feats), num_devices), len(at_item), chunk_size,
                      memory_budget_bytes)
  layout = _deal_queries(num_pos, num_devices, chunk)
  real = layout >= 0
  sharded = NamedSharding(mesh, PartitionSpec(_QUERY_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())

  def laid_out(values):
    values = values[np.where(real, layout, 0)]
    values[~real] = 0
    return jax.device_put(values.reshape((-1,) + values.shape[2:]), sharded)

  def gallery_laid_out(values, pad_value=0):
    values = values[np.maximum(at_item, 0)]
    values[at_item < 0] = pad_value
    return jax.device_put(values, replicated)

  # Positives by their place in the device's gallery.
  queries = [laid_out(x) for x in (query_feats, q_ids, q_cams, position[pos_idx], num_pos)]
  # Padding items get id −1, never kept. The index is an input, not an iota: XLA:CPU computes an
  # iota folded as in `_count_closer` with slow integer arithmetic but reads an array at full speed.
  # The distances come from one dot over the gallery in its own order (padded as `evaluate` pads
  # it) and are then gathered into the device's order: XLA's dot rounds an element differently
  # with the other columns beside it, and a cell must see the distances of the whole evaluation,
  # whatever its atoms, or 1-ulp near-ties flip between the report and `evaluate`.
  padded_size = _bucketed(len(gallery_feats), _FOLD)
  in_order = np.pad(gallery_feats, [(0, padded_size - len(gallery_feats)), (0, 0)])
  gallery = [_augmented_gallery(jax.device_put(in_order, replicated), normalize),
             jax.device_put(np.maximum(at_item, 0).astype(np.int32), replicated),
             gallery_laid_out(g_ids, -1), gallery_laid_out(g_cams),
             gallery_laid_out(np.arange(len(g_ids), dtype=np.int32)),
             jax.device_put(column_atoms, replicated)]
  step_counts = _step_counts(mesh, camera_rule, normalize, truncated, chunk)
  # A host loop over chunks rather than a loop inside the jit: XLA:CPU runs the fusions of a loop
  # body on one thread. Dispatch is asynchronous, so the steps still run back to back.
  num_steps = layout.shape[1] // chunk
  per_step = np.stack(jax.device_get([step_counts(np.int32(step), *queries, *gallery)
                                      for step in range(num_steps)]))
  # [steps, devices · chunk, …] → [devices, steps · chunk, …], the layout's shape.
  rest = per_step.shape[2:]
  per_slot = per_step.reshape((num_steps, num_devices, chunk) + rest).swapaxes(0, 1)
  counts = np.empty((len(query_feats),) + rest, np.int32)
  counts[layout[real]] = per_slot.reshape((num_devices, -1) + rest)[real]
  return counts


def _gallery_layout(g_atoms, num_atoms):
  """The device's gallery order: the item at each place (−1: padding), each item's place, and the
  one-hot atom [columns, atoms] of each fold column.

  `_count_closer` first sums each fold column (places j, j + C, j + 2C, … of C = size / _FOLD),
  then adds up the columns with one dot; columns that each hold one atom let that dot count per
  atom. So the items are grouped by atom (in gallery order within one), each atom padded to whole
  columns, and laid column by column. The size is bucketed (few compilations).
  """
  columns_per_atom = -(-np.bincount(g_atoms, minlength=num_atoms) // _FOLD)
  num_columns = _bucketed(int(columns_per_atom.sum()) * _FOLD, _FOLD) // _FOLD
  order = np.argsort(g_atoms, kind="stable")
  first_slot = _FOLD * (np.cumsum(columns_per_atom) - columns_per_atom)
  first_of_atom = np.searchsorted(g_atoms[order], np.arange(num_atoms))
  slot = first_slot[g_atoms[order]] + np.arange(len(order)) - first_of_atom[g_atoms[order]]
  position = np.empty(len(order), np.int64)
  position[order] = slot % _FOLD * num_columns + slot // _FOLD
  at_item = np.full(num_columns * _FOLD, -1, np.int64)
  at_item[position] = np.arange(len(order))
  column_atoms = np.zeros((num_columns, num_atoms), np.float32)
  column_atoms[np.arange(columns_per_atom.sum()), np.repeat(np.arange(num_atoms),
                                                            columns_per_atom)] = 1
  return at_item, position.astype(np.int32), column_atoms


def positive_table(q_ids: np.ndarray, q_cams: np.ndarray, g_ids: np.ndarray, g_cams: np.ndarray,
                   camera_rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Each query's kept true matches: (gallery indices [Q, P] ascending and padded, counts [Q]).

  P is a power of two (at least one positive block) so that similar data shares a compilation.
  """
  order = np.argsort(g_ids, kind="stable")
  sorted_ids = g_ids[order]
  start = np.searchsorted(sorted_ids, q_ids, side="left")
  same_id_count = np.searchsorted(sorted_ids, q_ids, side="right") - start
  offsets = np.arange(same_id_count.max(initial=0))
  in_group = offsets[None, :] < same_id_count[:, None]
  candidates = order[np.minimum(start[:, None] + offsets[None, :], max(len(order) - 1, 0))]
  is_pos = in_group & kept_by_camera_rule(
      camera_rule, True, g_cams[candidates] == q_cams[:, None])
  num_pos = is_pos.sum(axis=1)
  slots = max(_POSITIVE_BLOCK, 1 << int(num_pos.max(initial=1) - 1).bit_length())
  # Stable partition: positives first, still in ascending gallery order.
  front = np.argsort(~is_pos, axis=1, kind="stable")[:, :slots]
  pos_idx = np.take_along_axis(candidates, front, axis=1)
  pos_idx = np.pad(pos_idx, [(0, 0), (0, slots - pos_idx.shape[1])])
  pos_idx = np.where(np.arange(slots)[None, :] < num_pos[:, None], pos_idx, 0)
  return pos_idx.astype(np.int32), num_pos.astype(np.int32)


def _deal_queries(num_pos: np.ndarray, num_devices: int, chunk: int) -> np.ndarray:
  """Query index at each [device, slot] (−1: padding); each device's slots a multiple of chunk.

  Queries are sorted by their number of positives and dealt round-robin, so every device gets a
  similar share and every chunk holds queries of similar cost (it counts only the blocks it needs).
  """
  per_device = _round_up(_ceil_div(len(num_pos), num_devices), chunk)
  order = np.argsort(-num_pos, kind="stable")
  layout = np.full((num_devices, per_device), -1, np.int64)
  position = np.arange(len(order))
  layout[position % num_devices, position // num_devices] = order
  return layout


def _chunk_size(per_device: int, gallery_size: int, chunk_size: Optional[int],
                memory_budget_bytes: int) -> int:
  """Queries per device and step: the given size, or the fewest steps the budget allows."""
  small = _bucketed(per_device, 8)
  if chunk_size:
    return min(chunk_size, small)
  fit = max(1, memory_budget_bytes // (_BYTES_PER_DISTANCE * gallery_size))
  if fit >= small or fit < 8:
    return min(fit, small)
  # Equal steps (little padding) of a multiple of 8 queries (better dot shapes) within the budget.
  most = fit // 8 * 8
  return _round_up(_ceil_div(per_device, _ceil_div(per_device, most)), 8)


def _bucketed(size: int, min_step: int) -> int:
  """size rounded up to a multiple of min_step and of 1/32 of its power of two.

  At most ~3% extra work (past min_step), and sizes that differ a little (the cells of a protocol
  matrix) share one compilation.
  """
  step = max(min_step, 1 << max(size.bit_length() - 6, 0))
  return max(step, _round_up(size, step))


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, multiple: int) -> int:
  return _ceil_div(a, multiple) * multiple


@functools.partial(jax.jit, static_argnames="normalize")
def _augmented_gallery(g_feats, normalize):
  """[−2g, |g|², 1] for each gallery row, so that [q, 1, |q|²]·it = |q − g|².

  The whole distance is then one dot; XLA:CPU would otherwise fuse the norm terms into the dot as
  an epilogue running at half its speed.
  """
  g_feats = _prepared(g_feats, normalize)
  sq_norms = jnp.sum(jnp.square(g_feats), axis=1, keepdims=True)
  return jnp.concatenate([-2.0 * g_feats, sq_norms, jnp.ones_like(sq_norms)], axis=1)


@functools.lru_cache(maxsize=64)
def _step_counts(mesh, camera_rule, normalize, truncated, chunk):
  """Jitted (step, queries…, gallery…) → per-query counts [chunk, m, P, atoms] of chunk `step`."""
  body = functools.partial(_device_step, camera_rule=camera_rule, normalize=normalize,
                           truncated=truncated, chunk=chunk)
  queries, replicated = PartitionSpec(_QUERY_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(replicated,) + (queries,) * 5 + (replicated,) * 6,
      out_specs=queries))


def _device_step(step, *queries_then_gallery, camera_rule, normalize, truncated, chunk):
  queries, gallery = queries_then_gallery[:5], queries_then_gallery[5:]
  this_chunk = [lax.dynamic_slice_in_dim(x, step * chunk, chunk) for x in queries]
  return _chunk_counts(*this_chunk, gallery, camera_rule=camera_rule, normalize=normalize,
                       truncated=truncated)


def _prepared(feats, normalize):
  feats = feats.astype(jnp.float32)
  return l2_normalize(feats) if normalize else feats


def _chunk_counts(q_feats, q_ids, q_cams, pos_at, num_pos, gallery, *, camera_rule, normalize,
                  truncated):
  """Per query and positive, the kept items of each atom ranked before it; in the truncated mode
  also all items of each atom (the top k are retrieved before camera removal)."""
  g_augmented, g_order, g_ids, g_cams, g_index, column_atoms = gallery
  g_real = g_ids >= 0
  q_feats = _prepared(q_feats, normalize)
  q_sq_norms = jnp.sum(jnp.square(q_feats), axis=1, keepdims=True)
  q_augmented = jnp.concatenate([q_feats, jnp.ones_like(q_sq_norms), q_sq_norms], axis=1)
  # HIGHEST: TPUs otherwise run fp32 dots in bf16 passes.
  dist = jnp.dot(q_augmented, g_augmented.T, precision=lax.Precision.HIGHEST)[:, g_order]
  kept = g_real & kept_by_camera_rule(camera_rule, q_ids[:, None] == g_ids[None, :],
                                      q_cams[:, None] == g_cams[None, :])
  counted = [kept, g_real] if truncated else [kept]
  return jnp.stack([_counts_before_positives(jnp.where(items, dist, jnp.inf), g_index,
                                             column_atoms, pos_at, num_pos)
                    for items in counted], axis=1)


def _counts_before_positives(dist, gallery_index, column_atoms, pos_at, num_pos):
  """[c, P, atoms]: the items of finite distance in each atom ranked before each positive."""
  pos_dist = jnp.take_along_axis(dist, pos_at, axis=1)
  pos_index = gallery_index[pos_at]
  most = jnp.max(num_pos)
  blocks = []
  for start in range(0, pos_at.shape[1], _POSITIVE_BLOCK):
    block = slice(start, start + _POSITIVE_BLOCK)
    # Queries of a chunk have similar positive counts (`_deal_queries`): skip the blocks none of
    # them uses. A `cond`, unlike a loop, keeps its fusions multi-threaded on XLA:CPU.
    blocks.append(lax.cond(
        start < most,
        lambda block=block: _count_closer(dist, gallery_index, column_atoms, pos_dist[:, block],
                                          pos_index[:, block]),
        # zeros_like: the zeros must vary over the query axis as the counts do.
        lambda block=block: jnp.zeros_like(pos_index[:, block, None])
        + jnp.zeros(column_atoms.shape[1], jnp.int32)))
  return jnp.concatenate(blocks, axis=1)


def _count_closer(dist, gallery_index, column_atoms, pos_dist, pos_index):
  """For each positive, the number of row items of each atom ranked before it: closer, or as
  close and earlier in the gallery.

  dist [c, G] (G a multiple of _FOLD), gallery_index [G], column_atoms [G / _FOLD, atoms];
  pos_dist, pos_index [c, B] → int32 [c, B, atoms].

  Item (d, i) precedes positive (t, j) iff d < t, or d == t and i < j; for i < j that is
  d < next_float_above(t), so one comparison per pair against a per-pair threshold decides.
  A direct count over the gallery axis compiles to scalar code on XLA:CPU (~1 ns per pair). Here
  one fused pass folds each run of _FOLD gallery items into a partial count (a short non-minor
  reduction, which vectorises: ~0.05 ns per pair), and an fp32 dot sums each atom's partials.
  """
  c, g = dist.shape
  fold = lambda x: x.reshape(x.shape[:-1] + (_FOLD, g // _FOLD))
  at_pos = pos_dist[:, :, None, None]
  threshold = jnp.where(fold(gallery_index)[None, None] < pos_index[:, :, None, None],
                        _next_float_above(at_pos), at_pos)
  partial = jnp.sum(fold(dist)[:, None] < threshold, axis=2, dtype=jnp.int32)
  return jnp.dot(partial.astype(jnp.float32), column_atoms,
                 precision=lax.Precision.HIGHEST).astype(jnp.int32)


def _next_float_above(x):
  # XLA:CPU (and TPUs) treat subnormal operands as zero, so the float after 0 must be the smallest
  # normal one; every other float's successor is normal or compares as intended.
  return jnp.where(x == 0, jnp.finfo(jnp.float32).tiny, jnp.nextafter(x, jnp.inf))


def checked_features(query_feats, gallery_feats, *, non_empty: bool = False):
  """The two feature arrays as contiguous fp32, or a ValueError naming what is wrong with them
  (shape, dtype, non-finite values, different widths; no rows where `non_empty`)."""
  checked = []
  for name, feats in (("query_feats", query_feats), ("gallery_feats", gallery_feats)):
    feats = np.asarray(feats)
    if feats.ndim != 2:
      raise ValueError(f"{name} must be a 2-D array [num_items, dim], got shape {feats.shape}")
    if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
      raise ValueError(f"{name} must hold numbers, got dtype {feats.dtype}")
    if non_empty and len(feats) == 0:
      raise ValueError(f"{name} has no rows")
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not np.isfinite(feats).all():
      raise ValueError(f"{name} holds non-finite values (after the cast to fp32)")
    checked.append(feats)
  if checked[0].shape[1] != checked[1].shape[1]:
    raise ValueError(f"gallery_feats has dim {checked[1].shape[1]} but query_feats has dim "
                     f"{checked[0].shape[1]}")
  return checked


def _check_features(query_feats, gallery_feats):
  checked = checked_features(query_feats, gallery_feats)
  if len(checked[1]) > _MAX_GALLERY:
    raise ValueError(f"gallery_feats has {len(checked[1])} items; at most {_MAX_GALLERY} are "
                     "supported (the fp32 counts would lose exactness)")
  return checked


def _check_labels(num_queries, num_gallery, **labels):
  checked = {}
  for name, values in labels.items():
    values = np.asarray(values)
    expected = num_queries if name.startswith("query") else num_gallery
    if values.ndim != 1 or len(values) != expected:
      side = name.split("_")[0]
      raise ValueError(f"{name} must be 1-D with one entry per row of {side}_feats "
                       f"({expected}), got shape {values.shape}")
    checked[name] = values
  return checked


def _check_options(camera_rule, max_rank, top_k, chunk_size, memory_budget_bytes):
  if camera_rule not in CAMERA_RULES:
    raise ValueError(f"camera_rule must be one of {CAMERA_RULES}, got {camera_rule!r}")
  for name, value, allow_none in (("max_rank", max_rank, False), ("top_k", top_k, True),
                                  ("chunk_size", chunk_size, True),
                                  ("memory_budget_bytes", memory_budget_bytes, False)):
    if value is None and allow_none:
      continue
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                       f"got {value!r}")


def _dense_codes(query_labels, gallery_labels):
  """Labels of both sides as int32 codes 0..n−1 (equal labels, equal codes)."""
  _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
  codes = codes.astype(np.int32)
  return codes[:len(query_labels)], codes[len(query_labels):]


def per_query_metrics_of_distances(distances, query_ids, gallery_ids, query_cams, gallery_cams,
                                   *, camera_rule: str = "sysu"):
  """(valid, AP, INP, first-hit rank) of each row of a block of distances computed elsewhere
  (re-ranked ones), on the host, with the definitions and tie rule of `evaluate`.

  Args:
    distances: [b, G] distances of b queries to the whole gallery (any float dtype).
    query_ids, query_cams: [b] labels of those queries; gallery_ids, gallery_cams: [G].
    camera_rule: as in `evaluate`.

  Returns:
    valid [b] bool (the query keeps a true match; `evaluate` skips the others), AP and INP [b]
    float64 and the first-hit rank [b] int64; NaN and _NO_RANK where not valid.

  Each positive's rank is one plus the kept items before it in the (distance, gallery index)
  order. Only the kept items no farther than the query's hardest positive can precede one, and
  only those are sorted (NumPy's sort, not XLA:CPU's, which is 10-50x slower).
  """
  _check_options(camera_rule, 1, None, None, 1)
  distances = np.asarray(distances)
  if distances.ndim != 2:
    raise ValueError(f"distances must be 2-D [queries, gallery], got shape {distances.shape}")
  labels = _check_labels(*distances.shape, query_ids=query_ids, query_cams=query_cams,
                         gallery_ids=gallery_ids, gallery_cams=gallery_cams)
  same_id = labels["query_ids"][:, None] == labels["gallery_ids"][None, :]
  kept = kept_by_camera_rule(camera_rule, same_id,
                             labels["query_cams"][:, None] == labels["gallery_cams"][None, :])
  positive = same_id & kept
  num_rows = len(distances)
  ap, inp = np.full(num_rows, np.nan), np.full(num_rows, np.nan)
  first_rank = np.full(num_rows, _NO_RANK, np.int64)
  valid = positive.any(axis=1)
  rows = np.flatnonzero(valid)
  if len(rows):
    ap[rows], inp[rows], first_rank[rows] = metrics_of_ranks(
        [_positive_ranks_of_row(distances[row], kept[row], np.flatnonzero(positive[row]))
         for row in rows])
  return valid, ap, inp, first_rank


def metrics_of_ranks(rank_lists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(AP, INP float64, first-hit rank) of queries from the ascending 1-based ranks of each one's
  kept true matches (one non-empty array per query): `evaluate`'s statement, for rankings made
  elsewhere (re-ranked distances, the search tool)."""
  num_pos = np.array([len(ranks) for ranks in rank_lists], np.int64)
  if (num_pos < 1).any():
    raise ValueError("every query needs at least one ranked true match")
  padded = np.full((len(rank_lists), max(num_pos, default=1)), _NO_RANK, np.int64)
  for row, ranks in enumerate(rank_lists):
    padded[row, :len(ranks)] = ranks
  return _query_metrics(padded, num_pos, num_pos)


def _positive_ranks_of_row(dist, kept, positives):
  """Ascending 1-based ranks of the positives (ascending gallery indices) among the kept items."""
  pos_dist = dist[positives]
  candidates = np.flatnonzero(kept & (dist <= pos_dist.max()))
  cand_dist = dist[candidates]
  ordered = np.sort(cand_dist)
  before = np.searchsorted(ordered, pos_dist, side="left")
  tied = np.searchsorted(ordered, pos_dist, side="right") - before > 1
  if tied.any():
    # Equal distances: the lower gallery index goes first, as in `evaluate`.
    same = cand_dist[None, :] == pos_dist[tied][:, None]
    before[tied] += np.sum(same & (candidates[None, :] < positives[tied][:, None]), axis=1)
  return np.sort(before + 1)


def summarize_per_query(num_queries: int, ap, inp, first_rank, *, max_rank: int = 50) -> dict:
  """`evaluate`'s result from the per-query values of its valid queries (in any order)."""
  return _summary(num_queries, ap, inp, first_rank, max_rank=max_rank, top_k=None)


def _summary(num_queries: int, ap, inp, first_rank, *, max_rank: int, top_k) -> dict:
  ap, inp, first_rank = (np.asarray(x) for x in (ap, inp, first_rank))
  result = {"num_queries": int(num_queries), "num_valid_queries": len(ap),
            "truncated_top_k": top_k}
  if not len(ap):
    return _without_valid_queries(result, max_rank)
  # Means in float64 on the host.
  cmc = (first_rank[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0)
  return {**result, "mAP": float(np.mean(ap, dtype=np.float64)),
          "mINP": float(np.mean(inp, dtype=np.float64)), "cmc": cmc}
