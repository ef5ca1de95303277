"""The UAD losses as pure functions of one replica batch.

Batch layout (spec §2): rows are modality-major, ``[RGB block; NIR block; TIR block]``, each block
holding P·K rows in which rows ``p·K … p·K+K−1`` belong to identity p. All heads run in fp32 with
full-precision dots (TPU defaults to bf16 passes otherwise), whatever the backbone's compute dtype.
"""
import jax
import jax.numpy as jnp

from uad_jax.numerics import NORMALIZE_EPS, at_least_f32, l2_normalize

_HI = jax.lax.Precision.HIGHEST


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Mean softmax cross-entropy over the batch. The reference uses no label smoothing; with
  ``label_smoothing`` = ε the target is (1 − ε)·one-hot + ε/C (generic pretraining uses it)."""
  logits = at_least_f32(logits)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  loss = log_z - true_logit
  if label_smoothing:
    loss = (1 - label_smoothing) * loss + label_smoothing * (log_z - jnp.mean(logits, axis=-1))
  return jnp.mean(loss)


def pairwise_distances(feats: jax.Array) -> jax.Array:
  """Euclidean distances sqrt(max(|a|²+|b|²−2a·b, 1e-12)), the reference's expansion."""
  f = at_least_f32(feats)
  sq = jnp.sum(jnp.square(f), axis=1)
  gram = jnp.dot(f, f.T, precision=_HI)
  return jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 1e-12))


def _masked_softmax_weights(dist: jax.Array, mask: jax.Array) -> jax.Array:
  # The reference's stabiliser subtracts the row max of the *masked product* dist·mask, and adds
  # 1e-6 to the denominator; both change the numbers slightly and are kept on purpose.
  max_v = jnp.max(dist * mask, axis=1, keepdims=True)
  e = jnp.exp(dist - max_v) * mask
  return e / (jnp.sum(e, axis=1, keepdims=True) + 1e-6)


def wrt(feats: jax.Array, labels: jax.Array) -> jax.Array:
  """Weighted regularised triplet loss on raw (pre-BN) features.

  Positives include the anchor itself. The soft margin is a stable softplus: the reference's
  log(1+exp(·)) overflows to inf in fp32 once d⁺ − d⁻ exceeds ~88, this stays finite.
  """
  dist = pairwise_distances(feats)
  is_pos = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  is_neg = 1.0 - is_pos
  dist_ap = dist * is_pos
  dist_an = dist * is_neg
  furthest_positive = jnp.sum(dist_ap * _masked_softmax_weights(dist_ap, is_pos), axis=1)
  closest_negative = jnp.sum(dist_an * _masked_softmax_weights(-dist_an, is_neg), axis=1)
  return jnp.mean(jax.nn.softplus(furthest_positive - closest_negative))


def _modality_identity_view(feats: jax.Array, num_modalities: int, k: int) -> jax.Array:
  """[M·P·K, D] → [M, P, K, D] following the batch layout."""
  n, d = feats.shape
  if n % (num_modalities * k):
    raise ValueError(
        f"batch of {n} rows is not num_modalities·P·k with num_modalities={num_modalities}, k={k}")
  return feats.reshape(num_modalities, n // (num_modalities * k), k, d)


def proca(feats: jax.Array, num_modalities: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Progressive centre alignment: pulls each modality centre to its identity anchor.

  Returns ``(loss, centers)``; ``centers`` are the P identity anchors g_p (unit norm, without
  gradient), in batch identity order, which feed GPD and the prototype memory.
  """
  f = _modality_identity_view(l2_normalize(feats), num_modalities, k)
  modality_centers = l2_normalize(jnp.mean(f, axis=2))  # [M, P, D]
  anchors = jax.lax.stop_gradient(l2_normalize(jnp.mean(modality_centers, axis=0)))  # [P, D]
  sq_dist = jnp.sum(jnp.square(modality_centers - anchors[None]), axis=-1)  # [M, P]
  loss = jnp.mean(jnp.sum(sq_dist, axis=0)) / num_modalities
  return loss, anchors


def batch_identity_ids(labels: jax.Array, num_modalities: int, k: int) -> jax.Array:
  """The P identity labels of a batch in the order of ``proca``'s anchors."""
  return _modality_identity_view(labels[:, None], num_modalities, k)[0, :, 0, 0]


def gpd(feats: jax.Array, labels: jax.Array, prototypes: jax.Array, center_ids: jax.Array,
        centers: jax.Array, tau: float = 0.03) -> jax.Array:
  """Global prototype discrimination: cross-entropy against every identity prototype.

  The memory is used without gradient. A batch identity whose prototype row is still (near) zero
  is represented by its current anchor instead; other never-seen rows keep logit 0 and stay in the
  softmax denominator. The memory itself is never copied or written: rows are normalised through
  their norms and only the batch identities' columns are patched, so this stays cheap for 10^6
  identities sharded over devices.
  """
  protos = at_least_f32(jax.lax.stop_gradient(prototypes))
  centers = at_least_f32(jax.lax.stop_gradient(centers))
  f = l2_normalize(feats)
  row_norms = jnp.sqrt(jnp.sum(jnp.square(protos), axis=1))
  logits = jnp.dot(f, protos.T, precision=_HI) / jnp.maximum(row_norms, NORMALIZE_EPS)
  use_center = row_norms[center_ids] < 1e-6
  center_logits = jnp.dot(f, l2_normalize(centers).T, precision=_HI)
  patched = jnp.where(use_center[None, :], center_logits, logits[:, center_ids])
  logits = logits.at[:, center_ids].set(patched)
  return cross_entropy(logits / tau, labels)
