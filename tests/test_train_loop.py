"""The main job end to end on a tiny synthetic WHU-MARS: train, evaluate, checkpoint, resume."""
import json
import os

import jax
import numpy as np
import pytest

from configs import uad
from uad_jax.data import augment, input_pipeline
from uad_jax.evaluation import metrics
from uad_jax.training import history, loop, train_state


def _config(tmp_path, epochs=2):
  c = uad.get_config("synthetic")
  with c.unlocked():
    c.dataset.manual_dir = str(tmp_path / "raw")
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.dataset.synthetic_ids = 16
    c.sampler.identities, c.sampler.instances = 2, 2
    c.model.image_size = (32, 16)
    # fp32, so that the job's sharded features and the test's own agree closely enough that no
    # near-tie in a ranking flips (the bf16 path runs end to end in test_learning.py).
    c.model.dtype = "float32"
    c.optim.epochs = epochs
    c.eval_every_epochs = 1
    c.eval_batch_size = 64
    c.camera_rule = "market"               # not the default: the job must pass it on
    c.mesh = (("data", 4), ("model", 2))
  return c


def _retrieval_side(config, state, split):
  """Features of every image of an eval split by the model applied directly, and the metadata."""
  model = train_state.build_model(config, 1)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  source = input_pipeline.open_split_from_config(config, split)
  feats, meta = [], []
  for batch in input_pipeline.make_eval_dataset(source, 64, image_size=config.model.image_size):
    mask = batch["mask"]
    images = augment.normalize(batch["pixels"])  # the host's formula, not the job's table
    feats.append(np.asarray(model.apply(variables, images))[mask])
    meta.append(np.stack([batch[k][mask] for k in ("person_ids", "cameras")]))
  meta = np.concatenate(meta, axis=1)
  return np.concatenate(feats), meta[0], meta[1]


class _StopAfterFirstEvaluation(Exception):
  pass


def test_resumed_run_ends_where_an_unbroken_one_does(tmp_path):
  config = _config(tmp_path)
  logs = []
  unbroken = jax.device_get(loop.train_and_evaluate(config, str(tmp_path / "a"),
                                                     log=logs.append))
  assert any(line.startswith("epoch 2/2") for line in logs)
  report = json.loads((tmp_path / "a" / "eval_epoch002" / "retrieval.json").read_text())
  assert report["camera_rule"] == "market"
  as_reid = report["protocols"]["as_reid"]["all→all"]
  # The report is the final model's retrieval on the test split under the configured rule.
  q_feats, q_ids, q_cams = _retrieval_side(config, unbroken, "query")
  g_feats, g_ids, g_cams = _retrieval_side(config, unbroken, "gallery")
  want = {rule: metrics.evaluate(q_feats, g_feats, q_ids, g_ids, q_cams, g_cams,
                                    camera_rule=rule) for rule in ("market", "sysu")}
  assert want["market"]["mAP"] != want["sysu"]["mAP"]      # the rule matters on this split
  assert as_reid["num_valid_queries"] == want["market"]["num_valid_queries"] > 0
  np.testing.assert_allclose(as_reid["mAP"], want["market"]["mAP"], rtol=1e-5)
  np.testing.assert_allclose(as_reid["cmc"], want["market"]["cmc"][:len(as_reid["cmc"])],
                             rtol=1e-5)
  for name in ("retrieval_cmc.png", "retrieval_modality.png", "retrieval_scenario.png",
               "retrieval.txt"):
    assert (tmp_path / "a" / "eval_epoch002" / name).stat().st_size > 0
  # Every evaluation leads with AS-ReID beside the chance and raw-pixel levels of this split.
  baselines = report["baselines"]
  chance = metrics.chance_level(q_ids, g_ids, q_cams, g_cams, camera_rule="market")
  np.testing.assert_allclose(baselines["chance"]["mAP"], chance["mAP"], rtol=1e-12)
  assert baselines["raw_pixels"]["num_valid_queries"] == as_reid["num_valid_queries"]
  headline = next(line for line in logs if line.startswith("epoch 2:")).splitlines()
  percent = lambda m: f"{100 * m['mAP']:.2f}/{100 * m['cmc'][0]:.2f}/{100 * m['mINP']:.2f}"
  assert headline[0] == (f"epoch 2: AS-ReID mAP/R1/mINP {percent(as_reid)} % (chance "
                         f"{percent(baselines['chance'])}, raw pixels 16×8 "
                         f"{percent(baselines['raw_pixels'])})")
  assert headline[-1].endswith(f"full table and figures in {tmp_path / 'a' / 'eval_epoch002'}")
  with open(tmp_path / "a" / "train_curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  def interrupt_after_first_eval(line):
    if line.startswith("epoch 1:"):           # the evaluation line, after the checkpoint
      raise _StopAfterFirstEvaluation
  with pytest.raises(_StopAfterFirstEvaluation):
    loop.train_and_evaluate(config, str(tmp_path / "b"), log=interrupt_after_first_eval)
  resumed_logs = []
  resumed = jax.device_get(loop.train_and_evaluate(config, str(tmp_path / "b"),
                                                    log=resumed_logs.append))
  assert any(line.startswith("resumed from step") for line in resumed_logs)
  assert not any(line.startswith("epoch 1/2") for line in resumed_logs)
  # The evaluation the interruption cut short is run on resume, and gives the same numbers.
  assert any("its evaluation was interrupted" in line for line in resumed_logs)
  for epoch in (1, 2):
    reports = [json.loads((tmp_path / run / f"eval_epoch{epoch:03d}" / "retrieval.json")
                          .read_text()) for run in ("a", "b")]
    np.testing.assert_allclose(reports[1]["protocols"]["as_reid"]["all→all"]["mAP"],
                               reports[0]["protocols"]["as_reid"]["all→all"]["mAP"], atol=1e-6)
  assert int(resumed.step) == int(unbroken.step)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(unbroken.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  np.testing.assert_allclose(resumed.prototypes, unbroken.prototypes, atol=1e-6)
  history = json.loads((tmp_path / "b" / "train_history.json").read_text())
  assert [h["epoch"] for h in history] == [1, 2]
  assert {"loss/total", "loss/gpd", "id_accuracy"} <= set(history[0])
  assert (tmp_path / "b" / "train_curves.png").stat().st_size > 0


def test_evaluations_fall_every_period_and_on_the_last_epoch(tmp_path):
  config = _config(tmp_path, epochs=5)
  with config.unlocked():
    config.eval_every_epochs = 2
  assert [e for e in range(1, 6) if loop.evaluation_due(config, e)] == [2, 4, 5]


def test_too_few_classes_in_the_config_fail_clearly(tmp_path):
  config = _config(tmp_path)
  with config.unlocked():
    config.num_classes = 2
  with pytest.raises(ValueError, match="config.num_classes=2 but the train split has"):
    loop.train_and_evaluate(config, str(tmp_path / "w"), log=lambda _: None)


def test_a_batch_the_data_axis_does_not_divide_fails_clearly(tmp_path):
  config = _config(tmp_path)
  with config.unlocked():
    config.mesh = (("data", 8), ("model", 1))
  with pytest.raises(ValueError, match="R·M·P·K = 12 is not divisible by the 8 devices"):
    loop.train_and_evaluate(config, str(tmp_path / "w"), log=lambda _: None)


def test_the_epoch_line_names_each_term_once():
  # The "base" recipe: no ProCA or GPD term; the bias LR (a multiple of the weight LR) is left out.
  means = {"loss/total": 4.5, "loss/wrt": 1.0, "loss/ce": 3.5, "id_accuracy": 0.125,
           "grad_norm": 2.0, "lr/weight": 1e-3, "lr/bias": 2e-3, "nonfinite": 0.0}
  assert history.epoch_line(3, 10, means, 35, 812.4) == (
      "epoch 3/10: loss 4.5 (ce 3.5, wrt 1), id acc 12.5%, grad norm 2, lr 0.001; "
      "35 steps, 812 img/s")
