"""WHU-MARS (multispectral aerial-ground person ReID) as a TFDS dataset of ArrayRecord shards.

Build without TensorFlow through the Python API (`python -m tfds_whumars.build`); read with
`tfds.data_source("whu_mars/whumars2337", data_dir=...)`. The JPEG bytes of the archive are
stored as they are (never decoded and re-encoded).
"""
import dataclasses
from pathlib import Path

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from tfds_whumars import jpeg_check
from tfds_whumars import raw_layout
from tfds_whumars import statistics

# `label` of query and gallery images: they have no training class (their raw id is `person_id`).
NO_TRAINING_LABEL = -1


class CorruptImagesError(ValueError):
  """Some archive files are not readable JPEGs (and `skip_corrupt` is off)."""


@dataclasses.dataclass(eq=False)  # like tfds.core.BuilderConfig: configs compare by identity
class WhuMarsConfig(tfds.core.BuilderConfig):
  """Which archive folder to read, and the camera -> viewpoint table baked into the data.

  `camera_viewpoints[c]` is the viewpoint of 0-based camera c. The file names do not tell it: the
  default (cameras 0..4 ground nodes, 5..6 UAVs) is our convention, see raw_layout. To use
  another table, build a config with another name, e.g.
  `WhuMarsConfig(name="whumars2337_uav01", raw_folder="WHU-MARS_2337",
  camera_viewpoints=("aerial",) * 2 + ("ground",) * 5)`, so both versions can coexist on disk.
  """
  raw_folder: str = "WHU-MARS"
  camera_viewpoints: tuple[str, ...] = raw_layout.DEFAULT_CAMERA_VIEWPOINTS


def _config(name: str, identities: int) -> WhuMarsConfig:
  return WhuMarsConfig(
      name=name, raw_folder=raw_layout.RAW_FOLDERS[name],
      description=f"WHU-MARS-{identities} from the folder {raw_layout.RAW_FOLDERS[name]}/.")


class Builder(tfds.core.GeneratorBasedBuilder):
  """WHU-MARS person crops in RGB, near-infrared and thermal, from ground cameras and UAVs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_config("whumars1000", 1000), _config("whumars2337", 2337)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "WHU-MARS is released under a signed data agreement (see the authors' repository\n"
      "msm8976/WHU-MARS). Extract it so that the manual directory holds the folder WHU-MARS/\n"
      "(config whumars1000) or WHU-MARS_2337/ (config whumars2337), laid out as:\n"
      + raw_layout.expected_layout(Path("<manual_dir>/WHU-MARS")))

  def __init__(self, *, skip_corrupt: bool = False, num_workers: int = 1, **kwargs):
    """`skip_corrupt`: leave unreadable JPEGs out (listed in the metadata) instead of failing.
    `num_workers`: processes that decode-check the JPEGs.

    Both are build options, not part of the config: neither changes what a successful build of
    an intact archive contains, and a strict build of a damaged archive fails instead of
    producing a different dataset under the same name.
    """
    self._skip_corrupt = skip_corrupt
    self._num_workers = num_workers
    kwargs.setdefault("file_format", "array_record")  # TFRecord shards would need TF to read
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Grey NIR/TIR JPEGs are stored as 1-channel files; decoding gives 3 equal channels.
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg",
                                         doc="The archive's JPEG bytes, unchanged."),
            "person_id": tfds.features.Scalar(np.int32, doc="Raw identity from the file name."),
            "label": tfds.features.Scalar(
                np.int32, doc="train: 0..C-1 over the sorted train ids of all modalities; "
                              f"query/gallery: {NO_TRAINING_LABEL}."),
            "camera": tfds.features.Scalar(np.int32, doc="0-based camera (c<n> -> n-1)."),
            "modality": tfds.features.ClassLabel(names=raw_layout.MODALITIES),
            "viewpoint": tfds.features.ClassLabel(names=raw_layout.VIEWPOINTS),
            "file_name": tfds.features.Text(doc="Path relative to the raw folder."),
        }),
        # Keep the archive's sorted file order: index i is the i-th file of the split.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    root = Path(dl_manager.manual_dir) / config.raw_folder
    images_by_split = raw_layout.scan(root)
    _check_cameras(images_by_split, config)
    skipped = self._find_corrupt(root, images_by_split)
    images_by_split = {split: [image for image in images if image.rel_path not in skipped]
                       for split, images in images_by_split.items()}

    train_ids = sorted({image.person_id for image in images_by_split["train"]})
    missing = statistics.ids_missing_modality(images_by_split["train"])
    for modality, ids in missing.items():
      logging.warning("%d train identities have no %s image (first: %s); the P x M x K sampler "
                      "needs a policy for them.", len(ids), modality, ids[:raw_layout.MAX_LISTED])
    self.info.metadata.update({
        "statistics": statistics.table(images_by_split, config.camera_viewpoints),
        "num_train_classes": len(train_ids),
        "train_person_ids": train_ids,  # label i is raw id train_person_ids[i]
        "label_of_query_and_gallery": NO_TRAINING_LABEL,
        "camera_viewpoints": list(config.camera_viewpoints),
        "train_ids_missing_modality": missing,
        "skipped_corrupt_files": skipped,
    })
    label_of = {pid: label for label, pid in enumerate(train_ids)}
    return {split: self._generate_examples(root, images, label_of, config.camera_viewpoints)
            for split, images in images_by_split.items()}

  def _find_corrupt(self, root: Path, images_by_split) -> dict[str, str]:
    rel_paths = [image.rel_path for images in images_by_split.values() for image in images]
    corrupt = jpeg_check.find_corrupt(root, rel_paths, self._num_workers)
    if corrupt and not self._skip_corrupt:
      raise CorruptImagesError(
          f"{len(corrupt)} file(s) under {root} are not readable JPEGs (build with "
          f"skip_corrupt / --skip_corrupt to leave them out):\n"
          + raw_layout.format_listing([f"{path}: {why}" for path, why in corrupt.items()]))
    if corrupt:
      logging.warning("Skipping %d unreadable JPEG(s), listed in the metadata "
                      "'skipped_corrupt_files'.", len(corrupt))
    return corrupt

  def _generate_examples(self, root, images, label_of, camera_viewpoints):
    for image in images:
      yield image.rel_path, {
          "image": (root / image.rel_path).read_bytes(),
          "person_id": image.person_id,
          "label": label_of[image.person_id] if image.split == "train" else NO_TRAINING_LABEL,
          "camera": image.camera,
          "modality": image.modality,
          "viewpoint": camera_viewpoints[image.camera],
          "file_name": image.rel_path,
      }


def _check_cameras(images_by_split, config: WhuMarsConfig) -> None:
  """Every camera in the file names needs a row in the config's camera -> viewpoint table."""
  unknown_viewpoints = set(config.camera_viewpoints) - set(raw_layout.VIEWPOINTS)
  if unknown_viewpoints:
    raise ValueError(f"Builder config '{config.name}': camera_viewpoints may only hold "
                     f"{raw_layout.VIEWPOINTS}, got {sorted(unknown_viewpoints)}")
  beyond = [image.rel_path for images in images_by_split.values() for image in images
            if image.camera >= len(config.camera_viewpoints)]
  if beyond:
    raise raw_layout.RawLayoutError(
        f"{len(beyond)} file(s) name a camera beyond the {len(config.camera_viewpoints)} of "
        f"builder config '{config.name}' camera_viewpoints {config.camera_viewpoints}:\n"
        + raw_layout.format_listing(beyond))
