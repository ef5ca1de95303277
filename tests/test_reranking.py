"""k-reciprocal re-ranking against an independent dense NumPy statement of the reference algorithm,
and the re-ranked protocol evaluation against the plain one."""
import jax
import numpy as np
import pytest

from uad_jax.evaluation import metrics, protocols, reranking
from uad_jax.evaluation.protocols import MODALITIES, RetrievalSide
from uad_jax.evaluation.reranking import RerankSettings

NUM_QUERIES, NUM_GALLERY, DIM, NUM_IDS = 40, 120, 16, 12
SETTINGS = [RerankSettings(20, 6, 0.3),    # the paper's
            RerankSettings(50, 15, 0.3),   # the reference evaluation's
            RerankSettings(20, 1, 0.3),    # no query expansion
            RerankSettings(5, 3, 0.6)]     # round(5/2) = 2: np.around rounds half to even
each_setting = pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"k1={s.k1},k2={s.k2}")


def reference_rerank(query, gallery, settings, store_dtype):
  """The reference algorithm on dense (Q+G)² arrays, V, V_qe and the Jaccard term stored in
  `store_dtype` (float16 as the reference does). Returns (final [Q, G] fp32, details)."""
  k1, k2, lam = settings.k1, settings.k2, settings.lambda_value
  x = np.concatenate([query, gallery]).astype(np.float32)
  n, nq = len(x), len(query)
  sq = np.sum(x * x, axis=1)
  d = (sq[:, None] + sq[None, :]) - np.float32(2) * (x @ x.T)
  original = np.transpose(d / np.max(d, axis=0))
  rank = np.argsort(original, axis=1)
  half = int(np.around(k1 / 2))

  def reciprocal(i, k):
    forward = rank[i, :k + 1]
    return forward[[i in rank[j, :k + 1] for j in forward]]

  v = np.zeros((n, n), store_dtype)
  expansion = []
  for i in range(n):
    r = reciprocal(i, k1)
    members = list(r)
    for c in r:
      rc = reciprocal(c, half)
      if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
        members.extend(rc)
    e = np.unique(members)
    expansion.append((r, e))
    weight = np.exp(-original[i, e])
    v[i, e] = weight / np.sum(weight)
  if k2 != 1:
    # np.mean of float16 rows sums in float32 and returns float16, as the reference's does.
    v = np.stack([np.mean(v[rank[i, :k2]], axis=0) for i in range(n)]).astype(store_dtype)
  final = np.empty((nq, n - nq), np.float32)
  for i in range(nq):
    overlap = np.zeros(n, store_dtype)
    for k in np.flatnonzero(v[i]):
      holders = np.flatnonzero(v[:, k])
      overlap[holders] = overlap[holders] + np.minimum(v[i, k], v[holders, k])
    jaccard = 1 - overlap / (2 - overlap)
    final[i] = (jaccard * (1 - lam) + original[i] * lam)[nq:]
  return final, {"original": original, "rank": rank, "expansion": expansion}


def clustered(seed, size, num_ids=NUM_IDS, dim=DIM, noise=0.8):
  """L2-normalised identity clusters: k-reciprocal sets larger than one item and expansions."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_ids, size)
  centres = np.random.default_rng(0).standard_normal((num_ids, dim))
  feats = (centres[labels] + noise * rng.standard_normal((size, dim))).astype(np.float32)
  return feats / np.linalg.norm(feats, axis=1, keepdims=True), labels


FEATS, LABELS = clustered(1, NUM_QUERIES + NUM_GALLERY)
QUERY, GALLERY = FEATS[:NUM_QUERIES], FEATS[NUM_QUERIES:]
CAMS = np.random.default_rng(2).integers(0, 4, len(FEATS))


@pytest.fixture(scope="module")
def references():
  cache = {}

  def get(settings, dtype):
    key = (settings, np.dtype(dtype).name)
    if key not in cache:
      cache[key] = reference_rerank(QUERY, GALLERY, settings, dtype)
    return cache[key]
  return get


def mean_ap_and_rank1(distances):
  valid, ap, _, first_rank = metrics.per_query_metrics_of_distances(
      distances, LABELS[:NUM_QUERIES], LABELS[NUM_QUERIES:], CAMS[:NUM_QUERIES],
      CAMS[NUM_QUERIES:], camera_rule="market")
  return np.mean(ap[valid]), np.mean(first_rank[valid] == 1)


@each_setting
def test_the_fixture_has_no_ties_at_prefix_ends_and_exercises_the_expansion(settings,
                                                                           references):
  _, details = references(settings, np.float32)
  ordered = np.sort(details["original"], axis=1)
  for prefix in {settings.k1 + 1, settings.half_k1 + 1, settings.k2}:
    if prefix < len(FEATS):
      assert np.min(ordered[:, prefix] - ordered[:, prefix - 1]) > 1e-6, prefix
  # Expansion must add members to some rows (else a broken expansion passes), some of them
  # outside the row's top-K table (their distances come from the features).
  rank_of = np.argsort(details["rank"], axis=1)
  added = [np.setdiff1d(e, r) for r, e in details["expansion"]]
  beyond = sum(np.sum(rank_of[i, a] >= settings.table_width) for i, a in enumerate(added))
  if settings.k1 >= 20:   # k1 = 5: R½ sets of at most 3 items hardly ever add one
    assert sum(len(a) > 0 for a in added) > len(FEATS) // 4
    assert beyond > 0


@each_setting
def test_equals_the_float32_reference(settings, references):
  expected, details = references(settings, np.float32)
  ours = reranking.rerank(QUERY, GALLERY, settings.k1, settings.k2, settings.lambda_value)
  assert ours.dtype == np.float32 and ours.shape == (NUM_QUERIES, NUM_GALLERY)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)
  # Re-ranking moved the distances (the Jaccard term is not trivially 1).
  original = details["original"][:NUM_QUERIES, NUM_QUERIES:]
  assert np.abs(ours - original).max() > 0.05


@each_setting
def test_within_float16_resolution_of_the_reference(settings, references):
  """The reference stores V, V_qe and the Jaccard term in float16 and sums overlaps in it; the
  gap to our fp32 result is that rounding. Measured here: at most 4.3e-3 (k1 = 50: hundreds of
  float16 additions per overlap, each rounded to 2^-12 near 0.5), mean at most 4.7e-4; mAP equal
  for (20, 6) and (50, 15), 2e-6 apart for (20, 1) and 2.6e-4 for (5, 3); R1 equal."""
  faithful, _ = references(settings, np.float16)
  ours = reranking.rerank(QUERY, GALLERY, settings.k1, settings.k2, settings.lambda_value)
  assert np.abs(ours - faithful).max() < 6e-3
  assert np.abs(ours - faithful).mean() < 1e-3
  (map_ours, r1_ours), (map_ref, r1_ref) = map(mean_ap_and_rank1, (ours, faithful))
  assert abs(map_ours - map_ref) < 5e-4 and r1_ours == r1_ref


def test_devices_and_memory_budget_do_not_change_a_bit(references):
  settings = SETTINGS[0]
  eight_devices = reranking.Reranker(QUERY, GALLERY, settings, devices=jax.devices()).distances()
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(eight_devices, references(settings, np.float32)[0], rtol=0,
                             atol=2e-6)
  # A budget of 1000 bytes: one row per chunk on the host, the fewest rows per device and block.
  for devices in (jax.devices()[:1], jax.devices()):
    tiny = reranking.Reranker(QUERY, GALLERY, settings, devices=devices, memory_budget_bytes=1000)
    blocks = list(tiny.blocks())
    step = blocks[0][1]
    assert [(start, stop) for start, stop, _ in blocks] == [
        (s, min(s + step, NUM_QUERIES)) for s in range(0, NUM_QUERIES, step)]
    assert len(blocks) > 1 or len(devices) == 8
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in blocks]), eight_devices)


def test_lambda_one_is_the_original_ranking():
  original = reference_rerank(QUERY, GALLERY, RerankSettings(20, 6, 1.0), np.float32)[0]
  ours = reranking.rerank(QUERY, GALLERY, 20, 6, 1.0)
  np.testing.assert_allclose(ours, original, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.argsort(ours, axis=1), np.argsort(original, axis=1))


def _retrieval_side(feats, labels, seed):
  rng = np.random.default_rng(seed)
  cams = rng.integers(0, 7, len(feats))
  return RetrievalSide(feats, labels, cams, rng.integers(0, len(MODALITIES), len(feats)),
                       (cams >= 5).astype(int))


SIDE_FEATS, SIDE_LABELS = clustered(3, 260, num_ids=10, noise=1.2)
QUERY_SIDE = _retrieval_side(SIDE_FEATS[:60], SIDE_LABELS[:60], 4)
GALLERY_SIDE = _retrieval_side(SIDE_FEATS[60:], SIDE_LABELS[60:], 5)


def test_reranked_protocols_with_lambda_one_equal_the_plain_protocols():
  plain = protocols.evaluate_protocols(QUERY_SIDE, GALLERY_SIDE, max_rank=10)
  # One device and a small budget: blocks of 8 queries, so cells gather values across blocks.
  reranked = protocols.evaluate_protocols_reranked(
      QUERY_SIDE, GALLERY_SIDE, settings=RerankSettings(20, 6, 1.0), max_rank=10,
      devices=jax.devices()[:1], memory_budget_bytes=20_000)
  assert reranked["reranking"] == {"k1": 20, "k2": 6, "lambda_value": 1.0}
  assert reranked["camera_rule"] == "sysu" and reranked["truncated_top_k"] is None
  assert list(reranked["protocols"]) == list(plain["protocols"])
  for protocol, cells in plain["protocols"].items():
    assert list(reranked["protocols"][protocol]) == list(cells)
    for name, expected in cells.items():
      got = reranked["protocols"][protocol][name]
      for key in ("num_queries", "num_valid_queries", "num_gallery", "truncated_top_k"):
        assert got[key] == expected[key], (protocol, name, key)
      if expected["num_valid_queries"]:
        assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6), (protocol, name)
        assert got["mINP"] == pytest.approx(expected["mINP"], abs=1e-6), (protocol, name)
        np.testing.assert_array_equal(got["cmc"], expected["cmc"])
      else:
        assert np.isnan(got["mAP"])


def test_a_reranked_cell_ranks_its_part_of_the_whole_reranked_matrix():
  """Distances are re-ranked once over all images; a cell is a sub-matrix of them."""
  settings = RerankSettings(20, 6, 0.3)
  result = protocols.evaluate_protocols_reranked(QUERY_SIDE, GALLERY_SIDE, settings=settings,
                                                 camera_rule="market", max_rank=10,
                                                 memory_budget_bytes=20_000)
  whole = reranking.rerank(QUERY_SIDE.feats, GALLERY_SIDE.feats, 20, 6, 0.3)
  for protocol, name, q_mask, g_mask in [
      ("as_reid", "all→all", np.ones(60, bool), np.ones(200, bool)),
      ("cross_spectral", "TIR→RGB", QUERY_SIDE.modalities == 2, GALLERY_SIDE.modalities == 0)]:
    valid, ap, inp, first_rank = metrics.per_query_metrics_of_distances(
        whole[np.ix_(q_mask, g_mask)], QUERY_SIDE.ids[q_mask], GALLERY_SIDE.ids[g_mask],
        QUERY_SIDE.cams[q_mask], GALLERY_SIDE.cams[g_mask], camera_rule="market")
    expected = metrics.summarize_per_query(q_mask.sum(), ap[valid], inp[valid],
                                           first_rank[valid], max_rank=10)
    cell = result["protocols"][protocol][name]
    assert cell["num_valid_queries"] == expected["num_valid_queries"] > 0
    assert cell["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    np.testing.assert_array_equal(cell["cmc"], expected["cmc"])
  plain = protocols.evaluate_protocols(QUERY_SIDE, GALLERY_SIDE, camera_rule="market",
                                       max_rank=10)
  assert result["protocols"]["as_reid"]["all→all"]["mAP"] != pytest.approx(
      plain["protocols"]["as_reid"]["all→all"]["mAP"], abs=1e-3)


@pytest.mark.parametrize("camera_rule", metrics.CAMERA_RULES)
def test_per_query_metrics_of_distances_equal_evaluate_with_exact_ties(camera_rule):
  rng = np.random.default_rng(7)
  # Small integer features: exact fp32 distances, many of them equal.
  query, gallery = rng.integers(-2, 3, (50, 3)), rng.integers(-2, 3, (300, 3))
  q_ids, g_ids = rng.integers(0, 6, 50), rng.integers(0, 6, 300)
  q_cams, g_cams = rng.integers(0, 3, 50), rng.integers(0, 3, 300)
  distances = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1).astype(np.float32)
  assert len(np.unique(distances)) < 40   # 15,000 distances
  expected = metrics.evaluate(query, gallery, q_ids, g_ids, q_cams, g_cams,
                              camera_rule=camera_rule, normalize=False, max_rank=20)
  valid, ap, inp, first_rank = metrics.per_query_metrics_of_distances(
      distances, q_ids, g_ids, q_cams, g_cams, camera_rule=camera_rule)
  assert np.isnan(ap[~valid]).all() and (first_rank[~valid] == np.iinfo(np.int32).max).all()
  got = metrics.summarize_per_query(50, ap[valid], inp[valid], first_rank[valid], max_rank=20)
  assert got["num_valid_queries"] == expected["num_valid_queries"]
  assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
  assert got["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
  np.testing.assert_allclose(got["cmc"], expected["cmc"], rtol=0, atol=1e-12)


def test_summary_without_valid_queries_is_nan():
  summary = metrics.summarize_per_query(3, [], [], [], max_rank=5)
  assert summary["num_valid_queries"] == 0 and np.isnan(summary["mAP"])
  assert np.isnan(summary["cmc"]).all() and summary["cmc"].shape == (5,)


@pytest.mark.parametrize("fields, message", [
    ({"k1": 0}, "k1 must be an int ≥ 1"),
    ({"k1": 2.0}, "k1 must be an int ≥ 1"),
    ({"k2": 0}, "k2 must be an int ≥ 1"),
    ({"k2": True}, "k2 must be an int ≥ 1"),
    ({"lambda_value": -0.1}, r"lambda_value must be a number in \[0, 1\]"),
    ({"lambda_value": 1.5}, r"lambda_value must be a number in \[0, 1\]"),
    ({"lambda_value": float("nan")}, r"lambda_value must be a number in \[0, 1\]"),
])
def test_bad_settings_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    RerankSettings(**{"k1": 20, "k2": 6, "lambda_value": 0.3, **fields})


@pytest.mark.parametrize("query, gallery, kwargs, message", [
    (QUERY[0], GALLERY, {}, r"query_feats must be a 2-D array"),
    (QUERY, GALLERY[:, :8], {}, "gallery_feats has dim 8 but query_feats has dim 16"),
    (QUERY, np.where(np.arange(NUM_GALLERY)[:, None] == 3, np.inf, GALLERY), {},
     "gallery_feats holds non-finite values"),
    (QUERY, GALLERY[:0], {}, "gallery_feats has no rows"),
    (QUERY[:5], GALLERY[:10], {}, r"at least max\(k1 \+ 1, k2\) = 21 query \+ gallery rows"),
    (QUERY.astype(str), GALLERY, {}, "query_feats must hold numbers"),
    (np.zeros_like(QUERY), np.zeros_like(GALLERY), {}, "all features coincide"),
    (QUERY, GALLERY, {"memory_budget_bytes": 0}, "memory_budget_bytes must be a positive int"),
    (QUERY, GALLERY, {"devices": []}, "devices must name at least one device"),
])
def test_bad_inputs_are_refused(query, gallery, kwargs, message):
  with pytest.raises(ValueError, match=message):
    reranking.Reranker(query, gallery, reranking.PAPER_SETTINGS, **kwargs)


def test_bad_evaluation_arguments_are_refused():
  with pytest.raises(TypeError, match="settings must be a RerankSettings"):
    reranking.Reranker(QUERY, GALLERY, (20, 6, 0.3))
  with pytest.raises(ValueError, match="camera_rule must be one of"):
    protocols.evaluate_protocols_reranked(QUERY_SIDE, GALLERY_SIDE,
                                          settings=reranking.PAPER_SETTINGS, camera_rule="x")
  with pytest.raises(ValueError, match="distances must be 2-D"):
    metrics.per_query_metrics_of_distances(np.zeros(3), [0], [0, 1, 2], [0], [0, 1, 2])
  with pytest.raises(ValueError, match="gallery_ids must be 1-D with one entry per row"):
    metrics.per_query_metrics_of_distances(np.zeros((1, 3)), [0], [0, 1], [0], [0, 1, 2])


def test_named_settings():
  assert reranking.PAPER_SETTINGS == RerankSettings(20, 6, 0.3)
  assert reranking.REFERENCE_SETTINGS == RerankSettings(50, 15, 0.3)
  assert (RerankSettings(5, 1, 0).half_k1, RerankSettings(7, 1, 0).half_k1) == (2, 4)
  assert RerankSettings(20, 30, 0.3).table_width == 30
