"""The P×M×K sampler against spec §2, on random per-record metadata."""
import collections

import numpy as np
import pytest

from uad_jax.data import sampler

M = 3


def _metadata(counts):
  """labels, modalities of records from counts[identity][modality]; records interleaved."""
  labels, modalities = [], []
  for label, per_modality in enumerate(counts):
    for m, n in enumerate(per_modality):
      labels += [label] * n
      modalities += [m] * n
  order = np.random.default_rng(0).permutation(len(labels))  # records in no particular order
  return np.array(labels)[order], np.array(modalities)[order]


def _random_counts(num_ids, seed, low=1, high=15):
  return np.random.default_rng(seed).integers(low, high, size=(num_ids, M))


def _sampler(counts, p, k, r=1, seed=7, **kwargs):
  labels, modalities = _metadata(counts)
  shape = sampler.BatchShape(identities=p, instances=k, modalities=M, replicas=r)
  return sampler.PMKSampler(labels, modalities, shape, seed=seed, **kwargs), labels, modalities


def _need(per_modality, k):
  most = max(max(n, k) for n in per_modality)
  return most - most % k


@pytest.mark.parametrize("p,k", [(4, 2), (3, 4), (1, 3)])
def test_batch_layout_is_modality_major_and_identity_contiguous(p, k):
  counts = _random_counts(12, seed=p * 10 + k)
  s, labels, modalities = _sampler(counts, p, k)
  batches = s.epoch_batches(0)
  assert batches.shape[1] == M * p * k and len(batches) > 0
  for batch in batches:
    rows_labels = labels[batch].reshape(M, p, k)
    rows_modalities = modalities[batch].reshape(M, p, k)
    for m in range(M):
      assert np.all(rows_modalities[m] == m)
    # Every modality block holds the same P identities in the same order, K rows each.
    assert np.all(rows_labels == rows_labels[:1])
    assert np.all(rows_labels[0] == rows_labels[0, :, :1])
    assert len(set(rows_labels[0, :, 0].tolist())) == p
    np.testing.assert_array_equal(sampler.batch_labels(labels, batch),
                                  np.tile(np.repeat(rows_labels[0, :, 0], k), M))
    assert sampler.batch_labels(labels, batch).dtype == np.int32


def test_tiling_and_sampling_counts_follow_the_spec():
  k = 4
  # need = 8 for every identity: 11 rounds down to 8; 3 and 4 tile; 1 tiles 8 times.
  counts = [[11, 3, 4], [1, 8, 2], [5, 5, 9]]
  s, labels, modalities = _sampler(counts, p=1, k=k)  # P=1 uses every group of every identity
  assert s.need.tolist() == [8, 8, 8]
  used = collections.Counter(s.epoch_batches(0).ravel().tolist())
  for label, per_modality in enumerate(counts):
    need = _need(per_modality, k)
    for m, n in enumerate(per_modality):
      records = np.flatnonzero((labels == label) & (modalities == m))
      times = np.array([used[r] for r in records])
      assert times.sum() == need
      if n >= need:  # without replacement
        assert set(times.tolist()) <= {0, 1}
      else:  # every record ⌊need/n⌋ times plus r distinct extras
        repeats, extra = divmod(need, n)
        assert np.sum(times == repeats + 1) == extra
        assert np.sum(times == repeats) == n - extra


def test_every_image_is_used_once_when_counts_equal_need():
  k, p = 2, 5
  counts = np.full((p, M), 6)  # n_m = need = 6 everywhere; P = all identities: none left over
  s, labels, _ = _sampler(counts, p=p, k=k)
  batches = s.epoch_batches(3)
  assert len(batches) == 6 // k
  assert sorted(batches.ravel().tolist()) == list(range(len(labels)))


def test_identities_that_leave_the_pool_used_all_their_images():
  k, p = 2, 3
  counts = np.repeat(np.random.default_rng(1).integers(1, 6, size=(20, 1)) * k, M, axis=1)
  s, labels, _ = _sampler(counts, p=p, k=k)
  used = collections.Counter(s.epoch_batches(0).ravel().tolist())
  per_identity = collections.Counter(labels[list(used.elements())].tolist())
  finished = [label for label in range(len(counts)) if per_identity[label] == M * counts[label, 0]]
  assert len(finished) > len(counts) - p  # the epoch stops with fewer than P identities left
  for label in finished:
    assert all(used[r] == 1 for r in np.flatnonzero(labels == label))


def test_epoch_length_ends_when_fewer_than_p_identities_remain():
  k, p = 2, 4
  counts = _random_counts(15, seed=3)
  s, labels, _ = _sampler(counts, p=p, k=k)
  for epoch in range(3):
    batches = s.epoch_batches(epoch)
    groups_used = collections.Counter(labels[batches[:, :p * k:k]].ravel().tolist())
    groups_left = [_need(c, k) // k - groups_used[label] for label, c in enumerate(counts)]
    assert min(groups_left) >= 0
    assert sum(g > 0 for g in groups_left) < p
    total_groups = sum(_need(c, k) // k for c in counts)
    assert len(batches) == (total_groups - sum(groups_left)) // p


@pytest.mark.parametrize("r", [1, 2, 3])
def test_steps_are_r_consecutive_batches_group_major(r):
  counts = _random_counts(10, seed=4)
  s, _, _ = _sampler(counts, p=2, k=2, r=r)
  tails = 0
  for epoch in range(6):
    batches = s.epoch_batches(epoch)
    steps = s.epoch_steps(epoch)
    # ⌊batches / R⌋ steps: an incomplete last step is dropped, never padded or wrapped.
    assert len(steps) == len(batches) // r == s.steps_in_epoch(epoch)
    assert steps.shape[1] == r * s.shape.batch_rows == s.shape.step_rows
    np.testing.assert_array_equal(steps.reshape(-1, s.shape.batch_rows),
                                  batches[:len(steps) * r])
    tails += len(batches) % r != 0
  assert r == 1 or tails > 0, "the data must give an epoch with a dropped tail"
  assert s.steps_per_epoch(6) == tuple(len(s.epoch_batches(e)) // r for e in range(6))


def test_deterministic_given_seed_and_epoch():
  counts = _random_counts(10, seed=5)
  first, _, _ = _sampler(counts, p=3, k=2, seed=11)
  again, _, _ = _sampler(counts, p=3, k=2, seed=11)
  other_seed, _, _ = _sampler(counts, p=3, k=2, seed=12)
  np.testing.assert_array_equal(first.epoch_batches(2), again.epoch_batches(2))
  np.testing.assert_array_equal(first.epoch_batches(2), first.epoch_batches(2))
  assert not np.array_equal(first.epoch_batches(2)[:3], first.epoch_batches(3)[:3])
  assert not np.array_equal(first.epoch_batches(2)[:3], other_seed.epoch_batches(2)[:3])


def test_identities_are_drawn_uniformly():
  counts = np.full((8, M), 4)
  s, labels, _ = _sampler(counts, p=2, k=2)
  first_batch_ids = np.concatenate(
      [np.unique(labels[s.epoch_batches(e)[0]]) for e in range(400)])
  frequency = np.bincount(first_batch_ids, minlength=8) / 400
  np.testing.assert_allclose(frequency, 2 / 8, atol=0.08)


def test_missing_modality_is_an_error_naming_the_identities():
  counts = _random_counts(6, seed=6, low=2)
  counts[2, 1] = 0  # label 2 has no NIR
  counts[4, 2] = 0  # label 4 has no TIR
  labels, modalities = _metadata(counts)
  person_ids = labels + 1000
  with pytest.raises(ValueError, match="missing_modality") as error:
    sampler.PMKSampler(labels, modalities, sampler.BatchShape(2, 2), seed=0,
                       person_ids=person_ids)
  message = str(error.value)
  assert "label 2 (person id 1002): no NIR" in message
  assert "label 4 (person id 1004): no TIR" in message
  assert "label 0" not in message


def test_missing_modality_drop_policy_warns_and_leaves_them_out():
  counts = _random_counts(6, seed=6, low=2)
  counts[2, 1] = 0
  with pytest.warns(UserWarning, match="label 2: no NIR"):
    s, labels, _ = _sampler(counts, p=2, k=2, missing_modality="drop")
  assert s.identities.tolist() == [0, 1, 3, 4, 5]
  assert 2 not in labels[s.epoch_batches(0)]


def test_bad_settings_are_clear_errors():
  counts = _random_counts(3, seed=8)
  with pytest.raises(ValueError, match="only 3 usable train identities.*P=4"):
    _sampler(counts, p=4, k=2)
  with pytest.raises(ValueError, match="missing_modality='skip'"):
    _sampler(counts, p=2, k=2, missing_modality="skip")
  with pytest.raises(ValueError, match="BatchShape.instances"):
    sampler.BatchShape(identities=2, instances=0)
  labels, modalities = _metadata(counts)
  with pytest.raises(ValueError, match="modality 3.*M=3"):
    sampler.PMKSampler(labels, np.where(modalities == 2, 3, modalities),
                       sampler.BatchShape(2, 2), seed=0)
  with pytest.raises(ValueError, match="same length"):
    sampler.PMKSampler(labels[:-1], modalities, sampler.BatchShape(2, 2), seed=0)
