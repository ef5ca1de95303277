"""The whu_mars TFDS dataset: end to end on a synthetic set, labels, viewpoints, bad input."""
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_whumars import build
from tfds_whumars import jpeg_check
from tfds_whumars import raw_layout
from tfds_whumars import synthetic
from tfds_whumars.whu_mars import whu_mars_dataset_builder as builder_lib

REPO = Path(__file__).resolve().parent.parent
TINY = synthetic.Options(frames_per_camera=1, crop_scale=0.3)


@pytest.fixture(autouse=True)
def _quiet_progress_bars():
  tfds.disable_progress_bar()


def _tiny_raw(parent: Path, root_name: str = "WHU-MARS", options=TINY, ids: int = 4) -> Path:
  """A small synthetic archive; returns the manual dir holding `root_name`."""
  synthetic.generate(parent / "manual", ids, seed=0, root_name=root_name, options=options)
  return parent / "manual"


def _read_all(data_dir: Path, config: str, split: str, skip_image_decoding: bool = True):
  source = tfds.data_source(
      f"whu_mars/{config}", split=split, data_dir=data_dir, download=False,
      decoders={"image": tfds.decode.SkipDecoding()} if skip_image_decoding else None)
  return [source[i] for i in range(len(source))]


def _tree_digest(folder: Path) -> dict[str, str]:
  return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(folder.rglob("*")) if path.is_file()}


def _assert_not_prepared(data_dir: Path, config: str) -> None:
  assert not list(data_dir.rglob(f"{config}/1.0.0/dataset_info.json"))
  try:
    sources = tfds.data_source(f"whu_mars/{config}", data_dir=data_dir, download=False)
  except tfds.core.DatasetNotFoundError:
    return
  assert sources == {}  # what TFDS gives for a registered builder with nothing on disk


# ---- A 2,000-image synthetic set, generated, built with 2 workers and read back ----

@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
  parent = tmp_path_factory.mktemp("synthetic2000")
  written = synthetic.generate(parent / "manual", 67, seed=11)
  builder = build.build("whumars1000", parent / "manual", parent / "data", num_workers=2)
  return parent, written, builder


def test_counts_read_back_match_what_was_written(synthetic_set):
  parent, written, _ = synthetic_set
  assert 1800 <= len(written) <= 2300
  for split in raw_layout.SPLIT_FOLDERS:
    records = _read_all(parent / "data", "whumars1000", split)
    expected = sorted(image.rel_path for image in written if image.split == split)
    assert sorted(r["file_name"].decode() for r in records) == expected


def test_jpeg_bytes_are_stored_unchanged(synthetic_set):
  parent, _, _ = synthetic_set
  for record in _read_all(parent / "data", "whumars1000", "query"):
    raw = parent / "manual" / "WHU-MARS" / record["file_name"].decode()
    assert record["image"] == raw.read_bytes()


def test_grey_images_decode_to_three_equal_channels(synthetic_set):
  parent, _, _ = synthetic_set
  records = _read_all(parent / "data", "whumars1000", "query", skip_image_decoding=False)
  tir = next(r for r in records if r["modality"] == raw_layout.MODALITIES.index("TIR"))
  assert tir["image"].shape[2] == 3
  np.testing.assert_array_equal(tir["image"][..., 0], tir["image"][..., 2])


def test_train_labels_are_contiguous_over_sorted_train_ids(synthetic_set):
  parent, written, builder = synthetic_set
  train_ids = sorted({image.person_id for image in written if image.split == "train"})
  records = _read_all(parent / "data", "whumars1000", "train")
  assert {r["label"] for r in records} == set(range(len(train_ids)))
  for r in records:
    assert train_ids[r["label"]] == r["person_id"]
  assert builder.info.metadata["num_train_classes"] == len(train_ids)
  assert builder.info.metadata["train_person_ids"] == train_ids
  for split in ("query", "gallery"):
    assert {r["label"] for r in _read_all(parent / "data", "whumars1000", split)} == {
        builder_lib.NO_TRAINING_LABEL}


def test_default_viewpoints_are_cameras_0_to_4_ground_5_and_6_aerial(synthetic_set):
  parent, _, builder = synthetic_set
  aerial = builder.info.features["viewpoint"].str2int("aerial")
  records = _read_all(parent / "data", "whumars1000", "gallery")
  assert {r["camera"] for r in records} == set(range(7))
  for r in records:
    assert (r["viewpoint"] == aerial) == (r["camera"] >= 5)
  assert builder.info.metadata["camera_viewpoints"] == ["ground"] * 5 + ["aerial"] * 2


def test_statistics_count_every_split_modality_and_viewpoint(synthetic_set):
  _, written, builder = synthetic_set
  for row in builder.info.metadata["statistics"]:
    selected = [image for image in written if image.split == row["split"]
                and row["modality"] in ("all", image.modality)
                and row["viewpoint"] in ("all", raw_layout.DEFAULT_CAMERA_VIEWPOINTS[image.camera])]
    assert row["images"] == len(selected)
    assert row["identities"] == len({image.person_id for image in selected})
    assert row["cameras"] == len({image.camera for image in selected})


def test_one_worker_writes_the_same_shards_as_two(synthetic_set, tmp_path):
  parent, _, two_workers = synthetic_set
  one_worker = build.build("whumars1000", parent / "manual", tmp_path, num_workers=1)
  for name in ("train", "query", "gallery"):
    shard = f"whu_mars-{name}.array_record-00000-of-00001"
    assert (Path(one_worker.data_dir) / shard).read_bytes() == (
        Path(two_workers.data_dir) / shard).read_bytes()


def test_camera_viewpoint_table_is_overridable_by_a_config(tmp_path):
  manual = _tiny_raw(tmp_path)
  config = builder_lib.WhuMarsConfig(name="uavs_first", raw_folder="WHU-MARS",
                                     camera_viewpoints=("aerial",) * 2 + ("ground",) * 5)
  builder = builder_lib.Builder(config=config, data_dir=tmp_path / "data",
                                file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  aerial = builder.info.features["viewpoint"].str2int("aerial")
  for r in builder.as_data_source("train"):
    assert (r["viewpoint"] == aerial) == (r["camera"] < 2)


def test_build_command_prints_statistics(tmp_path, capsys):
  manual = _tiny_raw(tmp_path)
  build.main(["--config=whumars1000", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'd'}"])
  out = capsys.readouterr().out
  assert "identities" in out and "gallery  all      all" in out and "training classes: 2" in out


# ---- Bad input ----

def test_missing_manual_dir_names_it_and_shows_the_layout(tmp_path):
  with pytest.raises(AssertionError, match="does not exist") as error:
    build.build("whumars1000", tmp_path / "nowhere", tmp_path / "data")
  assert str(tmp_path / "nowhere") in str(error.value)
  assert "Thermal/" in str(error.value)
  _assert_not_prepared(tmp_path / "data", "whumars1000")


def test_missing_raw_folder_of_the_config(tmp_path):
  manual = _tiny_raw(tmp_path, root_name="WHU-MARS")
  with pytest.raises(raw_layout.RawLayoutError, match="WHU-MARS_2337") as error:
    build.build("whumars2337", manual, tmp_path / "data")
  assert "Expected layout" in str(error.value)


@pytest.mark.parametrize("missing", ["query", "test/Thermal", "train/IR"])
def test_missing_split_or_modality_folder(tmp_path, missing):
  manual = _tiny_raw(tmp_path)
  folder = manual / "WHU-MARS" / missing
  for path in folder.rglob("*.jpg"):
    path.unlink()
  for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
    path.rmdir()
  with pytest.raises(raw_layout.RawLayoutError) as error:
    build.build("whumars1000", manual, tmp_path / "data")
  assert str(folder) in str(error.value) and "Expected layout" in str(error.value)
  _assert_not_prepared(tmp_path / "data", "whumars1000")


def test_bad_file_names_are_listed_with_their_count(tmp_path):
  manual = _tiny_raw(tmp_path)
  valid = next((manual / "WHU-MARS" / "train" / "RGB").glob("*.jpg")).read_bytes()
  for i in range(12):
    (manual / "WHU-MARS" / "test" / "IR" / f"person{i:02d}.jpg").write_bytes(valid)
  (manual / "WHU-MARS" / "query" / "RGB" / "0001_c0_000001.jpg").write_bytes(valid)
  with pytest.raises(raw_layout.RawLayoutError, match=r"13 file name\(s\)") as error:
    build.build("whumars1000", manual, tmp_path / "data")
  message = str(error.value)
  assert "query/RGB/0001_c0_000001.jpg" in message and "test/IR/person00.jpg" in message
  assert "... and 3 more" in message


def test_image_suffixes_are_read_in_any_case(tmp_path):
  manual = _tiny_raw(tmp_path)
  raw = manual / "WHU-MARS"
  renamed = {}
  for folder, suffix in (("train/RGB", ".JPG"), ("query/IR", ".jpeg"), ("test/Thermal", ".JPEG")):
    path = sorted((raw / folder).glob("*.jpg"))[0]
    renamed[f"{folder}/{path.stem}{suffix}"] = path.read_bytes()
    path.rename(path.with_suffix(suffix))
  build.build("whumars1000", manual, tmp_path / "data")
  stored = {r["file_name"].decode(): r["image"]
            for split in ("train", "query", "gallery")
            for r in _read_all(tmp_path / "data", "whumars1000", split)}
  assert len(stored) == len(list(raw.rglob("*.*")))
  for rel_path, data in renamed.items():
    assert stored[rel_path] == data


def test_what_is_not_an_image_is_listed_with_its_count(tmp_path):
  manual = _tiny_raw(tmp_path)
  raw = manual / "WHU-MARS"
  (raw / "train" / "RGB" / "notes.txt").write_text("not an image")
  (raw / "test" / "IR" / "0001_c1_000001.png").write_bytes(b"png")
  (raw / "query" / "Thermal" / "extra.jpg").mkdir()
  (raw / "train" / "RGB" / ".DS_Store").write_bytes(b"")      # the copying system's: passed over
  with pytest.raises(raw_layout.RawLayoutError, match=r"^3 item\(s\) .* image files") as error:
    build.build("whumars1000", manual, tmp_path / "data")
  message = str(error.value)
  for rel_path in ("train/RGB/notes.txt", "test/IR/0001_c1_000001.png", "query/Thermal/extra.jpg"):
    assert rel_path in message
  assert ".DS_Store" not in message
  _assert_not_prepared(tmp_path / "data", "whumars1000")


def test_camera_without_a_viewpoint_is_an_error(tmp_path):
  manual = _tiny_raw(tmp_path)
  valid = next((manual / "WHU-MARS" / "train" / "RGB").glob("*.jpg")).read_bytes()
  (manual / "WHU-MARS" / "train" / "RGB" / "0001_c8_000001.jpg").write_bytes(valid)
  with pytest.raises(raw_layout.RawLayoutError, match="camera_viewpoints") as error:
    build.build("whumars1000", manual, tmp_path / "data")
  assert "train/RGB/0001_c8_000001.jpg" in str(error.value)


def _damage(manual: Path) -> dict[str, bytes]:
  """Truncates two files (by 1 byte and by half) and overwrites a third; returns the damage."""
  raw = manual / "WHU-MARS"
  paths = sorted((raw / "train" / "RGB").glob("*.jpg"))[:2] + sorted(
      (raw / "test" / "Thermal").glob("*.jpg"))[:1]
  data = [path.read_bytes() for path in paths]
  damaged = [data[0][:-1], data[1][:len(data[1]) // 2], b"not a jpeg"]
  for path, new in zip(paths, damaged):
    path.write_bytes(new)
  return {str(path.relative_to(raw)): new for path, new in zip(paths, damaged)}


def test_corrupt_jpegs_fail_the_build_with_their_list(tmp_path):
  manual = _tiny_raw(tmp_path)
  damaged = _damage(manual)
  with pytest.raises(builder_lib.CorruptImagesError, match="3 file") as error:
    build.build("whumars1000", manual, tmp_path / "data")
  for rel_path in damaged:
    assert rel_path in str(error.value)
  assert "truncated" in str(error.value)
  _assert_not_prepared(tmp_path / "data", "whumars1000")


def test_skip_corrupt_leaves_them_out_and_lists_them(tmp_path):
  manual = _tiny_raw(tmp_path)
  damaged = _damage(manual)
  builder = build.build("whumars1000", manual, tmp_path / "data", skip_corrupt=True)
  assert set(builder.info.metadata["skipped_corrupt_files"]) == set(damaged)
  names = {r["file_name"].decode() for split in ("train", "gallery")
           for r in _read_all(tmp_path / "data", "whumars1000", split)}
  assert not names & set(damaged)
  assert len(names) == len(list((manual / "WHU-MARS").rglob("*.jpg"))) - 6 - len(damaged)


def test_worker_processes_find_the_same_corrupt_files(tmp_path, monkeypatch):
  manual = _tiny_raw(tmp_path)
  damaged = _damage(manual)
  raw = manual / "WHU-MARS"
  rel_paths = sorted(str(p.relative_to(raw)) for p in raw.rglob("*.jpg"))
  monkeypatch.setattr(jpeg_check, "_MIN_FILES_PER_WORKER", 1)
  in_process = jpeg_check.find_corrupt(raw, rel_paths, num_workers=1)
  assert jpeg_check.find_corrupt(raw, rel_paths, num_workers=2) == in_process
  assert set(in_process) == set(damaged)


def test_train_identity_missing_a_modality_is_reported(tmp_path, caplog):
  options = synthetic.Options(frames_per_camera=1, crop_scale=0.3, train_ids_missing_modality=1)
  manual = _tiny_raw(tmp_path, options=options, ids=6)
  builder = build.build("whumars1000", manual, tmp_path / "data")
  missing = builder.info.metadata["train_ids_missing_modality"]
  assert sum(len(ids) for ids in missing.values()) == 1
  (modality, (pid,)), = missing.items()
  assert any("have no " + modality in message for message in caplog.messages)
  row = next(r for r in builder.info.metadata["statistics"]
             if (r["split"], r["modality"], r["viewpoint"]) == ("train", modality, "all"))
  assert row["identities"] == 2
  assert f"1 train identities have no {modality} image: [{pid}]" in build.summary(builder)


# ---- Interrupted builds ----

def _dying_generator(original, after: int, die):
  def generate(self, *args):
    for count, example in enumerate(original(self, *args)):
      if count == after:
        die()
      yield example
  return generate


def test_exception_mid_build_leaves_no_dataset_and_spares_other_builds(tmp_path, monkeypatch):
  manual = _tiny_raw(tmp_path)
  _tiny_raw(tmp_path, root_name="WHU-MARS_2337")
  shared, other = tmp_path / "shared_data", tmp_path / "other_data"
  build.build("whumars1000", manual, shared)
  build.build("whumars2337", manual, other)
  before = _tree_digest(shared), _tree_digest(other)

  def fail():
    raise RuntimeError("disk full")
  monkeypatch.setattr(builder_lib.Builder, "_generate_examples",
                      _dying_generator(builder_lib.Builder._generate_examples, 5, fail))
  with pytest.raises(RuntimeError, match="disk full"):
    build.build("whumars2337", manual, shared)
  _assert_not_prepared(shared, "whumars2337")
  assert not list(shared.rglob("incomplete*"))  # TFDS removes its temporary folder
  assert (_tree_digest(shared), _tree_digest(other)) == before
  assert len(_read_all(shared, "whumars1000", "train")) > 0


_KILL_MID_BUILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[4])
import test_whumars_dataset as t
from tfds_whumars import build
from tfds_whumars.whu_mars import whu_mars_dataset_builder as b
b.Builder._generate_examples = t._dying_generator(
    b.Builder._generate_examples, 5, lambda: os.kill(os.getpid(), signal.SIGKILL))
build.build(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_killed_build_leaves_nothing_that_reads_as_prepared(tmp_path):
  manual = _tiny_raw(tmp_path)
  data = tmp_path / "data"
  arguments = ["whumars1000", str(manual), str(data), str(REPO / "tests")]
  result = subprocess.run(
      [sys.executable, "-c", _KILL_MID_BUILD, *arguments],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == -signal.SIGKILL, result.stderr
  leftovers = list(data.rglob("incomplete*"))  # the killed writer's leftovers ...
  assert [path.parent for path in leftovers] == [data / "whu_mars" / "whumars1000"]
  _assert_not_prepared(data, "whumars1000")  # ... do not read as a dataset
  # Another version's and another config's are not this build's to remove.
  others = [data / "whu_mars" / "whumars1000" / "incomplete.ABC123_0.9.0",
            data / "whu_mars" / "whumars2337" / "incomplete.ABC123_1.0.0"]
  for path in others:
    path.mkdir(parents=True)
  logs = []
  build.build("whumars1000", manual, data, log=logs.append)  # a later build removes them
  assert not any(path.exists() for path in leftovers)
  assert all(path.exists() for path in others)
  assert logs[0] == ("removed 1 folder(s) left by an interrupted build of "
                     f"whu_mars/whumars1000/1.0.0: {leftovers[0]}")
  assert len(_read_all(data, "whumars1000", "query")) == 6
