"""The generic pretraining stage's plumbing (what it trains, where it keeps its result, when it
is reused) and the content-named synthetic sets it relies on. That the stage helps is measured by
the learning test (test_learning.py)."""
import json
import os

import pytest

from configs import uad
from uad_jax.data import prepare
from uad_jax.training import loop, pretrain


def _config(tmp_path):
  c = uad.get_config("synthetic")
  with c.unlocked():
    c.dataset.manual_dir = str(tmp_path / "raw")
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.pretrain.dir = str(tmp_path / "pretrained")
  return c


def test_the_stage_trains_the_same_model_with_a_generic_objective_on_other_people(tmp_path):
  config = _config(tmp_path)
  stage = pretrain.pretrain_config(config)
  assert stage.model == config.model and stage.augment_padding == config.augment_padding
  assert (stage.loss.name, stage.optim.name) == ("ce", "adamw")
  assert stage.loss.label_smoothing == config.pretrain.label_smoothing > 0
  assert stage.seed == config.pretrain.seed != config.seed           # other people
  assert stage.dataset.synthetic_ids == config.pretrain.synthetic_ids
  assert (stage.sampler.identities, stage.sampler.instances, stage.num_replicas) == (
      config.pretrain.identities, 1, 1)
  assert stage.optim.epochs == stage.eval_every_epochs == config.pretrain.epochs
  assert stage.pretrain.synthetic_ids == 0 and stage.pretrained == ""
  # Its data are a set of their own, in folders named by what they hold.
  assert prepare.dataset_dirs(stage) != prepare.dataset_dirs(config)
  assert f"{config.pretrain.synthetic_ids}ids-demo" in prepare.dataset_dirs(stage)[0]


def test_the_result_is_named_by_every_setting_that_shapes_it(tmp_path):
  config = _config(tmp_path)
  base = pretrain.run_dir(config)
  assert base.startswith(str(tmp_path / "pretrained"))

  def changed(**fields):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      for name, value in fields.items():
        group, _, key = name.rpartition("__")
        (c[group] if group else c)[key] = value
    return pretrain.run_dir(c)

  for fields in ({"pretrain__lr": 1e-3}, {"pretrain__epochs": 3}, {"model__stem": "ics"},
                 {"dataset__synthetic_difficulty": "default"}, {"augment_padding": 10},
                 {"augment_on": "host"},
                 {"optim__grad_clip_norm": 5.0}, {"pretrain__seed": 1}):
    assert changed(**fields) != base, fields
  for fields in ({"eval_batch_size": 7}, {"data_threads": 1}, {"dataset__data_dir": "x"},
                 {"loss__name": "base"}, {"optim__lr_per_replica": 1.0}, {"seed": 3},
                 {"keep_checkpoints": 5}, {"log_every_steps": 1}, {"max_nonfinite_steps": 1}):
    assert changed(**fields) == base, fields      # the UAD stage's settings, or where it runs


def test_a_made_backbone_is_reused_and_an_explicit_checkpoint_wins(tmp_path, monkeypatch):
  config = _config(tmp_path)
  monkeypatch.setattr(loop, "train_and_evaluate",
                      lambda *a, **k: pytest.fail("the stage ran although its result exists"))
  path = os.path.join(pretrain.run_dir(config), pretrain.BACKBONE_FILE)
  os.makedirs(os.path.dirname(path))
  open(path, "wb").close()
  logs = []
  assert pretrain.with_pretrained_backbone(config, logs.append).pretrained == path
  assert "made earlier" in logs[0]
  with config.unlocked():
    config.pretrained = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_vit.npz")
  assert pretrain.with_pretrained_backbone(config, logs.append) is config
  with config.unlocked():
    config.pretrained, config.pretrain.synthetic_ids = "", 0
  assert pretrain.with_pretrained_backbone(config, logs.append) is config


def test_a_synthetic_folder_made_with_other_settings_is_refused(tmp_path):
  config = _config(tmp_path)
  with config.unlocked():
    config.dataset.synthetic_ids = 6
  manual_dir, _ = prepare.dataset_dirs(config)
  assert os.path.basename(manual_dir) == f"6ids-demo-train0.5-seed{config.seed}"
  prepare.prepare_dataset(config, log=lambda _: None)
  record = json.loads(open(os.path.join(manual_dir, prepare.SYNTHETIC_RECORD)).read())
  assert record["ids"] == 6 and record["options"]["spectral_coupling"] > 0
  prepare.prepare_dataset(config, log=lambda _: None)          # the same request: reused
  record["options"]["night_fraction"] = 0.5                    # as if made by another version
  with open(os.path.join(manual_dir, prepare.SYNTHETIC_RECORD), "w") as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match=r"other settings .*Remove the folder"):
    prepare.prepare_dataset(config, log=lambda _: None)


def test_the_ablation_refuses_unknown_or_no_losses_before_any_work(tmp_path):
  from uad_jax.commands import ablation  # pylint: disable=g-import-not-at-top
  for losses in (("base", "triplet"), ()):
    with pytest.raises(ValueError, match="expected one or more of"):
      ablation.run_ablation(_config(tmp_path), str(tmp_path / "a"), lambda _: None, losses)
  assert not (tmp_path / "raw").exists() and not (tmp_path / "pretrained").exists()
