"""The one explicit training state, created already sharded.

Shapes come before arrays: the state's abstract shapes give its shardings (from the logical axis
rules), and a jitted init with those ``out_shardings`` writes every array straight into its shards,
so nothing full-size is materialised on one device (the 10^6-identity classifier and memory
included). The random draws are fused into those writes (``fused_threefry``), so creating the
state needs almost no memory beyond the state itself.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax import traverse_util
from jax.sharding import PartitionSpec

from uad_jax import sharding
from uad_jax.models import precision, pretrained, reid_model
from uad_jax.training import fused_threefry, optim

# The terms each loss adds up: the paper's ablation rows, and "ce" for generic pretraining.
LOSS_TERMS = {"ce": ("ce",), "base": ("ce", "wrt"), "base+proca": ("ce", "wrt", "proca"),
              "base+gpd": ("ce", "wrt", "gpd"), "uad": ("ce", "wrt", "proca", "gpd")}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static settings of a train step (hashable: part of the jitted step's cache key)."""
  loss: str
  num_replicas: int
  modalities: int
  instances: int
  proca_weight: float
  gpd_weight: float
  gpd_tau: float
  prototype_momentum: float
  label_smoothing: float
  lr_schedules: tuple[tuple[str, Callable], ...]

  @property
  def terms(self) -> tuple[str, ...]:
    return LOSS_TERMS[self.loss]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  prototypes: jax.Array          # [num_ids, dim] fp32 GPD memory; zero rows = never seen
  rng: jax.Array
  model: reid_model.UADNet = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  step_config: StepConfig = struct.field(pytree_node=False)


def build_model(config, num_classes: int) -> reid_model.UADNet:
  return reid_model.UADNet(
      num_classes=num_classes, variant=config.model.variant,
      image_size=tuple(config.model.image_size),
      stochastic_depth=config.model.stochastic_depth, dtype=jnp.dtype(config.model.dtype),
      bn_groups=config.num_replicas, stem=config.model.stem,
      activations=precision.activation_dtype(config.model.dtype, config.model.activations))


def step_config(config, steps_per_epoch) -> StepConfig:
  if config.loss.name not in LOSS_TERMS:
    raise ValueError(f"config.loss.name={config.loss.name!r}; expected one of {list(LOSS_TERMS)}")
  schedules = optim.group_schedules(config.optim, config.num_replicas, steps_per_epoch)
  return StepConfig(
      loss=config.loss.name, num_replicas=config.num_replicas,
      modalities=config.sampler.modalities, instances=config.sampler.instances,
      proca_weight=config.loss.proca_weight, gpd_weight=config.loss.gpd_weight,
      gpd_tau=config.loss.gpd_tau, prototype_momentum=config.loss.prototype_momentum,
      label_smoothing=config.loss.label_smoothing,
      lr_schedules=tuple(sorted(schedules.items())))


def _init_variables(model, rng):
  image = jnp.zeros((model.bn_groups, *model.image_size, 3), jnp.float32)
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "dropout": dropout_rng}, image, train=True)


def create_train_state(config, num_classes: int, steps_per_epoch, mesh,
                       rng: jax.Array | None = None, log=print, abstract_only: bool = False):
  """Returns ``(state, state_shardings)`` with every array already in its shards.

  ``steps_per_epoch``: one count, or one per epoch (the sampler plans each epoch's length).
  ``abstract_only``: the state's shapes, dtypes and shardings only (a checkpoint's restore
  target), nothing initialised.
  """
  init, abstract, shardings = _plan(config, num_classes, steps_per_epoch, mesh)
  if abstract_only:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings), shardings
  rng = jax.random.key(config.seed) if rng is None else rng
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.pretrained:
    state = _load_pretrained(config.pretrained, abstract.model, state, shardings, log)
  return state, shardings


def compiled_init(config, num_classes: int, steps_per_epoch, mesh) -> jax.stages.Compiled:
  """The state's initialisation as ``create_train_state`` runs it, compiled, not run: its
  ``memory_analysis()`` is what creating the state costs per device."""
  init, _, shardings = _plan(config, num_classes, steps_per_epoch, mesh)
  return jax.jit(init, out_shardings=shardings).lower(jax.random.key(config.seed)).compile()


def _plan(config, num_classes, steps_per_epoch, mesh):
  """The state's init function (of a key), its abstract value and its shardings."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
  model = build_model(config, num_classes)
  boxed = jax.eval_shape(lambda r: _init_variables(model, r), jax.random.key(0))
  abstract_params = nn.unbox(boxed["params"])
  tx = optim.make_optimizer(config.optim, abstract_params, config.num_replicas, steps_per_epoch)
  width = abstract_params["classifier"]["kernel"].shape[0]
  static = step_config(config, steps_per_epoch)

  def init(rng):
    # The same draws as with ``rng`` itself, fused into the writes of each shard: on CPU JAX's
    # threefry otherwise holds three uint32 copies of every draw in scratch (fused_threefry).
    variables = _init_variables(model, fused_threefry.fused(rng))
    params = nn.unbox(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        prototypes=jnp.zeros((num_classes, width), jnp.float32),
        rng=jax.random.fold_in(rng, 1), model=model, tx=tx, step_config=static)

  abstract = jax.eval_shape(init, jax.random.key(0))
  rules = config.sharding_rules
  repl = sharding.replicated(mesh)
  param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed["params"]), mesh,
                                                 rules)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  shardings = abstract.replace(
      step=repl, params=param_shardings,
      batch_stats=jax.tree.map(lambda _: repl, abstract.batch_stats),
      opt_state=opt_shardings,
      prototypes=sharding.logical_to_sharding(PartitionSpec(*sharding.PROTOTYPE_AXES), mesh,
                                              rules),
      rng=repl)
  _check_divisible(abstract, shardings, config)
  return init, abstract, shardings


def _check_divisible(abstract, shardings, config):
  """Every sharded dimension must split evenly; say which array and which settings."""

  def check(path, leaf, leaf_sharding):
    for dim, axes in zip(leaf.shape, leaf_sharding.spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      parts = int(np.prod([leaf_sharding.mesh.shape[a] for a in axes]))
      if dim % parts:
        raise ValueError(
            f"{jax.tree_util.keystr(path)} has a dimension of {dim}, which the mesh axes {axes} "
            f"(config.mesh={tuple(config.mesh)}, {parts} parts) do not divide; change "
            f"config.mesh, config.sharding_rules or config.num_classes")

  jax.tree_util.tree_map_with_path(check, abstract, shardings)


def _load_pretrained(path, model, state, shardings, log):
  """The backbone's parameters (and the ICS stem's running statistics) from a pretrained
  checkpoint, each tensor placed directly into its shards."""
  abstract = {"params": state.params, "batch_stats": state.batch_stats}
  loaded, _ = pretrained.load_backbone_variables(
      path, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract),
      grid_hw=model.patch_grid, log=log)
  placed = {}
  for collection in abstract:
    flat = traverse_util.flatten_dict(abstract[collection])
    flat_shardings = traverse_util.flatten_dict(getattr(shardings, collection))
    for key, value in traverse_util.flatten_dict(loaded[collection]).items():
      if isinstance(value, np.ndarray):
        flat[key] = jax.device_put(value, flat_shardings[key])
    placed[collection] = traverse_util.unflatten_dict(flat)
  return state.replace(**placed)
