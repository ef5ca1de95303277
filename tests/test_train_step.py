"""The sharded UAD train step: device-count invariance, replica semantics, the optimizer recipe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import uad
from uad_jax import losses, optim, prototypes, reid_model, sharding, train_state, train_step

NUM_CLASSES = 16
M, P, K = 3, 4, 2


def _config(replicas=2, mesh=(1, 1), dtype="float32", stochastic_depth=0.1, loss="uad",
            fsdp=False):
  c = uad.get_config(f"synthetic,loss={loss},fsdp={fsdp}")
  with c.unlocked():
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


@pytest.mark.parametrize("mesh,fsdp", [((1, 1), False), ((8, 1), False), ((4, 2), False),
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


def test_bnneck_bias_stays_exactly_zero_and_the_rest_moves():
  config = _config()
  state, _ = _run(config, [_batch(2, s) for s in range(3)], devices=jax.devices()[:1])
  assert np.all(state.params["bnneck"]["bias"] == 0.0)
  assert np.any(state.params["bnneck"]["scale"] != 1.0)


def test_non_finite_loss_leaves_the_state_untouched():
  config = _config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = train_state.create_train_state(config, NUM_CLASSES, 5, mesh)
  before = jax.device_get(state)
  batch = _batch(2)
  batch["images"][3, 0, 0, 0] = np.nan
  with sharding.context(mesh, config.sharding_rules):
    after, metrics = train_step.jit_train_step(shardings, mesh)(state, batch)
  assert int(metrics["nonfinite"]) == 1
  after = jax.device_get(after)
  assert int(after.step) == 0
  _assert_trees_close(after.params, before.params, 0.0)
  np.testing.assert_array_equal(after.prototypes, before.prototypes)


def test_bf16_compute_step_tracks_fp32():
  batches = [_batch(2, 0)]
  _, m32 = _run(_config(), batches, devices=jax.devices()[:1])
  _, m16 = _run(_config(dtype="bfloat16"), batches, devices=jax.devices()[:1])
  for k in ("loss/ce", "loss/wrt", "loss/gpd", "loss/total"):
    np.testing.assert_allclose(m16[0][k], m32[0][k], rtol=3e-2, err_msg=k)
  assert m16[0]["nonfinite"] == 0


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
      d = gf[n] * coef + 1e-4 * ref[n]
      buf[n] = d if buf[n] is None else 0.9 * buf[n] + d
      lr = np_lr(step + 1, 2 * b if "bias" in n else b, b)
      ref[n] = ref[n] - lr * buf[n]
  got = traverse_util.flatten_dict(p, sep="/")
  for n in names:
    np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
  np.testing.assert_array_equal(got["bnneck/bias"], 0.0)


def test_an_indivisible_identity_count_names_the_array_and_the_settings():
  config = _config(mesh=(4, 2))
  with pytest.raises(ValueError, match=r"\['classifier'\]\['kernel'\] has a dimension of 15.*"
                                       r"config.num_classes"):
    train_state.create_train_state(config, 15, 5, sharding.make_mesh(config.mesh))
