"""The sharded UAD train step: device-count invariance, replica semantics, the optimizer recipe."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import uad
from uad_jax import sharding
from uad_jax.data import augment, device_augment
from uad_jax.models import reid_model
from uad_jax.training import losses, optim, prototypes, train_state, train_step

NUM_CLASSES = 16
M, P, K = 3, 4, 2


def _config(replicas=2, mesh=(1, 1), dtype="float32", stochastic_depth=0.1, loss="uad",
            fsdp=False):
  c = uad.get_config(f"synthetic,loss={loss},fsdp={fsdp}")
  with c.unlocked():
    # The step's semantics on the plain tiny ViT, whatever the synthetic demo's model and recipe.
    c.model.variant, c.model.stem = "mu/16", "patch"
    c.optim.lr_per_replica, c.optim.epochs, c.optim.warmup_epochs = 0.008, 4, 1
    c.num_replicas = replicas
    c.sampler.identities, c.sampler.instances = P, K
    c.model.image_size = (32, 16)
    c.model.dtype = dtype
    c.model.stochastic_depth = stochastic_depth
    c.mesh = (("data", mesh[0]), ("model", mesh[1]))
  return c


def _batch(replicas, seed=0, image_size=(32, 16)):
  rng = np.random.RandomState(seed)
  labels = []
  for _ in range(replicas):
    ids = rng.choice(NUM_CLASSES, P, replace=False)
    labels.append(np.tile(np.repeat(ids, K), M))
  labels = np.concatenate(labels).astype(np.int32)
  images = rng.randn(len(labels), *image_size, 3).astype(np.float32)
  return {"images": images, "labels": labels}


def _run(config, batches, devices=None, steps_per_epoch=5):
  mesh = sharding.make_mesh(config.mesh, devices)
  state, shardings = train_state.create_train_state(config, NUM_CLASSES, steps_per_epoch, mesh)
  step = train_step.jit_train_step(shardings, mesh)
  metrics = []
  with sharding.context(mesh, config.sharding_rules):
    for b in batches:
      state, m = step(state, b)
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _assert_trees_close(a, b, atol):
  fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def single_device_run():
  config = _config()
  return _run(config, [_batch(2, 0), _batch(2, 1)], devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh,fsdp", [((1, 8), False), ((8, 1), False), ((4, 2), False),
                                       ((2, 4), False), ((4, 2), True)])
def test_step_does_not_depend_on_the_device_count(single_device_run, mesh, fsdp):
  ref_state, ref_metrics = single_device_run
  n = mesh[0] * mesh[1]
  config = _config(mesh=mesh, fsdp=fsdp)
  if fsdp:   # parameters really are split over the data axis
    mesh_ = sharding.make_mesh(config.mesh, jax.devices()[:n])
    _, shardings = train_state.create_train_state(config, NUM_CLASSES, 5, mesh_)
    assert shardings.params["backbone"]["block0"]["mlp"]["fc1"]["kernel"].spec[0] == "data"
  state, metrics = _run(config, [_batch(2, 0), _batch(2, 1)], devices=jax.devices()[:n])
  for got, want in zip(metrics, ref_metrics):
    for k in want:
      np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
  _assert_trees_close(state.params, ref_state.params, 1e-5)
  _assert_trees_close(state.batch_stats, ref_state.batch_stats, 1e-5)
  np.testing.assert_allclose(state.prototypes, ref_state.prototypes, atol=1e-5)
  assert int(state.step) == 2


def _features(config, params, images, groups):
  """Pre-BN features and per-group BN output through the model itself, without the step."""
  model = train_state.build_model(config, NUM_CLASSES).clone(bn_groups=groups)
  variables = {"params": params,
               "batch_stats": {"bnneck": {"mean": jnp.zeros(64), "var": jnp.ones(64)}}}
  (logits, feats), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return logits, feats


def test_replica_groups_are_independent_and_averaged():
  config = _config(stochastic_depth=0.0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = train_state.create_train_state(config, NUM_CLASSES, 5, mesh)
  params0 = jax.device_get(state.params)
  memory0 = np.asarray(state.prototypes)
  batch = _batch(2)
  with sharding.context(mesh, config.sharding_rules):
    new_state, metrics = train_step.jit_train_step(shardings, mesh)(state, batch)
  half = len(batch["labels"]) // 2
  totals, anchors, ids, means, variances = [], [], [], [], []
  for g in range(2):
    images, labels = batch["images"][g * half:(g + 1) * half], batch["labels"][g * half:]
    labels = labels[:half]
    logits, feats = _features(config, params0, images, groups=1)
    f = np.asarray(feats)
    ce = losses.cross_entropy(logits, labels)
    tri = losses.wrt(feats, labels)
    proca_loss, anchor = losses.proca(feats, M, K)
    group_ids = losses.batch_identity_ids(jnp.asarray(labels), M, K)
    gpd = losses.gpd(feats, labels, memory0, group_ids, anchor, 0.03)
    totals.append(ce + tri + 0.01 * proca_loss + gpd)
    anchors.append(anchor)
    ids.append(group_ids)
    means.append(f.mean(0))
    variances.append(f.var(0, ddof=1))
  np.testing.assert_allclose(metrics["loss/total"], np.mean(totals), rtol=1e-5)
  # BNNeck statistics: per group, then averaged into the running estimate (momentum 0.1).
  stats = new_state.batch_stats["bnneck"]
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(means, 0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.mean(variances, 0), rtol=1e-4)
  # The memory update is global: every group's anchors, through prototypes.update.
  want_memory = prototypes.update(memory0, jnp.concatenate(ids), jnp.concatenate(anchors), 0.2)
  np.testing.assert_allclose(new_state.prototypes, want_memory, atol=1e-5)
  present = np.unique(batch["labels"])
  norms = np.linalg.norm(np.asarray(new_state.prototypes), axis=1)
  np.testing.assert_allclose(norms[present], 1.0, rtol=1e-5)
  assert np.count_nonzero(norms) == len(present)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _state_leaves(state):
  """Every leaf of a TrainState as host arrays, the RNG key as its raw data."""
  state = jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))
  return jax.tree_util.tree_flatten_with_path(state)[0]


def _assert_states_equal(got, want):
  got, want = _state_leaves(got), _state_leaves(want)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _create(config, mesh=None):
  mesh = mesh or sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = train_state.create_train_state(config, NUM_CLASSES, 5, mesh)
  step = train_step.jit_train_step(shardings, mesh)

  def run(state, batch):
    with sharding.context(mesh, config.sharding_rules):
      # The step donates its input: keep the caller's state alive for comparisons.
      return step(jax.tree.map(jnp.copy, state), batch)
  return state, run


def test_a_batch_of_pixels_steps_as_the_batch_of_their_device_augmented_images():
  config = _config(mesh=(8, 1))
  state, run = _create(config, sharding.make_mesh(config.mesh, jax.devices()[:8]))
  labels = _batch(2)["labels"]
  rng = np.random.RandomState(0)
  pixels = rng.randint(0, 256, (len(labels), 32, 16, 3)).astype(np.uint8)
  # Half the rows hold a smaller image in their corner, to be resized first; half are resized.
  raw_sizes = np.where(np.arange(len(labels))[:, None] % 2, [32, 16],
                       np.stack([rng.randint(1, 33, len(labels)), rng.randint(1, 17, len(labels))],
                                axis=1)).astype(np.int32)
  params = np.stack([augment.train_params(augment.image_rng(0, 0, i), (32, 16), padding=3)
                     for i in range(len(labels))])
  assert 0 < np.count_nonzero(params[:, 5]) < len(labels)  # some rows erased, some not
  images = np.asarray(jax.jit(device_augment.augment_batch)(pixels, params, raw_sizes))
  # The pipeline's other keys ride along unused.
  on_device, metrics = run(state, {"pixels": pixels, "raw_sizes": raw_sizes, "augment": params,
                                   "labels": labels, "cameras": np.zeros_like(labels)})
  from_host, want = run(state, {"images": images, "labels": labels})
  _assert_states_equal(on_device, from_host)
  for k in want:
    np.testing.assert_array_equal(metrics[k], want[k], err_msg=k)
  # Not trivially: the images the step sees are not the raw pixels normalised.
  plain, _ = run(state, {"images": augment.normalize(pixels), "labels": labels})
  assert not np.array_equal(_flat(plain.params)["classifier/kernel"],
                            _flat(on_device.params)["classifier/kernel"])


def test_bnneck_bias_stays_exactly_zero_and_the_rest_moves():
  config = _config()
  state, _ = _create(config)
  before = _flat(state.params)
  after, _ = _run(config, [_batch(2, s) for s in range(3)], devices=jax.devices()[:1])
  after = _flat(after.params)
  assert np.all(after["bnneck/bias"] == 0.0)
  for name in before:
    if name != "bnneck/bias":
      assert np.any(after[name] != before[name]), name


def np_epoch_lr(e, group_base, b, epochs, warmup_epochs, start_factor=0.01, floor_factor=0.002):
  """Spec §6 stated directly, for any length and warm-up."""
  if e < warmup_epochs:
    return start_factor * b + e * (group_base - start_factor * b) / warmup_epochs
  lr_min = floor_factor * b
  return lr_min + 0.5 * (group_base - lr_min) * (1 + np.cos(np.pi * e / epochs))


def _reference_objective(model, params, batch, memory, replicas):
  """The UAD loss of spec §5 written group by group, each group its own forward pass: the mean
  over groups of CE + WRT + 0.01·ProCA + GPD, the accuracy, and the anchors of every group."""
  rows = len(batch["labels"]) // replicas
  totals, anchors, ids, hits = [], [], [], []
  for g in range(replicas):
    images = batch["images"][g * rows:(g + 1) * rows]
    labels = jnp.asarray(batch["labels"][g * rows:(g + 1) * rows])
    variables = {"params": params,
                 "batch_stats": {"bnneck": {"mean": jnp.zeros(64), "var": jnp.ones(64)}}}
    (logits, feats), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    proca_loss, anchor = losses.proca(feats, M, K)
    group_ids = losses.batch_identity_ids(labels, M, K)
    totals.append(losses.cross_entropy(logits, labels) + losses.wrt(feats, labels)
                  + 0.01 * proca_loss + losses.gpd(feats, labels, memory, group_ids, anchor, 0.03))
    anchors.append(anchor)
    ids.append(group_ids)
    hits.append(jnp.argmax(logits, -1) == labels)
  return (sum(totals) / replicas,
          (jnp.concatenate(anchors), jnp.concatenate(ids), jnp.mean(jnp.concatenate(hits))))


def test_two_steps_are_the_reference_sgd_updates_of_the_loss_gradient():
  """params ← params − lr·buf, buf ← 0.9·buf + clip(∇L) + wd·params, from jax.grad of the loss
  stated independently of the step, with the memory updated between the steps."""
  config = _config(stochastic_depth=0.0)
  with config.unlocked():
    config.optim.lr_per_replica = 0.05     # updates well above fp32 noise
  state, run = _create(config)
  model = train_state.build_model(config, NUM_CLASSES).clone(bn_groups=1)
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), _flat(state.params))
  memory = jnp.asarray(state.prototypes)
  b = 0.05 * 2
  lr = {"weight": np_epoch_lr(1, b, b, 4, 1), "bias": np_epoch_lr(1, 2 * b, b, 4, 1)}
  buf = {name: 0.0 for name in params}
  reference_grad = jax.jit(jax.value_and_grad(
      lambda p, batch, memory: _reference_objective(model, p, batch, memory, 2), has_aux=True))
  for seed in (0, 1):
    batch = _batch(2, seed)
    unflat = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, sep="/")
    (loss, (anchors, ids, accuracy)), grads = reference_grad(unflat, batch, memory)
    grads = {k: np.asarray(v, np.float64) for k, v in _flat(grads).items()
             if k != "bnneck/bias"}                # frozen: torch never sees its gradient
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    state, metrics = run(state, batch)
    np.testing.assert_allclose(metrics["loss/total"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
    np.testing.assert_allclose(metrics["id_accuracy"], accuracy)
    np.testing.assert_allclose(metrics["lr/weight"], lr["weight"], rtol=1e-6)
    np.testing.assert_allclose(metrics["lr/bias"], lr["bias"], rtol=1e-6)
    for name, g in grads.items():
      buf[name] = 0.9 * buf[name] + g * coef + 1e-4 * params[name]
      params[name] = params[name] - lr["bias" if "bias" in name else "weight"] * buf[name]
    memory = prototypes.update(memory, ids, anchors, 0.2)
    got = _flat(state.params)
    for name, want in params.items():
      step_size = np.max(np.abs(lr["weight"] * buf.get(name, 0.0)))
      np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-3 * step_size + 1e-7,
                                 err_msg=name)
    np.testing.assert_allclose(state.prototypes, memory, atol=1e-5)
  assert int(state.step) == 2


def test_grad_norm_leaves_out_the_frozen_bias_even_where_its_gradient_is_large():
  """Torch never sees the frozen BNNeck bias's gradient, so neither the clip nor the finiteness
  gate may count it. At initialisation the classifier is tiny and so is that gradient; with a
  trained classifier's unit-scale weights it moves the norm by 1.6e-4, far above fp32 noise."""
  config = _config(stochastic_depth=0.0)
  state, run = _create(config)
  params = traverse_util.unflatten_dict(
      {k: (np.random.RandomState(0).randn(*v.shape).astype(np.float32)
           if k == "classifier/kernel" else v) for k, v in _flat(state.params).items()}, sep="/")
  state = state.replace(params=jax.device_put(params))
  model = train_state.build_model(config, NUM_CLASSES).clone(bn_groups=1)
  batch = _batch(2, 0)
  grads = jax.grad(lambda p: _reference_objective(model, p, batch, state.prototypes, 2)[0])(
      state.params)
  grads = {k: np.asarray(v, np.float64) for k, v in _flat(grads).items()}
  bias_sq = np.sum(grads["bnneck/bias"] ** 2)
  trained_sq = sum(np.sum(g ** 2) for k, g in grads.items() if k != "bnneck/bias")
  gap = np.sqrt(1 + bias_sq / trained_sq) - 1
  _, metrics = run(state, batch)
  assert gap > 1e-4                         # ≥ 10× the tolerance below: the norms differ
  np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(trained_sq), rtol=1e-5)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
  """Fitting one batch with the UAD loss at the recipe's learning rate."""
  config = _config(stochastic_depth=0.0)
  state, run = _create(config)
  batch = _batch(2, 0)
  history = []
  for _ in range(10):
    state, metrics = run(state, batch)
    history.append(jax.device_get(metrics))
  series = {k: np.array([m[k] for m in history]) for k in history[0]}
  # GPD's targets move while the memory fills, so only the CE and WRT terms fall step by step.
  assert np.all(np.diff(series["loss/ce"]) < 0), series["loss/ce"]
  assert np.all(np.diff(series["loss/wrt"]) < 0), series["loss/wrt"]
  assert series["loss/total"][-1] < 0.8 * series["loss/total"][0], series["loss/total"]
  assert series["id_accuracy"][-1] >= 0.5 > series["id_accuracy"][0], series["id_accuracy"]


def _counted(state):
  """`state` one step on: a skipped step still consumes its batch and its place in the schedule."""
  return state.replace(step=state.step + 1)


def test_a_skipped_step_changes_no_leaf_but_the_counter_and_the_next_step_runs_normally():
  config = _config()
  state, run = _create(config)
  state, _ = run(state, _batch(2, 0))     # momentum, BN statistics and memory all non-trivial
  bad = _batch(2, 1)
  bad["images"][3, 0, 0, 0] = np.nan
  skipped, metrics = run(state, bad)
  assert int(metrics["nonfinite"]) == 1
  _assert_states_equal(skipped, _counted(state))
  after_skip, m1 = run(skipped, _batch(2, 2))
  direct, m2 = run(state, _batch(2, 2))
  assert int(m1["nonfinite"]) == 0
  _assert_states_equal(after_skip, _counted(direct))
  assert int(after_skip.step) == 3
  # A good step advances the key, so the next step draws new drop-path masks.
  keys = [np.asarray(jax.random.key_data(s.rng)) for s in (skipped, after_skip)]
  assert not np.array_equal(*keys)


def test_a_finite_loss_with_an_overflowing_gradient_is_skipped_too():
  config = _config()
  state, run = _create(config)
  state, _ = run(state, _batch(2, 0))
  # A huge BNNeck scale keeps the loss finite (logits ~1e19) while the classifier's gradient
  # entries (~1e21) overflow the squared global norm.
  params = jax.device_get(state.params)
  params["bnneck"]["scale"] = np.full_like(params["bnneck"]["scale"], 1e21)
  state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                                                    state.params)))
  skipped, metrics = run(state, _batch(2, 1))
  assert np.isfinite(metrics["loss/total"]) and not np.isfinite(metrics["grad_norm"])
  assert int(metrics["nonfinite"]) == 1
  _assert_states_equal(skipped, _counted(state))


@pytest.mark.parametrize("activations", ["auto", "bfloat16"])
def test_bf16_compute_step_tracks_fp32(activations):
  """Both activation forms: "auto" is fp32 results on this CPU, "bfloat16" the GPU/TPU form."""
  batches = [_batch(2, 0)]
  config32, config16 = _config(stochastic_depth=0.0), _config(dtype="bfloat16",
                                                              stochastic_depth=0.0)
  with config16.unlocked():
    config16.model.activations = activations
  start, _ = _create(config32)
  s32, m32 = _run(config32, batches, devices=jax.devices()[:1])
  s16, m16 = _run(config16, batches, devices=jax.devices()[:1])
  for k in ("loss/ce", "loss/wrt", "loss/proca", "loss/gpd", "loss/total", "grad_norm"):
    np.testing.assert_allclose(m16[0][k], m32[0][k], rtol=3e-2, err_msg=k)
  assert m16[0]["nonfinite"] == 0
  # The whole update (new − old parameters) agrees to bf16 precision.
  p0, p32, p16 = _flat(start.params), _flat(s32.params), _flat(s16.params)
  d32 = np.concatenate([(p32[k] - p0[k]).ravel() for k in p0])
  d16 = np.concatenate([(p16[k] - p0[k]).ravel() for k in p0])
  assert np.linalg.norm(d16 - d32) < 5e-2 * np.linalg.norm(d32)
  np.testing.assert_allclose(s16.prototypes, s32.prototypes, atol=3e-2)


def test_million_identity_classifier_and_memory_are_sharded_over_model():
  config = _config(mesh=(2, 4))
  mesh = sharding.make_mesh(config.mesh)
  state, _ = train_state.create_train_state(config, 1_000_000, 5, mesh)
  classifier = state.params["classifier"]["kernel"]
  trace = state.opt_state[3].trace["classifier"]["kernel"]
  for array, shard_shape in [(state.prototypes, (250_000, 64)), (classifier, (64, 250_000)),
                             (trace, (64, 250_000))]:
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}
    assert array.sharding.spec == (jax.sharding.PartitionSpec("model", None)
                                   if array is state.prototypes else
                                   jax.sharding.PartitionSpec(None, "model"))


# ------------------------------------------------------------------------------- optimizer

def np_lr(e, group_base, b):
  """Spec §6 stated directly."""
  if e < 5:
    return 0.01 * b + e * (group_base - 0.01 * b) / 5
  lr_min = 0.002 * b
  return lr_min + 0.5 * (group_base - lr_min) * (1 + np.cos(np.pi * e / 120))


def test_schedule_matches_the_spec_table():
  config = uad.get_config("whumars1000")
  with config.unlocked():
    config.num_replicas = 1
  schedules = optim.group_schedules(config.optim, 1, steps_per_epoch=3)
  b = 0.008
  published = {1: 1.664e-3, 5: 7.966e-3, 60: 4.008e-3, 119: 1.74e-5, 120: 1.6e-5}
  for e in (1, 2, 5, 10, 60, 119, 120):
    for step in ((e - 1) * 3, (e - 1) * 3 + 2):         # first and last step of the epoch
      np.testing.assert_allclose(schedules["weight"](step), np_lr(e, b, b), rtol=1e-5)
      np.testing.assert_allclose(schedules["bias"](step), np_lr(e, 2 * b, b), rtol=1e-5)
    if e in published:
      np.testing.assert_allclose(schedules["weight"](3 * (e - 1)), published[e], rtol=2e-3)
  assert optim.base_lr(uad.get_config("whumars2337").optim, 4) == pytest.approx(0.032)


def test_schedule_follows_epochs_of_different_lengths():
  config = uad.get_config("whumars1000")
  lengths = (3, 5, 2) + (4,) * 117
  schedules = optim.group_schedules(config.optim, 1, steps_per_epoch=lengths)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for e in (1, 2, 3, 4, 120):
    for step in (starts[e - 1], starts[e] - 1):
      np.testing.assert_allclose(schedules["weight"](step), np_lr(e, 0.008, 0.008), rtol=1e-5)
  with pytest.raises(ValueError, match="every epoch needs"):
    optim.group_schedules(config.optim, 1, steps_per_epoch=(3, 0, 2))


def test_three_steps_match_torch_sgd_with_coupled_decay_and_clipping():
  config = uad.get_config("whumars1000")
  wd = 0.05   # large enough that decay applied after momentum instead of before is visible
  with config.unlocked():
    config.optim.weight_decay = wd
  rng = np.random.RandomState(0)
  params = {"backbone": {"fc": {"kernel": rng.randn(4, 3), "bias": rng.randn(3)}},
            "bnneck": {"scale": rng.randn(3), "bias": np.zeros(3)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optim.make_optimizer(config.optim, params, num_replicas=4, steps_per_epoch=1)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * s, jnp.float32), params)
               for s in (3.0, 0.01, 2.0)]              # clipped, not clipped, clipped
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)

  # NumPy statement of torch: clip_grad_norm_ over trained parameters (the BNNeck bias has
  # requires_grad=False), grad += wd·p, buf = 0.9·buf + grad, p -= lr·buf.
  names = ["backbone/fc/kernel", "backbone/fc/bias", "bnneck/scale"]
  ref = {n: np.asarray(traverse_util.flatten_dict(params, sep="/")[n], np.float64)
         for n in names}
  buf = {n: None for n in names}
  b = 0.032
  for step, g in enumerate(grads_seq):
    gf = {n: np.asarray(traverse_util.flatten_dict(g, sep="/")[n], np.float64) for n in names}
    norm = np.sqrt(sum(np.sum(v**2) for v in gf.values()))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    for n in names:
      d = gf[n] * coef + wd * ref[n]
      buf[n] = d if buf[n] is None else 0.9 * buf[n] + d
      lr = np_lr(step + 1, 2 * b if "bias" in n else b, b)
      ref[n] = ref[n] - lr * buf[n]
  got = traverse_util.flatten_dict(p, sep="/")
  for n in names:
    np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
  np.testing.assert_array_equal(got["bnneck/bias"], 0.0)


def test_adamw_steps_match_a_numpy_statement_with_decoupled_decay():
  """The pretraining stage's optimizer: torch-clipped gradients through Adam (bias-corrected
  moments, β = 0.9, 0.999, ε = 1e-8), then the decoupled decay wd·p, times the group's LR."""
  config = uad.get_config("synthetic")
  wd = 0.05
  with config.unlocked():
    config.optim.name, config.optim.weight_decay, config.optim.lr_per_replica = "adamw", wd, 2e-3
  rng = np.random.RandomState(1)
  params = {"backbone": {"fc": {"kernel": rng.randn(4, 3), "bias": rng.randn(3)}},
            "bnneck": {"scale": rng.randn(3), "bias": np.zeros(3)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optim.make_optimizer(config.optim, params, num_replicas=1, steps_per_epoch=1)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * s, jnp.float32), params)
               for s in (3.0, 0.01, 2.0)]
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  names = ["backbone/fc/kernel", "backbone/fc/bias", "bnneck/scale"]
  ref = {n: np.asarray(traverse_util.flatten_dict(params, sep="/")[n], np.float64) for n in names}
  m = {n: 0.0 for n in names}
  v = {n: 0.0 for n in names}
  b, o = 2e-3, config.optim
  for t, g in enumerate(grads_seq, start=1):
    gf = {n: np.asarray(traverse_util.flatten_dict(g, sep="/")[n], np.float64) for n in names}
    coef = min(1.0, 1.0 / (np.sqrt(sum(np.sum(x**2) for x in gf.values())) + 1e-6))
    for n in names:
      m[n] = 0.9 * m[n] + 0.1 * gf[n] * coef
      v[n] = 0.999 * v[n] + 0.001 * (gf[n] * coef)**2
      adam = (m[n] / (1 - 0.9**t)) / (np.sqrt(v[n] / (1 - 0.999**t)) + 1e-8)
      group_base = b * o.bias_lr_factor if "bias" in n else b
      lr = np_epoch_lr(t, group_base, b, o.epochs, o.warmup_epochs)
      ref[n] = ref[n] - lr * (adam + wd * ref[n])
  got = traverse_util.flatten_dict(p, sep="/")
  for n in names:
    np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
  np.testing.assert_array_equal(got["bnneck/bias"], 0.0)
  with config.unlocked():
    config.optim.name = "lamb"
  with pytest.raises(ValueError, match="config.optim.name='lamb'"):
    optim.make_optimizer(config.optim, params, num_replicas=1, steps_per_epoch=1)


def test_an_indivisible_identity_count_names_the_array_and_the_settings():
  config = _config(mesh=(4, 2))
  with pytest.raises(ValueError, match=r"\['classifier'\]\['kernel'\] has a dimension of 15.*"
                                       r"config.num_classes"):
    train_state.create_train_state(config, 15, 5, sharding.make_mesh(config.mesh))


def test_ics_stem_loads_its_checkpoint_through_the_config_and_steps_on_any_mesh():
  """vit_ics_lup: config.pretrained fills the stem's parameters and running statistics, and its
  per-group BatchNorms give the same step on one device and on a (4, 2) mesh."""
  runs = []
  for mesh in ((1, 1), (4, 2)):
    config = _config(mesh=mesh, stochastic_depth=0.0)
    with config.unlocked():
      config.model.stem = "ics"
      config.model.image_size = (256, 128)
      config.pretrained = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_ics.pth")
    devices = jax.devices()[:mesh[0] * mesh[1]]
    state, _ = train_state.create_train_state(config, NUM_CLASSES, 5,
                                              sharding.make_mesh(config.mesh, devices), log=None)
    loaded = jax.device_get(state.batch_stats["backbone"]["stem"]["bn3"])
    assert not np.allclose(loaded["mean"], 0.0)       # the checkpoint's, not the init's zeros
    runs.append(_run(config, [_batch(2, 0, image_size=(256, 128))], devices=devices))
  (one, m_one), (many, m_many) = runs
  np.testing.assert_allclose(m_many[0]["loss/total"], m_one[0]["loss/total"], rtol=1e-5)
  _assert_trees_close(many.params, one.params, 1e-5)
  _assert_trees_close(many.batch_stats, one.batch_stats, 1e-5)
