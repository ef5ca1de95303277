"""Exact k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory linear in the number of images.

The reference (every ReID repository's `re_ranking`) builds dense (Q+G)² matrices: distances,
their argsort, the weights V and their query expansion. Here the same numbers come from sparse
structures, because the algorithm only ever looks at short prefixes of each row's ranking:

  A. Dense, in JAX, sharded over a 1-D mesh of devices: for a block of rows, the fp32 distances
     d[i, j] = |x_i|² + |x_j|² − 2 x_i·x_j against all N = Q + G rows, their row max, and the
     K = max(k1 + 1, k2) nearest items (indices, distances / row max) in ascending order, ties to
     the lower index. Only [N, K] tables leave the devices.
  B. Sparse, in NumPy: k-reciprocal sets R(i) and R½(i) from the table prefixes, the expansion
     E(i), V[i, E(i)] = softmax(−original_dist[i, E(i)]) as a float32 CSR matrix, and the query
     expansion V_qe = (1/k2)·A·V, A the top-k2 indicator. Members of E(i) outside i's top-K table
     get their distance from the features with the same formula, divided by i's row max.
  C. Per block of query rows: s[i, j] = Σ_k min(V_qe[i, k], V_qe[j, k]) by a sparse join (each
     query nonzero against the gallery nonzeros of its column), on host threads, and
     final = (1 − s/(2 − s))·(1 − λ) + original_dist·λ, original_dist recomputed on the devices
     (the next block's while the host joins this one). Where two rows share no support s = 0 and
     the Jaccard term is exactly 1, so nothing is lost by skipping them.

Against the reference's own quirks: original_dist is d divided by its column max, then transposed;
d is symmetric up to rounding, so row i here is d[i, :] / max_j d[i, j]. The reference stores V,
V_qe and the Jaccard term in float16 and sums the overlaps s in float16; here all is float32, so
the result is the reference's computation without its float16 rounding: on Market-1501-sized
data (k1 = 50, k2 = 15) they differ by up to 4e-2 (mean 2e-4) with the same mAP and R1, and a
float32 copy of the reference matches this to 3e-7. Ties in a row's ranking (np.argsort there,
quicksort: arbitrary order) go to the lower index here.

Memory: features, the [N, K] tables and V, V_qe (O(N·k1·k2) nonzeros), plus working blocks sized
by `memory_budget_bytes`: stage A's block of rows × N per device, stage B's chunk marker on the
host, stage C's query block × G (and its join) on the host.

Time: stage A's N²·D product dominates at scale (200k images, D = 768, 2 CPU cores: 444 s of a
523 s run, at about 80% of the fp32 GEMM rate XLA reaches here; bench/reranking.py); stages B
and C grow linearly in N for a fixed neighbourhood size.
"""
import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from uad_jax.evaluation import metrics

# Working memory of one block: per device in stage A, on the host in stages B and C. The
# features, the top-K tables and V come on top of it.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
_ROW_AXIS = "rows"
# Stage A: fp32 distances, their normalised copy and top_k's own scratch, per (row, column).
_STAGE_A_BYTES_PER_DISTANCE = 16
# Stage C, host: the devices' fp32 blocks (this one and the next), the fp32 overlap sums and the
# fp32 temporaries of the final formula, per (query, gallery) pair.
_STAGE_C_BYTES_PER_PAIR = 32
# Stage C join: positions, row and column indices, values and minima, per triple.
_BYTES_PER_TRIPLE = 40
# Host threads of the stage C join; beyond a few, memory bandwidth is the limit.
_MAX_JOIN_THREADS = 8
# Fewer rows per device and block waste the devices' time on dispatch for no memory saved.
_MIN_ROWS_PER_DEVICE = 8
# Stage B rows per chunk at most: larger chunks only grow the [rows, N] marker, as NumPy's
# per-call overhead is already negligible against a chunk's work.
_MAX_MARKER_ROWS = 1024
# Feature rows gathered at once for the distances of expansion members outside the top-K table.
_GATHERED_PAIRS = 8192


@dataclasses.dataclass(frozen=True)
class RerankSettings:
  """k1: size of the k-reciprocal neighbourhoods (and round(k1/2) of the expansion's);
  k2: neighbours averaged by the query expansion (1: none); lambda_value: weight of the original
  distance against the Jaccard distance (1: the original ranking)."""
  k1: int
  k2: int
  lambda_value: float

  def __post_init__(self):
    for name in ("k1", "k2"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    value = self.lambda_value
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0 <= value <= 1):
      raise ValueError(f"lambda_value must be a number in [0, 1], got {value!r}")

  @property
  def half_k1(self) -> int:
    """The expansion's neighbourhood size, rounded as the reference does (np.around: half to
    even, so k1 = 5 gives 2 and k1 = 7 gives 4)."""
    return int(np.around(self.k1 / 2))

  @property
  def table_width(self) -> int:
    """Nearest items kept per row: the k1 + 1 of the reciprocal sets and the k2 of the query
    expansion (round(k1/2) + 1 ≤ k1 + 1)."""
    return max(self.k1 + 1, self.k2)


# The paper's settings; most ReID repositories use them.
PAPER_SETTINGS = RerankSettings(k1=20, k2=6, lambda_value=0.3)
# The settings of our reference evaluation (WHU-MARS CVPR26_UAD).
REFERENCE_SETTINGS = RerankSettings(k1=50, k2=15, lambda_value=0.3)


class Reranker:
  """Re-ranked query × gallery distances, computed once (stages A and B) and served by blocks.

  Args:
    query_feats, gallery_feats: [Q, D] and [G, D] features, used as given (the evaluation passes
      L2-normalised ones) and cast to fp32.
    settings: k1, k2 and λ.
    devices: devices of the 1-D mesh for the dense stages; default `jax.local_devices()`.
    memory_budget_bytes: working memory of one block (see the module docstring).
  """

  def __init__(self, query_feats, gallery_feats, settings: RerankSettings, *,
               devices: Optional[Sequence[jax.Device]] = None,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES):
    if not isinstance(settings, RerankSettings):
      raise TypeError(f"settings must be a RerankSettings, got {type(settings).__name__}")
    if (isinstance(memory_budget_bytes, bool)
        or not isinstance(memory_budget_bytes, (int, np.integer)) or memory_budget_bytes < 1):
      raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    query_feats, gallery_feats = _checked_features(query_feats, gallery_feats,
                                                   settings.table_width)
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
      raise ValueError("devices must name at least one device")
    self.settings = settings
    self.num_queries, self.num_gallery = len(query_feats), len(gallery_feats)
    self._budget = int(memory_budget_bytes)
    self._mesh = jax.make_mesh((len(devices),), (_ROW_AXIS,), devices=devices)

    # Wall seconds of stage A, stage B's weights and its query expansion (with the split into
    # the query and gallery layouts); benchmarks report where the time goes.
    self.seconds = {}
    clock = time.perf_counter()

    def lap(stage):
      nonlocal clock
      now = time.perf_counter()
      self.seconds[stage] = now - clock
      clock = now

    feats = np.concatenate([query_feats, gallery_feats])
    sq_norms = np.asarray(_squared_norms(feats))
    row_max, top_dist, top_idx = _nearest_table(feats, sq_norms, settings.table_width,
                                                self._mesh, self._budget)
    lap("nearest_table")
    if not (row_max > 0).all():
      raise ValueError("some feature row is at distance 0 from every row (all features "
                       "coincide); re-ranking divides by each row's largest distance")
    weights = _k_reciprocal_weights(feats, sq_norms, row_max, top_dist, top_idx, settings,
                                    self._budget)
    lap("k_reciprocal_weights")
    if settings.k2 > 1:
      weights = _query_expanded(weights, top_idx[:, :settings.k2], self._budget)
    del top_dist, top_idx
    q = self.num_queries
    self._query_weights = weights[:q]                  # CSR: a query's nonzeros by column
    self._gallery_weights = weights[q:].tocsc()        # CSC: a column's gallery nonzeros
    del weights
    self._query_feats, self._query_sq, self._query_max = query_feats, sq_norms[:q], row_max[:q]
    replicated = NamedSharding(self._mesh, PartitionSpec())
    self._gallery_feats = jax.device_put(gallery_feats, replicated)
    self._gallery_sq = jax.device_put(sq_norms[q:], replicated)
    lap("query_expansion")

  def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yields (start, stop, distances [stop − start, G] fp32) for consecutive query blocks."""
    rows_per_block = self._query_block_rows()
    gallery_columns = self._gallery_weights
    triples_per_query = _join_sizes(self._query_weights, np.diff(gallery_columns.indptr))
    max_triples = max(1, (self._budget // 2) // _BYTES_PER_TRIPLE)
    starts = list(range(0, self.num_queries, rows_per_block))
    with concurrent.futures.ThreadPoolExecutor(_join_threads()) as pool:
      # The devices compute the next block's original distances while the host joins this one.
      pending = self._original_distances(starts[0], rows_per_block)
      for number, start in enumerate(starts):
        stop = min(start + rows_per_block, self.num_queries)
        following = (self._original_distances(starts[number + 1], rows_per_block)
                     if number + 1 < len(starts) else None)
        overlap = _overlap_sums(self._query_weights, gallery_columns, start, stop,
                                triples_per_query, max_triples, pool)
        original = np.asarray(pending)[:stop - start]
        yield start, stop, _combined(overlap, original, self.settings.lambda_value)
        pending = following

  def distances(self) -> np.ndarray:
    """The whole [Q, G] fp32 matrix (for sets small enough to hold it)."""
    out = np.empty((self.num_queries, self.num_gallery), np.float32)
    for start, stop, block in self.blocks():
      out[start:stop] = block
    return out

  def _query_block_rows(self) -> int:
    """Query rows per stage-C block: a multiple of the device count, half the budget."""
    num_devices = self._mesh.devices.size
    fit = (self._budget // 2) // (_STAGE_C_BYTES_PER_PAIR * self.num_gallery)
    return num_devices * _rows_per_device(fit // num_devices, self.num_queries, num_devices)

  def _original_distances(self, start: int, rows_per_block: int) -> jax.Array:
    """Dispatches original_dist[start : start + rows_per_block, gallery]; rows past the last
    query repeat it (their results are dropped)."""
    rows = np.minimum(np.arange(start, start + rows_per_block), self.num_queries - 1)
    sharded = NamedSharding(self._mesh, PartitionSpec(_ROW_AXIS))
    step = _normalized_distance_step(self._mesh)
    return step(jax.device_put(self._query_feats[rows], sharded),
                jax.device_put(self._query_sq[rows], sharded),
                jax.device_put(self._query_max[rows], sharded),
                self._gallery_feats, self._gallery_sq)


def rerank(query_feats, gallery_feats, k1: int = PAPER_SETTINGS.k1, k2: int = PAPER_SETTINGS.k2,
           lambda_value: float = PAPER_SETTINGS.lambda_value, *,
           devices: Optional[Sequence[jax.Device]] = None,
           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> np.ndarray:
  """The re-ranked [Q, G] fp32 distances (the reference's `re_ranking(...)` result)."""
  return Reranker(query_feats, gallery_feats, RerankSettings(k1, k2, lambda_value),
                  devices=devices, memory_budget_bytes=memory_budget_bytes).distances()


# Stage A: the nearest-item table, on the devices.

@jax.jit
def _squared_norms(feats):
  return jnp.sum(jnp.square(feats), axis=1)


def _squared_distances(rows, row_sq, cols, col_sq):
  """The reference's fp32 d = (|x_i|² + |x_j|²) − 2 x_i·x_j (torch addmm, beta 1, alpha −2).

  HIGHEST: GPUs and TPUs would otherwise run the fp32 product in TF32 or bf16 passes. The
  barrier keeps XLA:CPU from fusing the norm terms into the product as an epilogue, which slows
  the whole product down more (10% at 256 × 200k) than a separate elementwise pass costs.
  """
  dots = lax.optimization_barrier(jnp.dot(rows, cols.T, precision=lax.Precision.HIGHEST))
  return (row_sq[:, None] + col_sq[None, :]) - 2.0 * dots


@functools.lru_cache(maxsize=16)
def _nearest_step(mesh, table_width):
  """Jitted (rows, row_sq, all feats, all sq) → (row max, K nearest distances / row max, their
  indices), rows sharded over the mesh.

  `lax.top_k` rather than a host selection: on XLA:CPU (2 cores, 256 rows × 200k columns, K = 21
  or 51) it takes 0.15-0.25 s against 0.5 s for np.argpartition row by row (0.9-1.4 s for the
  vectorised call), next to 0.5 s for the distance product itself. It breaks ties to the lower
  index.
  """
  def body(rows, row_sq, feats, sq_norms):
    dist = _squared_distances(rows, row_sq, feats, sq_norms)
    row_max = jnp.max(dist, axis=1)
    negated, indices = lax.top_k(-(dist / row_max[:, None]), table_width)
    return row_max, -negated, indices

  rows, replicated = PartitionSpec(_ROW_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, replicated, replicated),
                               out_specs=(rows, rows, rows)))


@functools.lru_cache(maxsize=16)
def _normalized_distance_step(mesh):
  """Jitted (rows, row_sq, row max, gallery feats, gallery sq) → original_dist block."""
  def body(rows, row_sq, row_max, cols, col_sq):
    return _squared_distances(rows, row_sq, cols, col_sq) / row_max[:, None]

  rows, replicated = PartitionSpec(_ROW_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows,) * 3 + (replicated,) * 2,
                               out_specs=rows))


def _nearest_table(feats, sq_norms, table_width, mesh, budget):
  """(row max [N], nearest normalised distances [N, K] ascending, their indices [N, K] int32)."""
  n = len(feats)
  num_devices = mesh.devices.size
  per_device = _rows_per_device(budget // (_STAGE_A_BYTES_PER_DISTANCE * n), n, num_devices)
  rows_per_step = per_device * num_devices
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec(_ROW_AXIS))
  all_feats = jax.device_put(feats, replicated)
  all_sq = jax.device_put(sq_norms, replicated)
  step = _nearest_step(mesh, table_width)

  row_max = np.empty(n, np.float32)
  top_dist = np.empty((n, table_width), np.float32)
  top_idx = np.empty((n, table_width), np.int32)

  def dispatch(start):
    rows = np.minimum(np.arange(start, start + rows_per_step), n - 1)  # pad with the last row
    return start, step(jax.device_put(feats[rows], sharded),
                       jax.device_put(sq_norms[rows], sharded), all_feats, all_sq)

  def collect(start, outputs):
    stop = min(start + rows_per_step, n)
    for table, values in zip((row_max, top_dist, top_idx), jax.device_get(outputs)):
      table[start:stop] = values[:stop - start]

  # One step in flight while the previous one is collected: the devices never wait on the host,
  # and at most two steps' outputs are alive.
  pending = None
  for start in range(0, n, rows_per_step):
    dispatched = dispatch(start)
    if pending is not None:
      collect(*pending)
    pending = dispatched
  collect(*pending)
  return row_max, top_dist, top_idx


def _rows_per_device(fit: int, num_rows: int, num_devices: int) -> int:
  """Rows of one device's block: what the budget fits, at least _MIN_ROWS_PER_DEVICE, at most
  its share of the rows, and never 1.

  A single row makes XLA:CPU compute a matrix-vector product, whose sums are rounded differently
  (1 ulp); from 2 rows on, every row's distances are the same bits whatever the block size, so
  results do not depend on the device count or the budget.
  """
  return max(2, min(max(fit, _MIN_ROWS_PER_DEVICE), math.ceil(num_rows / num_devices)))


# Stage B: k-reciprocal sets, their expansion and the weights V, on the host.

def _reciprocal_mask(neighbours, chunk_rows):
  """mask[i, r]: whether i is among the neighbours of its r-th neighbour j = neighbours[i, r]
  (each row's neighbours are the same-length ranking prefix)."""
  n, width = neighbours.shape
  mask = np.empty((n, width), bool)
  for start in range(0, n, chunk_rows):
    rows = np.arange(start, min(start + chunk_rows, n))
    mask[rows] = (neighbours[neighbours[rows]] == rows[:, None, None]).any(axis=2)
  return mask


def _k_reciprocal_weights(feats, sq_norms, row_max, top_dist, top_idx, settings, budget):
  """V as an [N, N] float32 CSR matrix: row i is softmax(−original_dist[i, E(i)]) on E(i)."""
  n, table_width = top_idx.shape
  k1, half = settings.k1, settings.half_k1
  first, first_half = top_idx[:, :k1 + 1], top_idx[:, :half + 1]
  # Per row, the gathers below touch (k1+1)·(half+1) ints several times over.
  chunk_rows = max(1, min(n, budget // (8 * (k1 + 1) * (k1 + 1))))
  in_r = _reciprocal_mask(first, chunk_rows)                 # R(i) = first[i][in_r[i]]
  in_half_r = _reciprocal_mask(first_half, chunk_rows)        # R½(c) likewise

  # Per chunk a dense [rows, N] marker of each row's table positions (+1; 0: not in the table)
  # answers "is m in R(i)" and "where is d(i, m) in the table" by one gather each.
  marker_dtype = np.min_scalar_type(table_width)
  per_row = n * marker_dtype.itemsize + 32 * (k1 + 1) * (half + 2)
  chunk_rows = max(1, min(n, _MAX_MARKER_ROWS, budget // per_row))
  marker = np.zeros((chunk_rows, n), marker_dtype)
  positions = np.arange(1, table_width + 1, dtype=marker_dtype)
  counts, indices, data = [], [], []
  for start in range(0, n, chunk_rows):
    rows = np.arange(start, min(start + chunk_rows, n))
    local = np.arange(len(rows))[:, None]
    marker[local, top_idx[rows]] = positions
    members = _expanded_sets(rows, local, marker, first, first_half, in_r, in_half_r)
    # Each row's distinct members, ascending (padding −1 sorts first and is dropped).
    members.sort(axis=1)
    keep = members >= 0
    keep[:, 1:] &= members[:, 1:] != members[:, :-1]
    row_of_pair = np.nonzero(keep)[0]
    cols = members[keep]
    dist = _pair_distances(rows[row_of_pair], row_of_pair, cols, marker, top_dist, feats,
                           sq_norms, row_max)
    marker[local, top_idx[rows]] = 0
    weight = np.exp(-dist)
    per_row_sum = np.bincount(row_of_pair, weights=weight, minlength=len(rows))
    counts.append(keep.sum(axis=1))
    indices.append(cols.astype(np.int32))
    data.append(weight / per_row_sum.astype(np.float32)[row_of_pair])
  indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
  return scipy.sparse.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr),
                                 shape=(n, n))


def _expanded_sets(rows, local, marker, first, first_half, in_r, in_half_r):
  """E(i) of each row, unsorted with repeats and −1 padding: [rows, (k1+1)·(half+2)] int32.

  For each candidate c in R(i), R½(c) joins E(i) when more than 2/3 of it lies in R(i).
  """
  k1_plus = first.shape[1]
  candidates = first[rows]                                   # [c, k1+1]; in R where in_r
  is_candidate = in_r[rows]
  their_half = first_half[candidates]                        # [c, k1+1, half+1]
  in_their_half_r = in_half_r[candidates]
  table_pos = marker[local[:, :, None], their_half].astype(np.int32) - 1
  in_first = (table_pos >= 0) & (table_pos < k1_plus)
  in_own_r = in_first & is_candidate[local[:, :, None], np.where(in_first, table_pos, 0)]
  shared = np.sum(in_own_r & in_their_half_r, axis=2)
  size = np.sum(in_their_half_r, axis=2)
  # The reference's float test, len(intersection) > 2/3 * len(R½(c)), kept as is.
  accepted = is_candidate & (shared > 2 / 3 * size)
  own = np.where(is_candidate, candidates, -1)
  added = np.where(accepted[:, :, None] & in_their_half_r, their_half, -1)
  return np.concatenate([own, added.reshape(len(rows), -1)], axis=1)


def _pair_distances(rows, local_rows, cols, marker, top_dist, feats, sq_norms, row_max):
  """original_dist[rows, cols] fp32: from the top-K table where there, else from the features."""
  table_pos = marker[local_rows, cols].astype(np.int32) - 1
  known = table_pos >= 0
  dist = np.empty(len(cols), np.float32)
  dist[known] = top_dist[rows[known], table_pos[known]]
  missing = np.nonzero(~known)[0]
  for start in range(0, len(missing), _GATHERED_PAIRS):
    pairs = missing[start:start + _GATHERED_PAIRS]
    i, j = rows[pairs], cols[pairs]
    dots = np.einsum("pd,pd->p", feats[i], feats[j])
    dist[pairs] = ((sq_norms[i] + sq_norms[j]) - np.float32(2) * dots) / row_max[i]
  return dist


def _query_expanded(weights, nearest, budget):
  """V_qe[i] = mean of V over i's k2 nearest rows (itself first): (1/k2)·A·V, A their indicator.

  By row chunks, so that one chunk's product (at most k2 × its rows' nonzeros) fits the budget.
  scipy adds A's terms in its stored order, the ranking order, as the reference's np.mean does.
  """
  n, k2 = nearest.shape
  indicator = scipy.sparse.csr_matrix(
      (np.ones(nearest.size, np.float32), nearest.ravel(), np.arange(0, nearest.size + 1, k2)),
      shape=(n, n))
  row_nnz = np.diff(weights.indptr)
  widest = max(1, int(row_nnz.max(initial=1)))
  chunk_rows = max(1, min(n, budget // (16 * k2 * widest)))
  pieces = []
  for start in range(0, n, chunk_rows):
    piece = indicator[start:start + chunk_rows] @ weights
    piece.sort_indices()
    piece.data /= np.float32(k2)
    pieces.append(piece)
  return scipy.sparse.vstack(pieces, format="csr")


# Stage C: the Jaccard term by a sparse join, on the host.

def _join_threads() -> int:
  return max(1, min(_MAX_JOIN_THREADS, os.cpu_count() or 1))


def _join_sizes(query_weights, gallery_column_nnz):
  """Triples of each query row's join: Σ over its nonzero columns of their gallery nonzeros."""
  per_entry = gallery_column_nnz[query_weights.indices].astype(np.int64)
  rows = np.repeat(np.arange(query_weights.shape[0]), np.diff(query_weights.indptr))
  return np.bincount(rows, weights=per_entry, minlength=query_weights.shape[0]).astype(np.int64)


def _overlap_sums(query_weights, gallery_columns, start, stop, triples_per_query, max_triples,
                  pool):
  """s[i, j] = Σ_k min(V_qe[i, k], V_qe[Q + j, k]) for queries start..stop: [rows, G] fp32.

  Each query nonzero (i, k) meets the gallery nonzeros of column k. The block's rows are cut
  into runs whose joins fit `max_triples` together across the pool's threads, and the runs are
  joined on the pool (NumPy and scipy release the GIL: 1.7x on 2 cores). Each sum is still
  taken in one fixed order, so results do not depend on the runs or the threads.
  """
  overlap = np.zeros((stop - start, gallery_columns.shape[0]), np.float32)
  per_run = max(1, max_triples // _join_threads())
  runs, row = [], start
  while row < stop:
    # The most rows from `row` whose triples fit (at least one).
    ends = np.cumsum(triples_per_query[row:stop])
    end = row + max(1, int(np.searchsorted(ends, per_run, side="right")))
    runs.append((row, end))
    row = end

  def join(run):
    first, last = run
    _join_rows(query_weights, gallery_columns, first, last, overlap[first - start:last - start])

  for _ in pool.map(join, runs):
    pass
  return overlap


def _join_rows(query_weights, gallery_columns, first, last, out):
  """Adds s of queries first..last into `out` [last − first, G] (zeros on entry)."""
  entries = slice(query_weights.indptr[first], query_weights.indptr[last])
  k = query_weights.indices[entries]
  value = query_weights.data[entries]
  row_of_entry = np.repeat(np.arange(last - first, dtype=np.int32),
                           np.diff(query_weights.indptr[first:last + 1]))
  column_start = gallery_columns.indptr[k]
  length = gallery_columns.indptr[k + 1] - column_start
  total = int(length.sum(dtype=np.int64))
  # Position of each triple in the gallery arrays: its column's start plus its offset in it.
  position = np.repeat(column_start - (np.cumsum(length) - length), length)
  position += np.arange(total, dtype=position.dtype)
  smaller = np.repeat(value, length)
  np.minimum(smaller, gallery_columns.data[position], out=smaller)
  # scipy sums a COO matrix's duplicate entries into the dense output in place, in fp32: fewer
  # passes over the triples than an int64 key and np.bincount's float64 weights (2x faster).
  triples = scipy.sparse.coo_matrix(
      (smaller, (np.repeat(row_of_entry, length), gallery_columns.indices[position])),
      shape=out.shape)
  triples.toarray(out=out)


def _combined(overlap, original, lambda_value):
  """The reference's final_dist = jaccard·(1 − λ) + original_dist·λ, in fp32."""
  jaccard = 1 - overlap / (2 - overlap)
  return jaccard * np.float32(1 - lambda_value) + original * np.float32(lambda_value)


def _checked_features(query_feats, gallery_feats, table_width):
  checked = metrics.checked_features(query_feats, gallery_feats, non_empty=True)
  total = len(checked[0]) + len(checked[1])
  if total < table_width:
    raise ValueError(f"re-ranking needs at least max(k1 + 1, k2) = {table_width} query + gallery "
                     f"rows, got {total}; lower k1 or k2")
  if total >= 2**31:
    raise ValueError(f"{total} rows; at most 2**31 − 1 are supported (int32 indices)")
  return checked
