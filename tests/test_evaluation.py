"""The jitted evaluator against a brute-force NumPy statement of the metrics (spec §7); the chance
level against every ranking and against random features."""
import itertools

import jax
import numpy as np
import pytest

from uad_jax.evaluation import metrics

# ---------------------------------------------------------------- independent NumPy statement


def reference_evaluate(query_feats, gallery_feats, query_ids, gallery_ids, query_cams,
                       gallery_cams, camera_rule="sysu", max_rank=50, normalize=True, top_k=None):
  """Textbook loop: sort each row (stable, so ties go to the lower index), drop, walk the ranks."""
  q = np.asarray(query_feats, np.float64)
  g = np.asarray(gallery_feats, np.float64)
  if normalize:
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  dist = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
  gallery_ids, gallery_cams = np.asarray(gallery_ids), np.asarray(gallery_cams)
  aps, inps, cmcs = [], [], []
  for i in range(len(q)):
    same_id = gallery_ids == query_ids[i]
    same_cam = gallery_cams == query_cams[i]
    removed = {"sysu": same_cam, "market": same_id & same_cam,
               "none": np.zeros_like(same_cam)}[camera_rule]
    num_true = int(np.sum(same_id & ~removed))
    if num_true == 0:
      continue
    order = np.argsort(dist[i], kind="stable")
    if top_k is not None:
      order = order[:top_k]
    ranked = [j for j in order if not removed[j]]
    hits, precision_sum, first, last = 0, 0.0, None, None
    for rank, j in enumerate(ranked, start=1):
      if same_id[j]:
        hits += 1
        precision_sum += hits / rank
        first = first or rank
        last = rank
    aps.append(precision_sum / num_true)
    inps.append(num_true / last if hits == num_true else 0.0)
    cmcs.append([first is not None and first <= r for r in range(1, max_rank + 1)])
  if not aps:
    return {"mAP": np.nan, "mINP": np.nan, "cmc": np.full(max_rank, np.nan),
            "num_valid_queries": 0}
  return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": np.mean(cmcs, axis=0),
          "num_valid_queries": len(aps)}


def assert_same_metrics(got, want, atol=1e-6):
  assert got["num_valid_queries"] == want["num_valid_queries"]
  np.testing.assert_allclose(got["mAP"], want["mAP"], atol=atol)
  np.testing.assert_allclose(got["mINP"], want["mINP"], atol=atol)
  np.testing.assert_allclose(got["cmc"], want["cmc"], atol=atol)


def integer_retrieval_set(seed, num_query, num_gallery, num_ids=12, num_cams=4, dim=5):
  """Small-integer features: distances are exact in fp32, and ties (duplicates) are frequent.

  Includes query identities absent from the gallery and one identity whose gallery items all sit
  in camera 0 while some of its queries come from camera 0 too (no valid match under sysu/market).
  """
  rng = np.random.RandomState(seed)
  centres = rng.randint(-3, 4, size=(num_ids + 2, dim))
  g_ids = rng.randint(0, num_ids, num_gallery)
  q_ids = rng.randint(0, num_ids + 2, num_query)   # ids num_ids, num_ids+1: not in the gallery
  g_cams = rng.randint(0, num_cams, num_gallery)
  q_cams = rng.randint(0, num_cams, num_query)
  g_cams[g_ids == 0] = 0
  q_cams[q_ids == 0] = rng.randint(0, 2, np.sum(q_ids == 0))
  g_feats = centres[g_ids] + rng.randint(-2, 3, size=(num_gallery, dim))
  q_feats = centres[q_ids] + rng.randint(-2, 3, size=(num_query, dim))
  duplicated = num_gallery // 5
  g_feats[num_gallery - duplicated:] = g_feats[:duplicated]  # exact duplicates
  q_feats[:3] = g_feats[:3]                                    # zero distances
  return (q_feats.astype(np.float32), g_feats.astype(np.float32), q_ids, g_ids, q_cams, g_cams)


# ---------------------------------------------------------------- hand-computed cases

# One query (feature 0, identity 7, camera 0) and six 1-D gallery items at squared distances
# 1, 4, 9, 16, 25, 1. Items 0, 2, 4 share the identity; items 0 and 5 share the camera.
HAND_GALLERY = dict(gallery_feats=[[1.], [2.], [3.], [4.], [5.], [1.]],
                    gallery_ids=[7, 3, 7, 5, 7, 9], gallery_cams=[0, 1, 1, 2, 2, 0])
HAND_EXPECTED = {
    # Items 0 and 5 dropped; order 1, 2✓, 3, 4✓: AP = (1/2 + 2/4)/2, INP = 2/4.
    "sysu": dict(mAP=0.5, mINP=0.5, cmc=[0, 1, 1, 1, 1, 1]),
    # Item 0 dropped; order 5, 1, 2✓, 3, 4✓: AP = (1/3 + 2/5)/2, INP = 2/5.
    "market": dict(mAP=(1 / 3 + 2 / 5) / 2, mINP=0.4, cmc=[0, 0, 1, 1, 1, 1]),
    # Items 0 and 5 tie at distance 1, item 0 first by index: 0✓, 5, 1, 2✓, 3, 4✓.
    "none": dict(mAP=(1 + 2 / 4 + 3 / 6) / 3, mINP=0.5, cmc=[1, 1, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("camera_rule", metrics.CAMERA_RULES)
def test_hand_computed_single_query(camera_rule):
  got = metrics.evaluate([[0.]], query_ids=[7], query_cams=[0], camera_rule=camera_rule,
                            max_rank=6, normalize=False, **HAND_GALLERY)
  want = HAND_EXPECTED[camera_rule]
  assert got["num_valid_queries"] == 1 and got["truncated_top_k"] is None
  np.testing.assert_allclose(got["mAP"], want["mAP"], atol=1e-6)
  np.testing.assert_allclose(got["mINP"], want["mINP"], atol=1e-6)
  np.testing.assert_array_equal(got["cmc"], want["cmc"])


def test_ties_at_zero_distance_go_to_the_lower_index():
  # Gallery items 0 (a distractor) and 1 (the match) are both identical to the query: the
  # distractor ranks first. The same with the match first.
  for distractor_first, expected_ap in ((True, 0.5), (False, 1.0)):
    ids = [1, 7] if distractor_first else [7, 1]
    got = metrics.evaluate([[2., 1.]], [[2., 1.], [2., 1.], [0., 0.]], [7], ids + [3], [0],
                              [1, 1, 1], normalize=False, max_rank=3)
    np.testing.assert_allclose(got["mAP"], expected_ap, atol=1e-7)


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("camera_rule", metrics.CAMERA_RULES)
@pytest.mark.parametrize("num_query,num_gallery,chunk_size", [
    (37, 50, 3),      # chunks that do not divide the queries, several steps per device
    (90, 260, None),  # chunk from the default memory budget
    (23, 700, 5),
])
def test_matches_reference_on_integer_features(camera_rule, num_query, num_gallery, chunk_size):
  data = integer_retrieval_set(num_query + num_gallery, num_query, num_gallery)
  got = metrics.evaluate(*data, camera_rule=camera_rule, max_rank=10, normalize=False,
                            chunk_size=chunk_size)
  assert_same_metrics(got, reference_evaluate(*data, camera_rule=camera_rule, max_rank=10,
                                              normalize=False))
  assert got["num_queries"] == num_query
  assert 0 < got["num_valid_queries"] < num_query   # some queries have no valid match


def test_matches_reference_on_normalized_features():
  rng = np.random.RandomState(3)
  ids = rng.randint(0, 15, 400)
  feats = rng.randn(15, 32)[ids] + 0.8 * rng.randn(400, 32)
  cams = rng.randint(0, 5, 400)
  data = (feats[:60], feats[60:], ids[:60], ids[60:], cams[:60], cams[60:])
  got = metrics.evaluate(*data, chunk_size=7)
  assert_same_metrics(got, reference_evaluate(*data), atol=1e-5)
  assert 0.1 < got["mAP"] < 0.99


def test_small_memory_budget_gives_the_same_numbers():
  data = integer_retrieval_set(5, 29, 120)
  tight = metrics.evaluate(*data, normalize=False, memory_budget_bytes=16 * 128 * 3)
  assert_same_metrics(tight, metrics.evaluate(*data, normalize=False), atol=0)


def test_positive_blocks_beyond_the_first():
  # Over 16 true matches per query: several positive blocks, some skipped by most chunks.
  data = integer_retrieval_set(11, 40, 600, num_ids=4, num_cams=3)
  got = metrics.evaluate(*data, normalize=False, chunk_size=4)
  assert_same_metrics(got, reference_evaluate(*data, normalize=False))


@pytest.mark.parametrize("per_device", [1, 30, 664, 665, 10_000, 123_457])
def test_chunks_fit_the_budget_with_little_padding(per_device):
  budget, gallery = 512 * 2**20, 50_176
  chunk = metrics._chunk_size(per_device, gallery, None, budget)
  steps = -(-per_device // chunk)
  assert 16 * gallery * chunk <= budget or chunk <= 8
  assert steps * chunk - per_device < max(0.03 * per_device, 8 * steps)


def test_one_and_eight_devices_agree():
  assert len(jax.devices()) == 8   # tests/conftest.py
  data = integer_retrieval_set(7, 45, 300)
  one = metrics.evaluate(*data, normalize=False, chunk_size=4, devices=jax.devices()[:1])
  eight = metrics.evaluate(*data, normalize=False, chunk_size=4)
  assert_same_metrics(one, eight, atol=0)


def test_no_valid_query_gives_nan():
  # Every gallery item sits in the query's camera.
  got = metrics.evaluate(np.eye(3), np.eye(3), [0, 1, 2], [0, 1, 2], [4, 4, 4], [4, 4, 4])
  assert got["num_valid_queries"] == 0
  assert np.isnan(got["mAP"]) and np.isnan(got["mINP"]) and np.isnan(got["cmc"]).all()
  assert len(got["cmc"]) == 50


# ---------------------------------------------------------------- truncated top-k mode


@pytest.mark.parametrize("top_k", [1, 7, 40])
def test_truncated_top_k_matches_reference_and_is_below_exact(top_k):
  data = integer_retrieval_set(13, 41, 150)
  got = metrics.evaluate(*data, normalize=False, top_k=top_k, chunk_size=6, max_rank=10)
  assert got["truncated_top_k"] == top_k
  assert_same_metrics(got, reference_evaluate(*data, normalize=False, top_k=top_k, max_rank=10))
  exact = metrics.evaluate(*data, normalize=False, chunk_size=6, max_rank=10)
  assert got["num_valid_queries"] == exact["num_valid_queries"]
  assert got["mAP"] < exact["mAP"] and got["mINP"] < exact["mINP"]
  assert np.all(got["cmc"] <= exact["cmc"])


def test_truncation_past_the_gallery_is_exact():
  data = integer_retrieval_set(17, 20, 64)
  whole = metrics.evaluate(*data, normalize=False, top_k=64)
  assert_same_metrics(whole, metrics.evaluate(*data, normalize=False), atol=0)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize("change,message", [
    (dict(query_feats=np.zeros(4)), "query_feats"),
    (dict(gallery_feats=np.zeros((6, 3))), "gallery_feats has dim 3"),
    (dict(query_ids=[1, 2]), "query_ids"),
    (dict(gallery_cams=np.zeros((6, 1))), "gallery_cams"),
    (dict(camera_rule="duke"), "camera_rule"),
    (dict(max_rank=0), "max_rank"),
    (dict(top_k=2.5), "top_k"),
    (dict(query_feats=np.full((4, 2), np.nan)), "query_feats holds non-finite"),
])
def test_bad_input_names_the_argument(change, message):
  args = dict(query_feats=np.zeros((4, 2)), gallery_feats=np.zeros((6, 2)),
              query_ids=[0, 1, 2, 3], gallery_ids=np.arange(6), query_cams=[0] * 4,
              gallery_cams=[1] * 6)
  with pytest.raises(ValueError, match=message):
    metrics.evaluate(**{**args, **change})


# ---------------------------------------------------------------- chance level


def enumerated_chance(num_kept, num_true, max_rank):
  """Textbook expectation over every equally likely set of ranks of the true matches."""
  aps, inps, cmcs = [], [], []
  for ranks in itertools.combinations(range(1, num_kept + 1), num_true):
    aps.append(np.mean([hit / rank for hit, rank in enumerate(ranks, start=1)]))
    inps.append(num_true / ranks[-1])
    cmcs.append([ranks[0] <= r for r in range(1, max_rank + 1)])
  return np.mean(aps), np.mean(inps), np.mean(cmcs, axis=0)


def test_chance_level_by_hand():
  # Query: identity 7, camera 0. Gallery items 0 and 2 share its identity, item 2 its camera.
  gallery = dict(gallery_ids=[7, 3, 7], gallery_cams=[1, 2, 0])
  # sysu and market drop item 2: N = 2, n = 1. E[AP] = E[INP] = (1 + 1/2)/2, R1 = 1/2.
  for rule in ("sysu", "market"):
    got = metrics.chance_level([7], query_cams=[0], camera_rule=rule, max_rank=3, **gallery)
    np.testing.assert_allclose([got["mAP"], got["mINP"]], [0.75, 0.75])
    np.testing.assert_allclose(got["cmc"], [0.5, 1, 1])
  # "none" keeps all: N = 3, n = 2. True matches at ranks {1,2}, {1,3}, {2,3}: AP 1, 5/6, 7/12
  # (mean 29/36, the formula's (H_3 + (3 − H_3)/2)/3); INP 1, 2/3, 2/3; R1 2/3.
  got = metrics.chance_level([7], query_cams=[0], camera_rule="none", max_rank=2, **gallery)
  np.testing.assert_allclose([got["mAP"], got["mINP"]], [29 / 36, 7 / 9])
  np.testing.assert_allclose(got["cmc"], [2 / 3, 1])
  assert got["num_valid_queries"] == 1


@pytest.mark.parametrize("num_kept", range(1, 8))
def test_chance_level_is_the_mean_over_every_ranking(num_kept):
  for num_true in range(1, num_kept + 1):
    # One query (id 1, camera 0); under sysu the camera-0 items (id 1 and others) are dropped.
    ids = [1] * num_true + [2] * (num_kept - num_true) + [1, 2]
    cams = [1] * num_kept + [0, 0]
    got = metrics.chance_level([1], ids, [0], cams, camera_rule="sysu", max_rank=9)
    ap, inp, cmc = enumerated_chance(num_kept, num_true, 9)
    np.testing.assert_allclose([got["mAP"], got["mINP"]], [ap, inp], rtol=1e-12)
    np.testing.assert_allclose(got["cmc"], cmc, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("camera_rule", metrics.CAMERA_RULES)
def test_chance_level_is_what_random_features_score_on_average(camera_rule):
  _, _, q_ids, g_ids, q_cams, g_cams = integer_retrieval_set(5, 40, 60)
  chance = metrics.chance_level(q_ids, g_ids, q_cams, g_cams, camera_rule=camera_rule,
                                max_rank=5)
  rng = np.random.default_rng(0)
  trials = []
  for _ in range(48):  # independent trials: the queries of one trial share a gallery
    m = metrics.evaluate(rng.normal(size=(40, 8)), rng.normal(size=(60, 8)), q_ids, g_ids,
                         q_cams, g_cams, camera_rule=camera_rule, max_rank=5)
    trials.append([m["mAP"], m["mINP"], *m["cmc"]])
  assert m["num_valid_queries"] == chance["num_valid_queries"] < 40
  trials = np.array(trials)
  sampled, error = trials.mean(axis=0), trials.std(axis=0, ddof=1) / np.sqrt(len(trials))
  expected = np.array([chance["mAP"], chance["mINP"], *chance["cmc"]])
  # The standard error of mAP is about 0.002 here: the naive E[AP] = n/N is some 30 of them off,
  # and the levels of the other camera rules over 10.
  assert np.all(np.abs(sampled - expected) <= 4 * error), (sampled, expected, error)


def test_chance_level_without_valid_queries_is_nan():
  got = metrics.chance_level([0, 1], [0, 1], [4, 4], [4, 4])
  assert got["num_valid_queries"] == 0 and np.isnan(got["mAP"]) and np.isnan(got["cmc"]).all()
