"""Every config field is checked before any work, each bad value named with what it may be."""
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import uad
from uad_jax.commands import ablation
from uad_jax.testing import configs
from uad_jax.training import config_checks, pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def _with(config, **fields):
  """A copy of ``config`` with dotted fields (``a__b`` for ``a.b``) replaced."""
  return configs.with_fields({k.replace("__", "."): v for k, v in fields.items()}, config=config)


def _problems(config) -> list[str]:
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check(config)
  return str(error.value).splitlines()[1:]


@pytest.mark.parametrize("preset", uad.PRESETS)
@pytest.mark.parametrize("loss", uad.LOSSES)
def test_every_preset_and_loss_passes(preset, loss):
  config_checks.check(uad.get_config(f"{preset},loss={loss}"))
  config_checks.check(uad.get_config(f"{preset},loss={loss},fsdp"))


def test_the_pretraining_stage_config_passes():
  config = uad.get_config("synthetic")
  config_checks.check(pretrain.pretrain_config(config))
  config_checks.check(_with(config, pretrained=str(FIXTURES / "tiny_vit.npz")))


BAD = [
    ("preset", "cifar", "expected one of ('whumars2337', 'whumars1000', 'synthetic')"),
    ("seed", -1, "an integer >= 0"),
    ("eval_every_epochs", 0, "config.eval_every_epochs=0: expected an integer >= 1"),
    ("eval_batch_size", 0, "an integer >= 1"),
    ("camera_rule", "foo", "config.camera_rule='foo': expected one of ('sysu', 'market', 'none')"),
    ("rerank.enabled", None, "config.rerank.enabled=None: expected one of (False, True)"),
    ("rerank.k1", 0, "config.rerank.k1=0: expected an integer >= 1"),
    ("rerank.k2", 0, "config.rerank.k2=0: expected an integer >= 1"),
    ("rerank.lambda_value", 1.5, "config.rerank.lambda_value=1.5: expected a number in [0, 1]"),
    ("max_nonfinite_steps", 0, "an integer >= 1"),
    ("keep_checkpoints", 0, "an integer >= 1"),
    ("log_every_steps", 0, "an integer >= 1"),
    ("dataset.name", "mars", "one of ('whu_mars',)"),
    ("dataset.config", "whumars9", "one of ('whumars1000', 'whumars2337')"),
    ("dataset.data_dir", "", "a non-empty path"),
    ("dataset.manual_dir", "", "a non-empty path"),
    ("dataset.synthetic_ids", 1, "0 (none) or an integer in [2, 99999]"),
    ("dataset.synthetic_ids", -3, "0 (none) or an integer in [2, 99999]"),
    ("dataset.synthetic_difficulty", "hard", "one of ('default', 'demo')"),
    ("dataset.synthetic_train_fraction", 1.0, "a number in (0, 1)"),
    ("dataset.synthetic_test_ids", 100, "0 (the train fraction splits) or an integer in [1, "
                                        "config.dataset.synthetic_ids - 1 = 99]"),
    ("dataset.synthetic_test_ids", -1, "0 (the train fraction splits) or an integer"),
    ("dataset.synthetic_train_frames", -1, "an integer >= 0"),
    ("dataset.train_identities", -1, "an integer >= 0"),
    ("dataset.train_identities", 51, "0 (all) or at most the 50 training identities of the "
                                     "synthetic set"),
    ("num_classes", -1, "an integer >= 0"),
    ("sampler.identities", 0, "an integer >= 1"),
    ("sampler.instances", 0, "an integer >= 1"),
    ("sampler.modalities", 2, "expected 3 (the dataset's RGB, NIR, TIR)"),
    ("num_replicas", 0, "an integer >= 1"),
    ("missing_modality", "skip", "one of ('error', 'drop')"),
    ("augment_padding", -1, "an integer >= 0"),
    ("augment_on", "gpu", "config.augment_on='gpu': expected one of ('device', 'host')"),
    ("data_workers", -1, "an integer >= 0"),
    ("data_threads", -1, "an integer >= 0"),
    ("model.variant", "L/16", "size one of ('mu', 'Ti', 'S', 'B') and patch >= 1"),
    ("model.variant", "B16", "<size>/<patch>"),
    ("model.variant", "B/0", "patch >= 1"),
    ("model.variant", "mu/6", "the patch size (6) must be a power of 2"),   # the conv stem's
    ("model.stem", "convs", "one of ('patch', 'ics', 'conv')"),
    ("model.image_size", (100, 50), "(100, 50) is not a multiple of the patch size 8"),
    ("model.image_size", (64,), "(height, width), two integers >= 1"),
    ("model.image_size", (64, 0), "(height, width), two integers >= 1"),
    ("model.stochastic_depth", 1.0, "a number in [0, 1)"),
    ("model.dtype", "float17", "config.model.dtype='float17': expected one of ('float32', "
                               "'bfloat16')"),
    ("model.activations", "half", "config.model.activations='half': expected one of ('auto', "
                                  "'float32', 'bfloat16')"),
    ("pretrained", "weights.ckpt", "ending in one of ('.npz', '.safetensors', '.pth'"),
    ("pretrained", "no/such/vit.npz", "there is no such file"),
    ("loss.name", "triplet", "one of ('ce', 'base', 'base+proca', 'base+gpd', 'uad')"),
    ("loss.proca_weight", -0.1, "a number >= 0"),
    ("loss.gpd_weight", -1.0, "a number >= 0"),
    ("loss.gpd_tau", 0.0, "a number > 0"),
    ("loss.gpd_tau", math.nan, "a number > 0"),
    ("loss.prototype_momentum", 1.5, "a number in [0, 1]"),
    ("loss.label_smoothing", 1.0, "a number in [0, 1)"),
    ("optim.name", "lamb", "one of ('sgd', 'adamw')"),
    ("optim.lr_per_replica", 0.0, "a number > 0"),
    ("optim.momentum", 1.0, "a number in [0, 1)"),
    ("optim.weight_decay", -1e-4, "a number >= 0"),
    ("optim.bias_lr_factor", 0.0, "a number > 0"),
    ("optim.grad_clip_norm", 0.0, "a number > 0"),
    ("optim.warmup_factor", -0.1, "a number in [0, 1]"),
    ("optim.min_lr_factor", 2.0, "a number in [0, 1]"),
    ("optim.epochs", 0, "an integer >= 1"),
    ("optim.warmup_epochs", -1, "an integer >= 0"),
    ("mesh", (("data", -1), ("model", -1)), "-1 (the other devices) for at most one axis"),
    ("mesh", (("batch", -1),), "distinct names among ('data', 'model')"),
    ("mesh", (("model", -1),), "'data' one of them"),
    ("mesh", (("data", 0),), "sizes >= 1 or -1"),
    ("mesh", (("data", -1), ("data", 1)), "distinct names"),
    ("mesh", ("data",), "(name, size) pairs"),
    ("mesh", (("data", 5), ("model", 1)),
     "the global batch R·M·P·K = 24 is not divisible by the 5 devices of the data axis"),
    ("sharding_rules", (("classes", "tensor"),), "each mesh axis None, one of ('data', 'model')"),
    ("sharding_rules", (("classes",),), "(logical axis, mesh axis) pairs"),
    ("pretrain.synthetic_ids", 1, "0 (none) or an integer in [2, 99999]"),
    ("pretrain.train_fraction", 0.0, "a number in (0, 1)"),
    ("pretrain.seed", -1, "an integer >= 0"),
    ("pretrain.epochs", 0, "an integer >= 1"),
    ("pretrain.lr", 0.0, "a number > 0"),
    ("pretrain.weight_decay", -0.05, "a number >= 0"),
    ("pretrain.label_smoothing", 1.0, "a number in [0, 1)"),
    ("pretrain.identities", 0, "an integer >= 1"),
    ("pretrain.dir", "", "a non-empty path"),
]


def test_every_field_of_the_config_has_a_bad_value_above():
  def fields(node, prefix=""):
    for key, value in node.items():
      yield from fields(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
  assert set(fields(uad.get_config("synthetic").to_dict())) == {field for field, _, _ in BAD}


@pytest.mark.parametrize("field, value, expected", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_a_bad_value_names_its_field_and_what_it_may_be(field, value, expected):
  problems = _problems(configs.with_fields({field: value}))
  line = next((line for line in problems if f"config.{field}=" in line), None)
  assert line is not None, problems
  assert expected in line, line


def test_the_reference_image_size_must_fit_its_patches():
  config = _with(uad.get_config("whumars2337"), model__image_size=(100, 50))
  assert _problems(config) == [
      "  config.model.image_size=(100, 50), config.model.variant='B/16', "
      "config.model.stem='patch': expected a combination the model can take, but the image "
      "size (100, 50) is not a multiple of the patch size 16"]


def test_an_eval_batch_the_data_axis_does_not_split():
  config = _with(uad.get_config("synthetic"), mesh=(("data", 8), ("model", 1)),
                 eval_batch_size=100)
  assert _problems(config) == [
      "  config.eval_batch_size=100: expected a multiple of the 8 devices of the data axis "
      "(config.mesh)"]


def test_every_bad_field_is_reported_at_once():
  config = _with(uad.get_config("synthetic"), camera_rule="foo", eval_every_epochs=0,
                 model__dtype="float17", optim__momentum=1.0, keep_checkpoints=0)
  problems = _problems(config)
  assert len(problems) == 5
  for field in ("camera_rule", "eval_every_epochs", "model.dtype", "optim.momentum",
                "keep_checkpoints"):
    assert sum(f"config.{field}=" in line for line in problems) == 1, (field, problems)
  with pytest.raises(ValueError, match=r"^5 bad config value\(s\):\n  config\."):
    config_checks.check(config)


def test_a_missing_field_is_named():
  fields = uad.get_config("synthetic").to_dict()
  del fields["keep_checkpoints"]
  assert _problems(ml_collections.ConfigDict(fields)) == [
      "  config.keep_checkpoints is missing: expected an integer >= 1"]


def test_the_ablation_checks_before_any_work(tmp_path):
  config = _with(uad.get_config("synthetic"), dataset__manual_dir=str(tmp_path / "raw"),
                 dataset__data_dir=str(tmp_path / "tfds"), pretrain__dir=str(tmp_path / "pre"),
                 optim__epochs=0)
  with pytest.raises(config_checks.ConfigError, match=r"config\.optim\.epochs=0"):
    ablation.run_ablation(config, str(tmp_path / "a"), lambda _: None)
  assert list(tmp_path.iterdir()) == []


def test_the_train_command_stops_on_a_bad_field_before_any_work(tmp_path):
  paths = {name: tmp_path / name for name in ("workdir", "raw", "tfds", "pretrained")}
  result = subprocess.run(
      [sys.executable, "run.py", "--config.camera_rule=foo", f"--workdir={paths['workdir']}",
       f"--config.dataset.manual_dir={paths['raw']}", f"--config.dataset.data_dir={paths['tfds']}",
       f"--config.pretrain.dir={paths['pretrained']}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode != 0
  assert "config.camera_rule='foo': expected one of ('sysu', 'market', 'none')" in result.stderr
  assert "Traceback" not in result.stderr
  assert not any(path.exists() for path in paths.values())
