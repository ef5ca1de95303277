"""Every field of a ``configs/uad.py`` config checked before any work is done.

A bad value would otherwise surface late and far from its cause: after the dataset is built, as a
ZeroDivisionError after the first epoch, or as a reshape error while the step compiles.
``check`` reports every bad field at once, a line each, naming the field and what it may be. The
allowed values come from the code that uses them (the evaluator's camera rules, the sampler's
policies, the model's variants and stems, the importer's formats), so the two cannot drift apart.
Only what is known without data or devices is checked: whether the mesh fits the devices and the
classes fit the dataset stays with the loop.
"""
import math
import numbers
import os

from configs import uad
from uad_jax import sharding
from uad_jax.data import augment, prepare, sampler
from uad_jax.evaluation import metrics
from uad_jax.models import precision, pretrained, vit
from uad_jax.training import optim, train_state

_MISSING = object()


class ConfigError(ValueError):
  """Bad config values; the message names each bad field and what it may be, a line each."""


def _interval(low, high, low_open, high_open) -> str:
  if high is None:
    return f"{'>' if low_open else '>='} {low}"
  return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _Problems:
  """The bad fields found so far in one config, read by dotted path."""

  def __init__(self, config):
    self.config = config
    self.lines = []

  def value(self, path: str):
    node = self.config
    for key in path.split("."):
      try:
        node = node[key]
      except (KeyError, TypeError):
        return _MISSING
    return node

  def add(self, path: str, value, expected: str) -> None:
    shown = " is missing" if value is _MISSING else f"={value!r}"
    self.lines.append(f"config.{path}{shown}: expected {expected}")

  def one_of(self, path: str, allowed) -> bool:
    value = self.value(path)
    ok = value is not _MISSING and value in tuple(allowed)
    if not ok:
      self.add(path, value, f"one of {tuple(allowed)}")
    return ok

  def number(self, path: str, low, high=None, *, integer=False, low_open=False,
             high_open=False) -> bool:
    """A number (an int when ``integer``) in the interval; NaN never is."""
    value = self.value(path)
    ok = (_is_int(value) if integer else
          isinstance(value, numbers.Real) and not isinstance(value, bool))
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
      kind = "an integer" if integer else "a number"
      self.add(path, value, f"{kind} {_interval(low, high, low_open, high_open)}")
    return ok

  def path_string(self, path: str) -> None:
    value = self.value(path)
    if not (isinstance(value, str) and value):
      self.add(path, value, "a non-empty path")


def check(config) -> None:
  """Raises ConfigError listing every bad field of ``config``; returns None when all are good."""
  p = _Problems(config)
  _check_run(p)
  _check_data(p)
  _check_model(p)
  _check_optimization(p)
  _check_parallelism(p)
  _check_pretraining(p)
  if p.lines:
    raise ConfigError(f"{len(p.lines)} bad config value(s):\n" +
                      "\n".join(f"  {line}" for line in p.lines))


def _check_run(p: _Problems) -> None:
  p.one_of("preset", uad.PRESETS)
  p.number("seed", 0, integer=True)          # NumPy's seed sequences take no negative words
  p.number("eval_every_epochs", 1, integer=True)
  p.number("eval_batch_size", 1, integer=True)
  p.one_of("camera_rule", metrics.CAMERA_RULES)
  p.one_of("rerank.enabled", (False, True))
  p.number("rerank.k1", 1, integer=True)
  p.number("rerank.k2", 1, integer=True)
  p.number("rerank.lambda_value", 0, 1)
  for field in ("max_nonfinite_steps", "keep_checkpoints", "log_every_steps"):
    p.number(field, 1, integer=True)


def _check_synthetic_ids(p: _Problems, path: str) -> None:
  _, (fewest, most) = prepare.synthetic_choices()
  value = p.value(path)
  if not (_is_int(value) and (value == 0 or fewest <= value <= most)):
    p.add(path, value, f"0 (none) or an integer in [{fewest}, {most}]")


def _check_scaling_fields(p: _Problems) -> None:
  """The synthetic set's fixed test ids leave some to train, and a subset of the training
  identities fits the synthetic set; a real split's count is checked when it is prepared."""
  ids = p.value("dataset.synthetic_ids")
  ids_ok = _is_int(ids) and ids > 0
  test_ids = p.value("dataset.synthetic_test_ids")
  test_ok = _is_int(test_ids) and (test_ids == 0 or (ids_ok and 1 <= test_ids < ids) or
                                   (not ids_ok and test_ids >= 1))
  if not test_ok:
    most = f"config.dataset.synthetic_ids - 1 = {ids - 1}" if ids_ok else "synthetic_ids - 1"
    p.add("dataset.synthetic_test_ids", test_ids, f"0 (the train fraction splits) or an "
                                                  f"integer in [1, {most}]")
  p.number("dataset.synthetic_train_frames", 0, integer=True)
  count = p.value("dataset.train_identities")
  if not p.number("dataset.train_identities", 0, integer=True) or not count:
    return
  fraction = p.value("dataset.synthetic_train_fraction")
  if (ids_ok and test_ok and ids <= prepare.synthetic_choices()[1][1] and
      isinstance(fraction, numbers.Real) and 0 < fraction < 1 and
      p.value("dataset.synthetic_difficulty") in prepare.synthetic_choices()[0]):
    available = prepare.synthetic_train_ids(p.config)
    if count > available:
      p.add("dataset.train_identities", count,
            f"0 (all) or at most the {available} training identities of the synthetic set "
            f"(config.dataset.synthetic_ids, .synthetic_test_ids, .synthetic_train_fraction)")


def _check_data(p: _Problems) -> None:
  p.one_of("dataset.name", (prepare.DATASET_NAME,))
  p.one_of("dataset.config", prepare.DATASET_CONFIGS)
  p.path_string("dataset.data_dir")
  p.path_string("dataset.manual_dir")
  _check_synthetic_ids(p, "dataset.synthetic_ids")
  p.one_of("dataset.synthetic_difficulty", prepare.synthetic_choices()[0])
  p.number("dataset.synthetic_train_fraction", 0, 1, low_open=True, high_open=True)
  _check_scaling_fields(p)
  p.number("num_classes", 0, integer=True)
  p.number("sampler.identities", 1, integer=True)
  p.number("sampler.instances", 1, integer=True)
  p.number("num_replicas", 1, integer=True)
  # Batches hold every modality of the dataset, in its order (the losses rely on the layout).
  modalities = len(sampler.DEFAULT_MODALITY_NAMES)
  if p.value("sampler.modalities") != modalities:
    p.add("sampler.modalities", p.value("sampler.modalities"),
          f"{modalities} (the dataset's {', '.join(sampler.DEFAULT_MODALITY_NAMES)})")
  p.one_of("missing_modality", sampler.MISSING_MODALITY_POLICIES)
  p.number("augment_padding", 0, integer=True)
  p.one_of("augment_on", augment.AUGMENT_ON)
  p.number("data_workers", 0, integer=True)
  p.number("data_threads", 0, integer=True)   # 0: decode in the thread that consumes batches


def _check_model(p: _Problems) -> None:
  variant, stem, size = (p.value(f"model.{k}") for k in ("variant", "stem", "image_size"))
  try:
    patch = vit.parse_variant(variant).patch if isinstance(variant, str) else 0
  except ValueError:
    patch = 0
  if patch < 1:
    p.add("model.variant", variant, f"<size>/<patch> with size one of {tuple(vit.VARIANTS)} and "
                                    "patch >= 1, e.g. 'B/16'")
  stem_ok = p.one_of("model.stem", vit.STEMS)
  size_ok = (isinstance(size, (tuple, list)) and len(size) == 2 and
             all(_is_int(side) and side >= 1 for side in size))
  if not size_ok:
    p.add("model.image_size", size, "(height, width), two integers >= 1")
  elif patch >= 1 and stem_ok:
    problem = vit.input_problem(patch, stem, size)
    if problem:
      p.lines.append(f"config.model.image_size={size!r}, config.model.variant={variant!r}, "
                     f"config.model.stem={stem!r}: expected a combination the model can take, "
                     f"but {problem}")
  p.number("model.stochastic_depth", 0, 1, high_open=True)
  p.one_of("model.dtype", precision.COMPUTE_DTYPES)
  p.one_of("model.activations", precision.ACTIVATION_FORMS)
  path = p.value("pretrained")
  if not isinstance(path, str):
    p.add("pretrained", path, "a checkpoint path, or '' for none")
  elif path and not path.endswith(pretrained.SUFFIXES):
    p.add("pretrained", path, f"a checkpoint file ending in one of {pretrained.SUFFIXES}")
  elif path and not os.path.isfile(path):
    p.add("pretrained", path, "an existing checkpoint file (there is no such file)")


def _check_optimization(p: _Problems) -> None:
  p.one_of("loss.name", train_state.LOSS_TERMS)
  p.number("loss.proca_weight", 0)
  p.number("loss.gpd_weight", 0)
  p.number("loss.gpd_tau", 0, low_open=True)
  p.number("loss.prototype_momentum", 0, 1)
  p.number("loss.label_smoothing", 0, 1, high_open=True)
  p.one_of("optim.name", optim.OPTIMIZERS)
  p.number("optim.lr_per_replica", 0, low_open=True)
  p.number("optim.momentum", 0, 1, high_open=True)
  p.number("optim.weight_decay", 0)
  p.number("optim.bias_lr_factor", 0, low_open=True)
  p.number("optim.grad_clip_norm", 0, low_open=True)
  # Fractions of the base learning rate: where the warm-up starts and the cosine ends.
  p.number("optim.warmup_factor", 0, 1)
  p.number("optim.min_lr_factor", 0, 1)
  p.number("optim.epochs", 1, integer=True)
  # Not bounded by the epochs: a short run of a preset (tests, a quick try with fewer epochs)
  # keeps its warm-up, and a warm-up longer than the run only never reaches the peak rate.
  p.number("optim.warmup_epochs", 0, integer=True)


def _check_parallelism(p: _Problems) -> None:
  mesh = p.value("mesh")
  try:
    axes = {name: size for name, size in mesh}
    names = [name for name, _ in mesh]
  except (TypeError, ValueError):
    axes, names = None, []
  sizes = list(axes.values()) if axes is not None else []
  if not (axes is not None and len(axes) == len(names) and sharding.DATA in axes and
          all(name in sharding.MESH_AXES for name in names) and
          all(_is_int(s) and (s == -1 or s >= 1) for s in sizes) and sizes.count(-1) <= 1):
    p.add("mesh", mesh, f"(name, size) pairs with distinct names among {sharding.MESH_AXES}, "
                        f"{sharding.DATA!r} one of them, sizes >= 1 or -1 (the other devices) "
                        "for at most one axis")
    axes = None
  known = tuple(axes) if axes is not None else sharding.MESH_AXES
  rules = p.value("sharding_rules")

  def mesh_axes_ok(target):
    targets = target if isinstance(target, tuple) and target else (target,)
    return target is None or all(t in known for t in targets)

  try:
    rules_ok = all(isinstance(logical, str) and mesh_axes_ok(target) for logical, target in rules)
  except (TypeError, ValueError):
    rules_ok = False
  if not rules_ok:
    p.add("sharding_rules", rules, f"(logical axis, mesh axis) pairs, each mesh axis None, one "
                                   f"of {known} or a tuple of them")
  # With the data axis's size given, whether it splits the batches is known before any data.
  data_parts = axes.get(sharding.DATA, -1) if axes is not None else -1
  if data_parts > 1:
    batch = [p.value(k) for k in ("num_replicas", "sampler.modalities", "sampler.identities",
                                  "sampler.instances")]
    step_rows = math.prod(batch) if all(_is_int(v) and v >= 1 for v in batch) else 0
    if step_rows % data_parts:
      p.add("mesh", mesh, f"a data axis that splits every step, but the global batch R·M·P·K = "
                          f"{step_rows} is not divisible by the {data_parts} devices of the data "
                          "axis (R: config.num_replicas; M, P, K: config.sampler.modalities, "
                          ".identities, .instances)")
    eval_batch = p.value("eval_batch_size")
    if _is_int(eval_batch) and eval_batch >= 1 and eval_batch % data_parts:
      p.add("eval_batch_size", eval_batch,
            f"a multiple of the {data_parts} devices of the data axis (config.mesh)")


def _check_pretraining(p: _Problems) -> None:
  _check_synthetic_ids(p, "pretrain.synthetic_ids")
  p.number("pretrain.train_fraction", 0, 1, low_open=True, high_open=True)
  p.number("pretrain.seed", 0, integer=True)
  p.number("pretrain.epochs", 1, integer=True)
  p.number("pretrain.lr", 0, low_open=True)
  p.number("pretrain.weight_decay", 0)
  p.number("pretrain.label_smoothing", 0, 1, high_open=True)
  p.number("pretrain.identities", 1, integer=True)
  p.path_string("pretrain.dir")
