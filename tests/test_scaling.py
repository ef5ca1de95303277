"""Identity-count scaling studies: nested identity subsets, a synthetic test split that does not
move with the training count, data folders named by their content, and the sweep's table."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from configs import uad
from tfds_whumars import synthetic
from uad_jax.commands import scaling, scaling_report
from uad_jax.data import identities, input_pipeline, prepare, sampler
from uad_jax.testing import configs
from uad_jax.training import config_checks

RAW_IDS = np.random.default_rng(0).choice(np.arange(1, 500), size=40, replace=False)


def test_a_subset_is_seeded_nested_in_larger_ones_and_independent_of_the_order_asked():
  subsets = {n: identities.choose(RAW_IDS, n, seed=7) for n in (30, 5, 20, 1)}
  for small, large in ((1, 5), (5, 20), (20, 30)):
    assert set(subsets[small]) < set(subsets[large])
  for n, chosen in subsets.items():
    assert len(chosen) == n and list(chosen) == sorted(chosen) and set(chosen) <= set(RAW_IDS)
    np.testing.assert_array_equal(identities.choose(RAW_IDS[::-1], n, seed=7), chosen)
  assert set(identities.choose(RAW_IDS, 20, seed=8)) != set(subsets[20])
  np.testing.assert_array_equal(identities.choose(RAW_IDS, 0, seed=7), np.sort(RAW_IDS))


def test_too_many_identities_are_refused_naming_the_field():
  with pytest.raises(ValueError, match=r"config\.dataset\.train_identities=41, but the train "
                                       r"split has 40 identities"):
    identities.choose(RAW_IDS, 41, seed=0)
  # A synthetic set's count is known before any data: the config check refuses it.
  config = configs.with_fields({"dataset.synthetic_ids": 1050, "dataset.synthetic_test_ids": 50,
                                "dataset.train_identities": 1001})
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.dataset\.train_identities=1001: expected 0 \(all\) or at "
                           r"most the 1000 training identities"):
    config_checks.check(config)
  config_checks.check(configs.with_fields({"dataset.train_identities": 1000}, config=config))


def _metadata(per_identity=6):
  """Train metadata of the 40 RAW_IDS, labels 0..39 in raw-id order as the builder gives them."""
  person_ids = np.repeat(np.sort(RAW_IDS), per_identity)
  labels = np.repeat(np.arange(len(RAW_IDS)), per_identity)
  modalities = np.tile(np.arange(3), len(person_ids) // 3)
  zeros = np.zeros_like(labels)
  return input_pipeline.SplitMetadata(labels=labels, person_ids=person_ids, cameras=zeros,
                                      modalities=modalities, viewpoints=zeros)


def test_the_train_stream_reads_only_the_subset_relabelled_in_raw_id_order():
  metadata = _metadata()
  subset, records = input_pipeline.subset_identities(metadata, 10, seed=3)
  chosen = identities.choose(metadata.person_ids, 10, seed=3)
  assert set(metadata.person_ids[records]) == set(chosen)
  np.testing.assert_array_equal(subset.labels, np.searchsorted(chosen, subset.person_ids))
  np.testing.assert_array_equal(subset.modalities, metadata.modalities[records])
  assert input_pipeline.subset_identities(metadata, 0, seed=3) == (metadata, None)

  source = [{"image": np.full((32, 16, 3), i % 251, np.uint8), "label": int(label),
             "person_id": int(pid), "camera": 0, "modality": int(m), "viewpoint": 0}
            for i, (label, pid, m) in enumerate(zip(metadata.labels, metadata.person_ids,
                                                    metadata.modalities))]
  shape = sampler.BatchShape(identities=2, instances=2)
  plan = input_pipeline.plan_training(subset, shape, seed=0, num_epochs=1)
  plan = dataclasses.replace(plan, source_records=records)
  assert plan.num_classes == 10
  stream = input_pipeline.make_train_dataset(source, plan, image_size=(32, 16), num_threads=0)
  labels = np.concatenate([batch["labels"] for batch in stream])
  assert len(labels) == plan.total_steps * shape.step_rows
  assert set(labels) == set(range(10))


def _digest(root, folders):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for folder in folders for p in sorted((root / folder).rglob("*.jpg"))}


def test_the_fixed_test_split_is_the_same_bytes_whatever_the_training_count(tmp_path):
  # The default difficulty: look-alike pairs and night frames draw too.
  options = synthetic.Options(frames_per_camera=1, crop_scale=0.3, test_ids=3)
  small = synthetic.generate(tmp_path / "a", 9, seed=2, options=options)
  large = synthetic.generate(tmp_path / "b", 25, seed=2,
                             options=synthetic.dataclasses.replace(options,
                                                                   train_frames_per_camera=2))
  test = ("query", "test")
  assert _digest(tmp_path / "a" / "WHU-MARS", test) == _digest(tmp_path / "b" / "WHU-MARS", test)
  assert {i.person_id for i in small if i.split != "train"} == {1, 2, 3}
  assert {i.person_id for i in small if i.split == "train"} == set(range(4, 10))
  assert {i.person_id for i in large if i.split == "train"} == set(range(4, 26))
  assert synthetic.num_train_ids(25, options) == 22
  with pytest.raises(ValueError, match="test_ids must be in 1..num_ids-1"):
    synthetic.generate(tmp_path / "c", 3, seed=2, options=options)


def test_a_different_synthetic_request_lands_in_a_different_folder():
  base = prepare.dataset_dirs(uad.get_config())
  assert os.path.basename(base[0]) == "100ids-demo-train0.5-seed1234"   # as before these fields
  changes = [{"dataset.synthetic_ids": 200}, {"dataset.synthetic_difficulty": "default"},
             {"dataset.synthetic_train_fraction": 0.6}, {"seed": 1},
             {"dataset.synthetic_test_ids": 20}, {"dataset.synthetic_train_frames": 1}]
  # Every synthetic_* field of the config is among them, so a new one cannot be forgotten.
  assert {f"dataset.{k}" for k in uad.get_config().dataset if k.startswith("synthetic_")} == {
      field for change in changes for field in change if field.startswith("dataset.")}
  places = [prepare.dataset_dirs(configs.with_fields(change)) for change in changes]
  for manual_dir, data_dir in places + [base]:
    assert os.path.dirname(manual_dir) == "data/synthetic"
    assert os.path.basename(manual_dir) == os.path.basename(data_dir)
  assert len({manual_dir for manual_dir, _ in places + [base]}) == len(changes) + 1
  # The case: a 60-identity set is never what a 200-identity request gets.
  assert (prepare.dataset_dirs(configs.with_fields({"dataset.synthetic_ids": 60}))
          != prepare.dataset_dirs(configs.with_fields({"dataset.synthetic_ids": 200})))
  # Neither the subset trained on nor (with fixed test ids) the unused fraction changes the set.
  assert prepare.dataset_dirs(configs.with_fields({"dataset.train_identities": 7})) == base
  fixed = {"dataset.synthetic_test_ids": 20}
  assert (prepare.dataset_dirs(configs.with_fields(fixed))
          == prepare.dataset_dirs(configs.with_fields(
              {**fixed, "dataset.synthetic_train_fraction": 0.7})))
  # Sets made before the scaling fields keep matching their records.
  assert "test_ids" not in prepare.synthetic_request(uad.get_config())["options"]


def _tiny_sweep(tmp_path):
  c = configs.with_fields({
      "dataset.manual_dir": str(tmp_path / "raw"), "dataset.data_dir": str(tmp_path / "tfds"),
      "dataset.synthetic_test_ids": 4, "dataset.synthetic_train_frames": 1,
      "pretrain.synthetic_ids": 0, "sampler.identities": 2, "model.image_size": (32, 16),
      "optim.epochs": 1, "optim.warmup_epochs": 1, "eval_batch_size": 64,
      "log_every_steps": 1, "mesh": (("data", 4), ("model", 2))})
  return c, str(tmp_path / "sweep")


def test_the_sweep_tabulates_and_plots_its_finished_runs_without_training_them_again(
    tmp_path, monkeypatch):
  config, workdir = _tiny_sweep(tmp_path)
  counts = scaling.parse_identities(["8", "4"])
  logs = []
  scaling.prepare_point(config, workdir, counts, logs.append)
  for count in counts:                 # what the sweep's processes do, here in this one
    scaling.run_point(config, workdir, counts, count, logs.append)
  assert any("training on 4 of the 8 training identities" in line for line in logs)
  raw_ids = [json.load(open(os.path.join(scaling_report.run_dir(workdir, n),
                                         scaling_report.IDENTITIES_FILE)))["raw_ids"]
             for n in counts]
  assert set(raw_ids[0]) < set(raw_ids[1]) and len(raw_ids[0]) == 4

  monkeypatch.setattr(scaling, "_run_process", lambda *_: pytest.fail("a finished run ran"))
  table = scaling.run_sweep(config, workdir, counts, [], logs.append)
  assert table.splitlines()[2].startswith("| train ids | mAP | R1 | mINP | train img/s")
  result = json.load(open(os.path.join(workdir, scaling_report.JSON_FILE)))
  assert [p["identities"] for p in result["points"]] == [4, 8] and result["missing"] == []
  for point in result["points"]:
    assert 0 <= point["mINP"] <= point["mAP"] <= 1 and point["images_per_s"] > 0
    assert point["peak_bytes_per_device"] > 0 and point["steps"] >= 1
    assert "host peak RSS" in point["memory_source"]       # the CPU backend keeps no stats
  assert list(result["reference"]) == [scaling_report.STARTING_BACKBONE, "chance", "raw pixels"]
  with open(os.path.join(workdir, scaling_report.FIGURE_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # --collect_only tabulates what is finished and names what is not.
  table = scaling.run_sweep(config, workdir, [4, 8, 6], [], logs.append, collect_only=True)
  assert "not finished (no final report): [6]" in table
  # A finished run of other settings is never read back as a point of this sweep.
  other = configs.with_fields({"seed": 99}, config=config)
  with pytest.raises(ValueError, match=r"ids_4 holds a finished run of other settings.*"
                                       r"seed: 1234 there, 99 here"):
    scaling.run_sweep(other, workdir, counts, [], logs.append, collect_only=True)
