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

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_whumars import build
from tfds_whumars import raw_layout
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


def test_examples_decode_and_match_their_file_names(built):
  config, builder = built
  raw_root = DUMMY_DATA / raw_layout.RAW_FOLDERS[config]
  viewpoints = builder.info.features["viewpoint"]
  modalities = builder.info.features["modality"]
  for split, source in builder.as_data_source().items():
    for example in source:
      file_name = example["file_name"].decode()
      assert (raw_root / file_name).is_file()
      person_id, camera = raw_layout.parse_file_name(Path(file_name).name)
      assert (example["person_id"], example["camera"]) == (person_id, camera)
      assert file_name.split("/")[0] == raw_layout.SPLIT_FOLDERS[split]
      assert raw_layout.MODALITY_FOLDERS[modalities.int2str(example["modality"])] == (
          file_name.split("/")[1])
      assert viewpoints.int2str(example["viewpoint"]) == (
          raw_layout.DEFAULT_CAMERA_VIEWPOINTS[camera])
      image = example["image"]
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
      assert (example["label"] >= 0) == (split == "train")


def test_metadata_statistics_match_split_sizes(built):
  config, builder = built
  rows = builder.info.metadata["statistics"]
  totals = {row["split"]: row["images"] for row in rows
            if row["modality"] == row["viewpoint"] == "all"}
  assert totals == SPLITS[config]
