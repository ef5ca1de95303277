"""The UAD train step: one pure function of (state, batch), jitted once with explicit shardings.

The global batch is R replica groups of M·P·K images, group-major; inside a group rows follow the
spec's layout (modality-major, identity-contiguous). It holds either augmented float32 "images"
or uint8 "pixels" with each image's augmentation parameters ("augment"), which the step applies
first (`data.device_augment`). Every loss term and the BNNeck statistics are computed per group
and averaged, as the reference's R GPUs did without SyncBN, so the numbers do not depend on how
many devices run the step. The prototype memory is updated once, from the anchors of all groups.
"""
import jax
import jax.numpy as jnp
import optax

from uad_jax import sharding
from uad_jax.data import device_augment
from uad_jax.training import losses, optim, prototypes
from uad_jax.training.train_state import StepConfig, TrainState


def group_objective(feats, logits, labels, memory, cfg: StepConfig):
  """Loss terms of one replica group; also its P anchors and their identity labels."""
  proca_loss, anchors = losses.proca(feats, cfg.modalities, cfg.instances)
  ids = losses.batch_identity_ids(labels, cfg.modalities, cfg.instances)
  terms = {"ce": losses.cross_entropy(logits, labels, cfg.label_smoothing),
           "wrt": losses.wrt(feats, labels),
           "proca": proca_loss}
  if "gpd" in cfg.terms:
    terms["gpd"] = losses.gpd(feats, labels, memory, ids, anchors, cfg.gpd_tau)
  return terms, anchors, ids


def total_loss(terms, cfg: StepConfig):
  total = terms["ce"]
  if "wrt" in cfg.terms:
    total += terms["wrt"]
  if "proca" in cfg.terms:
    total += cfg.proca_weight * terms["proca"]
  if "gpd" in cfg.terms:
    total += cfg.gpd_weight * terms["gpd"]
  return total


def replica_objective(feats, logits, labels, memory, cfg: StepConfig):
  """Mean over the R groups of each term; the anchors and ids of all groups, flattened."""
  r = cfg.num_replicas
  split = lambda x: x.reshape(r, x.shape[0] // r, *x.shape[1:])
  terms, anchors, ids = jax.vmap(group_objective, in_axes=(0, 0, 0, None, None))(
      split(feats), split(logits), split(labels), memory, cfg)
  terms = {k: jnp.mean(v) for k, v in terms.items()}
  terms["total"] = total_loss(terms, cfg)
  return terms, anchors.reshape(-1, anchors.shape[-1]), ids.reshape(-1)


# What the step reads of a batch: "labels" and either form of the images.
INPUT_KEYS = ("images", "pixels", "raw_sizes", "augment", "labels")


def batch_images(batch):
  """The model's float32 input: the batch's "images", or its "pixels" augmented here (resized
  first from their "raw_sizes" where the batch has them)."""
  if "images" in batch:
    return batch["images"]
  return device_augment.augment_batch(batch["pixels"], batch["augment"], batch.get("raw_sizes"))


def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
  cfg = state.step_config
  rng, dropout_rng = jax.random.split(state.rng)
  labels = batch["labels"]
  images = batch_images(batch)

  def loss_fn(params):
    (logits, feats), mutated = state.model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    terms, anchors, ids = replica_objective(feats, logits, labels, state.prototypes, cfg)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return terms["total"], (terms, anchors, ids, mutated["batch_stats"], accuracy)

  (_, (terms, anchors, ids, batch_stats, accuracy)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  labels_tree = optim.param_labels(state.params)
  trained_grads = jax.tree.map(lambda g, l: g if l != optim.FROZEN else jnp.zeros_like(g),
                               grads, labels_tree)
  grad_norm = optax.global_norm(trained_grads)
  # A non-finite step changes nothing but the step counter; the metrics flag it. The counter
  # still advances because it is the data position and the epoch of the epoch-stepped schedule:
  # a skipped step is one batch consumed, as when torch's GradScaler skips an update, so the
  # checkpoint's step, the iterator and the learning rate never drift apart. The gate is applied
  # inside each update, never as a select between two whole states, so a 10^6-identity
  # classifier, its momentum and the memory are not held twice.
  finite = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
  keep_old_unless_finite = lambda new, old: jnp.where(finite, new, old)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=jax.tree.map(lambda p, u: p + jnp.where(finite, u, 0).astype(p.dtype),
                          state.params, updates),
      batch_stats=jax.tree.map(keep_old_unless_finite, batch_stats, state.batch_stats),
      opt_state=jax.tree.map(keep_old_unless_finite, opt_state, state.opt_state),
      prototypes=prototypes.update(state.prototypes, ids, anchors, cfg.prototype_momentum,
                                   enabled=finite),
      rng=keep_old_unless_finite(rng, state.rng))
  metrics = {f"loss/{k}": v for k, v in terms.items()}
  metrics.update({"id_accuracy": accuracy, "grad_norm": grad_norm,
                  "nonfinite": jnp.logical_not(finite).astype(jnp.int32)})
  metrics.update({f"lr/{name}": fn(state.step) for name, fn in cfg.lr_schedules})
  return new_state, metrics


def jit_train_step(state_shardings, mesh):
  """``train_step`` compiled for these shardings, donating the old state's buffers.

  Call it inside ``sharding.context(mesh, rules)`` so activation constraints resolve. The batch
  is any dict of arrays with the batch axis first (either form ``batch_images`` takes, with or
  without the pipeline's other keys): one sharding over the data axis serves all of its leaves.
  """
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
