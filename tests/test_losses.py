"""The losses against independent NumPy statements of the spec's formulas (spec §5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uad_jax.training import losses, prototypes

M, P, K, D = 3, 4, 2, 16


def _batch(scale, seed=0, num_classes=10):
  """A P×M×K batch in the spec's layout: modality-major blocks, identity-contiguous rows."""
  rng = np.random.RandomState(seed)
  ids = rng.choice(num_classes, P, replace=False)
  labels = np.tile(np.repeat(ids, K), M)
  centres = rng.randn(num_classes, D)
  feats = scale * (centres[labels] + 0.7 * rng.randn(M * P * K, D))
  return feats, labels, ids


# ---------------------------------------------------------------- independent NumPy statements

def np_l2n(x):
  return x / max(np.linalg.norm(x), 1e-12)


def np_wrt(f, y):
  n = len(y)
  dist = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      dist[i, j] = np.sqrt(max(f[i] @ f[i] + f[j] @ f[j] - 2 * f[i] @ f[j], 1e-12))
  total = 0.0
  for i in range(n):
    pos = y == y[i]
    neg = ~pos
    a = max(dist[i, j] * pos[j] for j in range(n))
    b = max(-dist[i, j] * neg[j] for j in range(n))
    ep = np.array([np.exp(dist[i, j] * pos[j] - a) * pos[j] for j in range(n)])
    en = np.array([np.exp(-dist[i, j] * neg[j] - b) * neg[j] for j in range(n)])
    d_pos = np.sum(ep / (ep.sum() + 1e-6) * dist[i] * pos)
    d_neg = np.sum(en / (en.sum() + 1e-6) * dist[i] * neg)
    x = d_pos - d_neg
    total += max(x, 0) + np.log1p(np.exp(-abs(x)))   # softplus
  return total / n


def np_proca(f, m, k):
  p = len(f) // (m * k)
  centers = np.zeros((m, p, f.shape[1]))
  for mi in range(m):
    for pi in range(p):
      rows = [np_l2n(f[mi * p * k + pi * k + ki]) for ki in range(k)]
      centers[mi, pi] = np_l2n(np.mean(rows, axis=0))
  anchors = np.stack([np_l2n(centers[:, pi].mean(axis=0)) for pi in range(p)])
  loss = sum(np.sum((centers[mi, pi] - anchors[pi])**2) for mi in range(m) for pi in range(p))
  return loss / p / m, anchors


def np_ce(logits, y):
  out = 0.0
  for row, t in zip(logits, y):
    mx = row.max()
    out += mx + np.log(np.sum(np.exp(row - mx))) - row[t]
  return out / len(y)


def np_gpd(f, y, protos, ids, centers, tau):
  mem = protos.astype(np.float64).copy()
  for pid, c in zip(ids, centers):
    if np.linalg.norm(mem[pid]) < 1e-6:
      mem[pid] = c
  mem = np.stack([np_l2n(r) for r in mem])
  fn = np.stack([np_l2n(r) for r in f])
  return np_ce(fn @ mem.T / tau, y)


def np_update(protos, ids, centers, momentum):
  out = protos.astype(np.float64).copy()
  for pid in set(ids.tolist()):
    cbar = np_l2n(np.mean([c for i, c in zip(ids, centers) if i == pid], axis=0))
    out[pid] = np_l2n((1 - momentum) * out[pid] + momentum * cbar)
  return out


# ---------------------------------------------------------------------------------- values

@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_wrt_matches_numpy(scale):
  f, y, _ = _batch(scale)
  got = losses.wrt(jnp.asarray(f, jnp.float32), jnp.asarray(y))
  np.testing.assert_allclose(got, np_wrt(f, y), rtol=2e-4, atol=2e-5)


def test_wrt_stays_finite_where_the_reference_soft_margin_overflows():
  # Two identities: positives 200 apart, negatives close, so d⁺ − d⁻ ≈ 200 > 88.
  f = np.zeros((4, 2), np.float32)
  f[0, 0], f[1, 0] = 0.0, 200.0
  f[2, 0], f[3, 0] = 1.0, 199.0
  y = np.array([0, 0, 1, 1])
  with np.errstate(over="ignore"):
    reference_margin = np.log(np.float32(1) + np.exp(np.float32(199.0)))
  assert np.isinf(reference_margin)
  got = float(losses.wrt(jnp.asarray(f), jnp.asarray(y)))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, np_wrt(f.astype(np.float64), y), rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_proca_matches_numpy(scale):
  f, _, _ = _batch(scale)
  loss, anchors = losses.proca(jnp.asarray(f, jnp.float32), M, K)
  want_loss, want_anchors = np_proca(f, M, K)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(anchors, want_anchors, atol=1e-5)


def test_batch_identity_ids_follow_the_anchor_order():
  _, y, ids = _batch(1.0)
  np.testing.assert_array_equal(losses.batch_identity_ids(jnp.asarray(y), M, K), ids)


def test_proca_rejects_a_batch_that_is_not_m_p_k():
  with pytest.raises(ValueError, match="num_modalities"):
    losses.proca(jnp.zeros((10, 4)), 3, 4)


@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_gpd_matches_numpy_with_zero_row_fallback(scale):
  f, y, ids = _batch(scale)
  rng = np.random.RandomState(1)
  protos = rng.randn(10, D)
  protos[ids[0]] = 0.0            # a batch id never seen: replaced by its anchor
  protos[ids[1]] = 1e-8           # below the 1e-6 norm threshold: replaced too
  unseen = [c for c in range(10) if c not in ids][0]
  protos[unseen] = 0.0            # a non-batch unseen id: logit 0, stays in the denominator
  _, centers = np_proca(f, M, K)
  got = losses.gpd(jnp.asarray(f, jnp.float32), jnp.asarray(y), jnp.asarray(protos, jnp.float32),
                   jnp.asarray(ids), jnp.asarray(centers, jnp.float32), tau=0.03)
  np.testing.assert_allclose(got, np_gpd(f, y, protos, ids, centers, 0.03), rtol=2e-4)


def test_cross_entropy_matches_numpy():
  rng = np.random.RandomState(3)
  logits, y = 10 * rng.randn(12, 7), rng.randint(0, 7, 12)
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits, jnp.float32),
                                                  jnp.asarray(y)), np_ce(logits, y), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_label_smoothed_cross_entropy_against_the_smoothed_target(eps):
  rng = np.random.RandomState(4)
  logits, y = 5 * rng.randn(9, 6), rng.randint(0, 6, 9)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  target = (1 - eps) * np.eye(6)[y] + eps / 6
  want = -np.mean(np.sum(target * log_p, axis=1))
  got = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(y), eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_prototype_update_averages_duplicates_and_touches_present_rows_only():
  rng = np.random.RandomState(2)
  protos = rng.randn(12, D).astype(np.float32)
  protos[5] = 0.0                                     # a zero row becomes c̄
  ids = np.array([3, 5, 7, 3, 9, 5])                  # 3 and 5 come from two replica groups
  centers = np.stack([np_l2n(r) for r in rng.randn(6, D)]).astype(np.float32)
  got = np.asarray(prototypes.update(jnp.asarray(protos), jnp.asarray(ids),
                                     jnp.asarray(centers), momentum=0.2))
  want = np_update(protos, ids, centers, 0.2)
  np.testing.assert_allclose(got, want, atol=1e-6)
  untouched = [c for c in range(12) if c not in ids]
  np.testing.assert_array_equal(got[untouched], protos[untouched])
  np.testing.assert_allclose(got[5], np_l2n(centers[[1, 5]].mean(axis=0)), atol=1e-6)
  unchanged = prototypes.update(jnp.asarray(protos), jnp.asarray(ids), jnp.asarray(centers),
                                momentum=0.2, enabled=jnp.asarray(False))
  np.testing.assert_array_equal(unchanged, protos)


# ------------------------------------------------------------------------------- gradients

def _finite_difference_grad(fn, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    step = np.zeros_like(x)
    step[idx] = eps
    g[idx] = (fn(x + step) - fn(x - step)) / (2 * eps)
  return g


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_wrt_gradient_matches_finite_differences(x64, scale):
  f, y, _ = _batch(scale)
  got = jax.grad(losses.wrt)(jnp.asarray(f), jnp.asarray(y))
  want = _finite_difference_grad(lambda x: np_wrt(x, y), f)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_proca_gradient_treats_the_anchor_as_constant(x64, scale):
  f, _, _ = _batch(scale)
  _, anchors0 = np_proca(f, M, K)

  def loss_with_frozen_anchor(x):
    p = len(x) // (M * K)
    total = 0.0
    for mi in range(M):
      for pi in range(p):
        rows = [np_l2n(x[mi * p * K + pi * K + ki]) for ki in range(K)]
        total += np.sum((np_l2n(np.mean(rows, axis=0)) - anchors0[pi])**2)
    return total / p / M

  got = jax.grad(lambda x: losses.proca(x, M, K)[0])(jnp.asarray(f))
  want = _finite_difference_grad(loss_with_frozen_anchor, f)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  # The anchors carry no gradient at all.
  anchor_grad = jax.grad(lambda x: jnp.sum(losses.proca(x, M, K)[1]))(jnp.asarray(f))
  np.testing.assert_array_equal(anchor_grad, 0.0)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_gpd_gradient_flows_to_features_only(x64, scale):
  f, y, ids = _batch(scale)
  protos = np.random.RandomState(1).randn(10, D)
  protos[ids[0]] = 0.0
  _, centers = np_proca(f, M, K)
  args = (jnp.asarray(f), jnp.asarray(y), jnp.asarray(protos), jnp.asarray(ids),
          jnp.asarray(centers))
  g_f, g_protos, g_centers = jax.grad(losses.gpd, argnums=(0, 2, 4))(*args)
  want = _finite_difference_grad(lambda x: np_gpd(x, y, protos, ids, centers, 0.03), f)
  np.testing.assert_allclose(g_f, want, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(g_protos, 0.0)
  np.testing.assert_array_equal(g_centers, 0.0)
