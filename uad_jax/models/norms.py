"""Normalisation layers with torch's conventions: BatchNorm per replica group, InstanceNorm.

The reference trained one replica batch per GPU without SyncBN, so every BatchNorm (the BNNeck and
the ICS stem's) computes its statistics over each replica group's rows alone. Both follow torch:
normalise with the biased batch variance, track the unbiased one, momentum 0.1 on the new value,
eps 1e-5. Parameters and statistics are fp32, as are the outputs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


def _affine(module, d, axis_name):
  """torch's affine weight (initially 1) and bias (0), named scale and bias as Flax names them."""
  ones = nn.with_logical_partitioning(nn.initializers.ones, (axis_name,))
  zeros = nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,))
  return module.param("scale", ones, (d,)), module.param("bias", zeros, (d,))


class GroupBatchNorm(nn.Module):
  """BatchNorm over every axis but the last (channels), statistics per replica group.

  The leading (batch) axis holds ``num_groups`` contiguous replica batches; in training each is
  normalised by its own statistics (over its rows and, for images, every position), and the
  running statistics move by the average of the groups' statistics. Evaluation uses the running
  statistics, so applying in eval mode needs the ``batch_stats`` collection.
  """
  num_groups: int = 1
  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: str = "embed"    # logical name of the channel axis of scale and bias

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    scale, bias = _affine(self, d, self.axis_name)
    if not (train or self.is_initializing() or self.has_variable("batch_stats", "mean")):
      raise ValueError(
          f"BatchNorm {'/'.join(self.scope.path)} in eval mode normalises with its running "
          "statistics: apply the model with {'params': ..., 'batch_stats': ...}")
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (d,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (d,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      if x.shape[0] % self.num_groups:
        raise ValueError(f"BatchNorm {'/'.join(self.scope.path)}: a batch of {x.shape[0]} does "
                         f"not split into {self.num_groups} replica groups (bn_groups)")
      groups = x.reshape(self.num_groups, -1, d)   # group-major rows: each group contiguous
      n = groups.shape[1]
      mean = jnp.mean(groups, axis=1, keepdims=True)
      var = jnp.mean(jnp.square(groups - mean), axis=1, keepdims=True)
      y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean, axis=(0, 1))
        ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(var, axis=(0, 1)) * n / max(n - 1, 1)
    else:
      y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    return y * scale + bias


class InstanceNorm(nn.Module):
  """torch's InstanceNorm2d(affine=True): each image's channels normalised over their positions
  (biased variance, eps 1e-5), in training and evaluation alike; no running statistics."""
  epsilon: float = 1e-5
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale, bias = _affine(self, x.shape[-1], self.axis_name)
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
