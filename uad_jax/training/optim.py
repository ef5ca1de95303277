"""The reference's optimizer: clipped, coupled-weight-decay SGD with an epoch-stepped schedule
(and AdamW on the same schedule, for the generic pretraining stage).

Per step, in torch's order: zero the frozen BNNeck bias's gradient (torch never sees it), clip the
global L2 norm, add ``weight_decay·param`` to the gradient of every trained parameter, SGD momentum
(``buf = momentum·buf + g``, no dampening, no Nesterov), then ``param -= lr_group·buf``. Parameters
whose name contains "bias" form a group with twice the learning rate.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

WEIGHT, BIAS, FROZEN = "weight", "bias", "frozen"
FROZEN_PARAMS = ("bnneck/bias",)  # BNNeck bias: 0 at init, never trained (spec §4)


def param_labels(params):
  """A tree like ``params`` labelling each leaf weight / bias / frozen."""
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: FROZEN if k in FROZEN_PARAMS else BIAS if "bias" in k else WEIGHT for k in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def epoch_lr(epoch, group_base, base, *, epochs, warmup_epochs, warmup_factor, min_lr_factor):
  """Learning rate of a group during epoch ``epoch`` (1-based), exactly as spec §6.

  Warm-up starts from ``warmup_factor·base`` and the cosine floor is ``min_lr_factor·base`` for
  both groups; only the peak ``group_base`` differs (base or 2·base).
  """
  epoch = jnp.clip(epoch, 1, epochs)
  start, lr_min = warmup_factor * base, min_lr_factor * base
  warm = start + epoch * (group_base - start) / warmup_epochs
  cosine = lr_min + 0.5 * (group_base - lr_min) * (1 + jnp.cos(math.pi * epoch / epochs))
  return jnp.where(epoch < warmup_epochs, warm, cosine)


def base_lr(optim_config, num_replicas: int) -> float:
  """Linear scaling: 0.008 per 192-image replica group (0.032 for the 4-replica reference)."""
  return optim_config.lr_per_replica * num_replicas


def epoch_of_step(steps_per_epoch: int | Sequence[int], epochs: int):
  """step (0-based) → epoch (1-based). Epochs may differ in length: the P×M×K sampler's step
  count depends on the order identities are drawn in, so it is planned per epoch."""
  if isinstance(steps_per_epoch, int):
    steps_per_epoch = (steps_per_epoch,) * epochs
  if not steps_per_epoch or min(steps_per_epoch) < 1:
    raise ValueError(f"every epoch needs ≥ 1 step, got steps_per_epoch={steps_per_epoch}")
  ends = jnp.asarray(np.cumsum(steps_per_epoch), jnp.int32)
  return lambda step: jnp.searchsorted(ends, step, side="right") + 1


def group_schedules(optim_config, num_replicas: int, steps_per_epoch: int | Sequence[int]):
  """{label: step → lr}, stepped once per epoch like the reference's scheduler."""
  epoch_of = epoch_of_step(steps_per_epoch, optim_config.epochs)
  base = base_lr(optim_config, num_replicas)
  kw = dict(epochs=optim_config.epochs, warmup_epochs=optim_config.warmup_epochs,
            warmup_factor=optim_config.warmup_factor, min_lr_factor=optim_config.min_lr_factor)

  def schedule(group_base):
    return lambda step: epoch_lr(epoch_of(step), group_base, base, **kw)

  return {WEIGHT: schedule(base), BIAS: schedule(base * optim_config.bias_lr_factor)}


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(optim_config, params, num_replicas: int,
                   steps_per_epoch: int | Sequence[int]) -> optax.GradientTransformation:
  """``optim_config.name``: "sgd", the reference's (coupled decay before momentum), or "adamw"
  (decoupled decay after Adam's scaling; for the generic pretraining stage). Both freeze the
  BNNeck bias, clip like torch and follow the epoch-stepped schedule per group."""
  if optim_config.name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={optim_config.name!r}; expected one of {OPTIMIZERS}")
  labels = param_labels(params)
  frozen = jax.tree.map(lambda label: label == FROZEN, labels)
  trained = jax.tree.map(lambda f: not f, frozen)
  schedules = group_schedules(optim_config, num_replicas, steps_per_epoch)
  decay = optax.masked(optax.add_decayed_weights(optim_config.weight_decay), trained)
  if optim_config.name == "sgd":
    direction = [decay, optax.trace(decay=optim_config.momentum, nesterov=False)]
  else:
    direction = [optax.scale_by_adam(), decay]
  return optax.chain(
      optax.masked(optax.set_to_zero(), frozen),
      clip_by_global_norm_torch(optim_config.grad_clip_norm),
      *direction,
      optax.multi_transform({
          WEIGHT: optax.scale_by_schedule(lambda s: -schedules[WEIGHT](s)),
          BIAS: optax.scale_by_schedule(lambda s: -schedules[BIAS](s)),
          FROZEN: optax.set_to_zero(),
      }, labels),
  )
