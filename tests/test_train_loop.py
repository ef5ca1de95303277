"""The main job end to end on a tiny synthetic WHU-MARS: train, evaluate, checkpoint, resume."""
import json
import os

import jax
import numpy as np
import pytest

from configs import uad
from uad_jax import train


def _config(tmp_path, epochs=2):
  c = uad.get_config("synthetic")
  with c.unlocked():
    c.dataset.manual_dir = str(tmp_path / "raw")
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.dataset.synthetic_ids = 16
    c.sampler.identities, c.sampler.instances = 2, 2
    c.model.image_size = (32, 16)
    c.optim.epochs = epochs
    c.eval_every_epochs = 1
    c.eval_batch_size = 64
    c.mesh = (("data", 4), ("model", 2))
  return c


class _StopAfterFirstEvaluation(Exception):
  pass


def test_resumed_run_ends_where_an_unbroken_one_does(tmp_path):
  config = _config(tmp_path)
  logs = []
  unbroken = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "a"),
                                                     log=logs.append))
  assert any(line.startswith("epoch 2/2") for line in logs)
  report = json.loads((tmp_path / "a" / "eval_epoch002" / "retrieval.json").read_text())
  as_reid = report["protocols"]["as_reid"]["all→all"]
  assert 0.0 < as_reid["mAP"] <= 1.0 and as_reid["num_valid_queries"] > 0
  for name in ("retrieval_cmc.png", "retrieval_modality.png", "retrieval_scenario.png"):
    assert (tmp_path / "a" / "eval_epoch002" / name).stat().st_size > 0

  def interrupt_after_first_eval(line):
    if line.startswith("epoch 1:"):           # the evaluation line, after the checkpoint
      raise _StopAfterFirstEvaluation
  with pytest.raises(_StopAfterFirstEvaluation):
    train.train_and_evaluate(config, str(tmp_path / "b"), log=interrupt_after_first_eval)
  resumed_logs = []
  resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "b"),
                                                    log=resumed_logs.append))
  assert any(line.startswith("resumed from step") for line in resumed_logs)
  assert not any(line.startswith("epoch 1/2") for line in resumed_logs)
  assert int(resumed.step) == int(unbroken.step)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(unbroken.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  np.testing.assert_allclose(resumed.prototypes, unbroken.prototypes, atol=1e-6)
  history = json.loads((tmp_path / "b" / "train_history.json").read_text())
  assert [h["epoch"] for h in history] == [1, 2]


def test_too_few_classes_in_the_config_fail_clearly(tmp_path):
  config = _config(tmp_path)
  with config.unlocked():
    config.num_classes = 2
  with pytest.raises(ValueError, match="config.num_classes=2 but the train split has"):
    train.train_and_evaluate(config, str(tmp_path / "w"), log=lambda _: None)


def test_a_batch_the_data_axis_does_not_divide_fails_clearly(tmp_path):
  config = _config(tmp_path)
  with config.unlocked():
    config.mesh = (("data", 8), ("model", 1))
  with pytest.raises(ValueError, match="R·M·P·K = 12 is not divisible by the 8 devices"):
    train.train_and_evaluate(config, str(tmp_path / "w"), log=lambda _: None)
