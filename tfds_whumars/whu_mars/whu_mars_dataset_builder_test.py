"""The whu_mars builder on dummy_data/ (what tfds.testing.DatasetBuilderTestCase would check).

DatasetBuilderTestCase itself cannot run here: it derives from tf.test.TestCase, so it needs
TensorFlow (and dill). This pytest module checks the same things without them: every config
builds from dummy_data/ as the manual dir, split sizes are the expected ones, and every example
decodes with the declared features.

dummy_data/ was made with (see README.md):
  python -m tfds_whumars.synthetic --out dummy_data --ids 4 --seed 0 --frames_per_camera 1 \
      --crop_scale 0.3
  python -m tfds_whumars.synthetic --out dummy_data --ids 4 --seed 1 --frames_per_camera 1 \
      --crop_scale 0.3 --root_name WHU-MARS_2337
"""
from pathlib import Path
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_whumars import build
from tfds_whumars.whu_mars import whu_mars_dataset_builder

DUMMY_DATA = Path(__file__).parent / "dummy_data"
SPLITS = {  # examples per split of each config, as generated into dummy_data/
    "whumars1000": {"train": 27, "query": 6, "gallery": 27},
    "whumars2337": {"train": 18, "query": 6, "gallery": 18},
}


@pytest.fixture(scope="module", params=sorted(SPLITS))
def built(request, tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp(request.param)
  return request.param, build.build(request.param, DUMMY_DATA, data_dir)


def test_builder_is_registered_with_both_configs():
  assert tfds.builder_cls("whu_mars") is whu_mars_dataset_builder.Builder
  assert set(whu_mars_dataset_builder.Builder.builder_configs) == set(SPLITS)
  assert whu_mars_dataset_builder.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_split_sizes(built):
  config, builder = built
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == (
      SPLITS[config])


# Spec §1 stated here, apart from raw_layout, so the test does not share the builder's helpers:
# split and modality folders, identity and camera from "<id>_c<camera>", cameras 1–5 ground
# (5 ground nodes) and 6–7 aerial (2 UAVs), train labels 0..C−1 over the sorted train ids.
SPEC_RAW_FOLDERS = {"whumars1000": "WHU-MARS", "whumars2337": "WHU-MARS_2337"}
SPEC_SPLIT_FOLDERS = {"train": "train", "query": "query", "gallery": "test"}
SPEC_MODALITY_FOLDERS = {"RGB": "RGB", "NIR": "IR", "TIR": "Thermal"}


def _spec_fields(file_name):
  split_folder, modality_folder, name = file_name.split("/")
  person, camera = re.match(r"^(\d+)_c(\d+)_", name).groups()
  camera = int(camera) - 1
  return split_folder, modality_folder, int(person), camera, "aerial" if camera >= 5 else "ground"


def test_examples_decode_and_match_their_file_names(built):
  config, builder = built
  raw_root = DUMMY_DATA / SPEC_RAW_FOLDERS[config]
  viewpoints = builder.info.features["viewpoint"]
  modalities = builder.info.features["modality"]
  sources = builder.as_data_source()
  train_ids = sorted({_spec_fields(e["file_name"].decode())[2] for e in sources["train"]})
  seen_viewpoints = set()
  for split, source in sources.items():
    for example in source:
      file_name = example["file_name"].decode()
      assert (raw_root / file_name).is_file()
      split_folder, modality_folder, person_id, camera, viewpoint = _spec_fields(file_name)
      assert (example["person_id"], example["camera"]) == (person_id, camera)
      assert split_folder == SPEC_SPLIT_FOLDERS[split]
      assert SPEC_MODALITY_FOLDERS[modalities.int2str(example["modality"])] == modality_folder
      assert viewpoints.int2str(example["viewpoint"]) == viewpoint
      seen_viewpoints.add(viewpoint)
      image = example["image"]
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
      want_label = train_ids.index(person_id) if split == "train" else -1
      assert example["label"] == want_label
  assert seen_viewpoints == {"ground", "aerial"}


def test_metadata_statistics_match_split_sizes(built):
  config, builder = built
  rows = builder.info.metadata["statistics"]
  totals = {row["split"]: row["images"] for row in rows
            if row["modality"] == row["viewpoint"] == "all"}
  assert totals == SPLITS[config]
