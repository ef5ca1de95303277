"""The Grain pipeline end to end on tiny in-memory JPEG datasets (and on a TFDS-built synthetic
WHU-MARS when the builder is there)."""
import io
import json
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from configs import uad
from uad_jax.data import augment
from uad_jax.data import input_pipeline
from uad_jax.data import sampler

SIZE = (32, 16)
SEED = 5
SHAPE = sampler.BatchShape(identities=2, instances=2, modalities=3, replicas=2)


def _jpeg(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _records(num_ids=5, seed=0, label=True):
  """whu_mars-like records: RGB as 3-channel JPEGs, NIR/TIR as 1-channel JPEGs, varied sizes."""
  rng = np.random.default_rng(seed)
  records = []
  for identity in range(num_ids):
    for modality in range(3):
      for _ in range(int(rng.integers(1, 5))):
        height, width = int(rng.integers(20, 50)), int(rng.integers(10, 25))
        channels = (height, width, 3) if modality == 0 else (height, width)
        camera = int(rng.integers(0, 7))
        person_id = 100 + 3 * identity
        records.append({
            "image": _jpeg(rng.integers(0, 256, channels, dtype=np.uint8)),
            "label": identity if label else -1, "person_id": person_id,
            "camera": camera, "modality": modality, "viewpoint": int(camera >= 5),
            "file_name": f"split/{modality}/{person_id:04d}_c{camera + 1}_{len(records)}.jpg",
        })
  return records


@pytest.fixture(scope="module")
def records():
  return _records()


def _train(records, num_epochs=2, missing_modality="error", **kwargs):
  """(plan, dataset) of the train stream of `records`."""
  plan = input_pipeline.plan_training(input_pipeline.read_metadata(records), SHAPE, seed=SEED,
                                      num_epochs=num_epochs, missing_modality=missing_modality)
  kwargs = {"image_size": SIZE, "num_threads": 2, **kwargs}
  return plan, input_pipeline.make_train_dataset(records, plan, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def _augmented(record, epoch, position, augment_on):
  """What a step holds of one record's image at `position` of `epoch`: the host's augmentation
  (augment_on="host"), or ("device") the image itself in the corner of zeros with its size when
  it is no larger than SIZE, else its resize with SIZE, and its draws."""
  image = augment.to_rgb_image(record["image"])
  rng = augment.image_rng(SEED, epoch, position)
  if augment_on == "host":
    return {"images": augment.train_transform(image, rng, SIZE)}
  if image.height <= SIZE[0] and image.width <= SIZE[1]:
    pixels = np.zeros((*SIZE, 3), np.uint8)
    pixels[:image.height, :image.width] = np.asarray(image)
    raw_size = (image.height, image.width)
  else:
    pixels, raw_size = np.asarray(image.resize(SIZE[::-1], Image.BICUBIC)), SIZE
  return {"pixels": pixels, "raw_sizes": raw_size, "augment": augment.train_params(rng, SIZE)}


def _assert_row(step, row, expected):
  for key, value in expected.items():
    np.testing.assert_array_equal(step[key][row], value, err_msg=key)


@pytest.mark.parametrize("augment_on,image_keys", [
    ("device", {"pixels": np.uint8, "raw_sizes": np.int32, "augment": np.int32}),
    ("host", {"images": np.float32})])
def test_train_steps_are_the_sampler_plan_augmented_per_position(records, augment_on,
                                                                 image_keys):
  train, dataset = _train(records, augment_on=augment_on)
  steps = _take(iter(dataset), 2)
  plan = train.sampler.epoch_steps(0)
  for step_index, step in enumerate(steps):
    rows = SHAPE.step_rows
    assert step.keys() == {*image_keys, "labels", "modalities", "cameras"}
    for key, dtype in image_keys.items():
      assert step[key].shape[0] == rows and step[key].dtype == dtype
    assert step[next(iter(image_keys))].shape == (rows, *SIZE, 3)
    for key in ("labels", "modalities", "cameras"):
      assert step[key].shape == (rows,) and step[key].dtype == np.int32
    record_indices = plan[step_index]
    np.testing.assert_array_equal(step["labels"], [records[i]["label"] for i in record_indices])
    np.testing.assert_array_equal(step["cameras"], [records[i]["camera"] for i in record_indices])
    # Group-major, then modality-major: per replica group, [RGB; NIR; TIR] blocks of P·K rows.
    by_group = step["modalities"].reshape(SHAPE.replicas, 3, -1)
    assert np.all(by_group == np.arange(3)[None, :, None])
    labels = step["labels"].reshape(SHAPE.replicas, 3, -1)
    assert np.all(labels == labels[:, :1])
    for row in (0, 7, rows - 1):
      _assert_row(step, row, _augmented(records[record_indices[row]], 0,
                                        step_index * rows + row, augment_on))


def test_stream_runs_every_epoch_then_stops(records):
  train, dataset = _train(records, num_epochs=3)
  assert train.steps_per_epoch == train.sampler.steps_per_epoch(3)
  assert train.num_classes == 5
  all_steps = list(dataset)
  assert len(all_steps) == train.total_steps
  first_step = np.concatenate([[0], np.cumsum(train.steps_per_epoch)])
  rows = SHAPE.step_rows
  for epoch in (1, 2):
    plan = train.sampler.epoch_steps(epoch)
    for step_in_epoch in (0, len(plan) - 1):
      step = all_steps[first_step[epoch] + step_in_epoch]
      record_indices = plan[step_in_epoch]
      np.testing.assert_array_equal(step["labels"], [records[i]["label"] for i in record_indices])
      # Augmentation is seeded by (seed, epoch, position within the epoch).
      for row in (0, rows - 1):
        _assert_row(step, row, _augmented(records[record_indices[row]], epoch,
                                          step_in_epoch * rows + row, "device"))


def test_resumed_iterator_yields_what_an_unbroken_one_would_across_epochs(records, tmp_path):
  train, dataset = _train(records, num_epochs=3)
  unbroken = list(dataset)
  stop = train.steps_per_epoch[0] - 1  # resume one step before the first epoch boundary
  iterator = iter(_train(records, num_epochs=3)[1])
  _take(iterator, stop)
  # Grain's own Orbax handler, as the training checkpoint will store the iterator.
  grain.checkpoint.CheckpointHandler().save(tmp_path, item=iterator)
  del iterator

  resumed = iter(_train(records, num_epochs=3)[1])
  grain.checkpoint.CheckpointHandler().restore(tmp_path, item=resumed)
  _assert_same_batches(list(resumed), unbroken[stop:])


def test_iterator_state_is_json(records):
  iterator = iter(_train(records)[1])
  _take(iterator, 1)
  state = iterator.get_state()
  assert json.loads(json.dumps(state)) == state


def test_process_slices_concatenate_to_the_global_step(records):
  (whole,) = _take(iter(_train(records)[1]), 1)
  halves = [_take(iter(_train(records, process_index=i, process_count=2)[1]), 1)[0]
            for i in range(2)]
  assert halves[0]["pixels"].shape[0] == SHAPE.step_rows // 2
  _assert_same_batches([{k: np.concatenate([h[k] for h in halves]) for k in whole}], [whole])


def test_worker_processes_give_the_same_stream_and_resume(records, monkeypatch):
  # Chunks of 4 images: each step is 6 chunks, made alternately by the two workers.
  monkeypatch.setattr(input_pipeline, "MAX_CHUNK_IMAGES", 4)
  expected = _take(iter(_train(records, num_workers=0)[1]), 3)
  iterator = iter(_train(records, num_workers=2, num_threads=1)[1])
  try:
    _assert_same_batches(_take(iterator, 1), expected[:1])
    state = iterator.get_state()
    _assert_same_batches(_take(iterator, 2), expected[1:])
    iterator.set_state(state)
    _assert_same_batches(_take(iterator, 2), expected[1:])
  finally:
    iterator.close()


def test_eval_batches_cover_every_record_in_order_with_a_padding_mask():
  gallery = _records(num_ids=4, seed=1, label=False)
  batches = list(input_pipeline.make_eval_dataset(gallery, 8, image_size=SIZE))
  assert len(batches) == -(-len(gallery) // 8)
  assert all(b["pixels"].shape == (8, *SIZE, 3) and b["pixels"].dtype == np.uint8
             for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  indices = np.concatenate([b["indices"] for b in batches])
  assert mask.dtype == bool and mask.sum() == len(gallery) and not mask[-1]
  np.testing.assert_array_equal(indices[mask], np.arange(len(gallery)))
  assert np.all(indices[~mask] == -1)
  for key, feature in [("person_ids", "person_id"), ("cameras", "camera"),
                       ("modalities", "modality"), ("viewpoints", "viewpoint")]:
    values = np.concatenate([b[key] for b in batches])
    np.testing.assert_array_equal(values[mask], [r[feature] for r in gallery])
    assert np.all(values[~mask] == -1)
  pixels = np.concatenate([b["pixels"] for b in batches])
  for i in (0, len(gallery) - 1):
    image = augment.to_rgb_image(gallery[i]["image"])
    np.testing.assert_array_equal(pixels[i], np.asarray(image.resize(SIZE[::-1], Image.BILINEAR)))
  assert np.all(pixels[~mask] == 0)


def test_eval_process_slices_concatenate_to_the_global_batch():
  query = _records(num_ids=3, seed=2, label=False)
  whole = list(input_pipeline.make_eval_dataset(query, 4, image_size=SIZE))
  parts = [list(input_pipeline.make_eval_dataset(query, 4, image_size=SIZE, process_index=i,
                                                 process_count=2)) for i in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
  _assert_same_batches(joined, whole)


def test_read_metadata_gives_per_record_arrays(records):
  metadata = input_pipeline.read_metadata(records, chunk=7)
  assert len(metadata) == len(records)
  np.testing.assert_array_equal(metadata.labels, [r["label"] for r in records])
  np.testing.assert_array_equal(metadata.viewpoints, [r["viewpoint"] for r in records])
  np.testing.assert_array_equal(metadata.person_ids, [r["person_id"] for r in records])


def test_bad_input_errors_name_the_file_the_identity_or_the_setting(records):
  broken = [dict(r) for r in records]
  broken[0]["image"] = b"not a jpeg"
  with pytest.raises(ValueError, match=r"record 0 \(file split/0/0100_c"):
    list(input_pipeline.make_eval_dataset(broken, 4, image_size=SIZE))
  _train(records, process_count=4, process_index=3)  # 24 rows split over 4: fine
  with pytest.raises(ValueError, match="24 rows.*process_count=5"):
    _train(records, process_count=5, process_index=0)
  with pytest.raises(ValueError, match="query or gallery split"):
    _train(_records(label=False))
  with pytest.raises(ValueError, match="image_size"):
    _train(records, image_size=(32,))
  with pytest.raises(ValueError, match="augment_on must be one of.*'gpu'"):
    _train(records, augment_on="gpu")
  no_nir = [r for r in records if not (r["label"] == 3 and r["modality"] == 1)]
  with pytest.raises(ValueError, match=r"label 3 \(person id 109\): no NIR"):
    _train(no_nir)
  with pytest.warns(UserWarning, match="label 3"):
    _, dataset = _train(no_nir, missing_modality="drop")
  assert 3 not in next(iter(dataset))["labels"]


REPO = pathlib.Path(__file__).resolve().parent.parent
# Looked up as files: importing the builder would import TFDS while collecting the tests.
_TFDS_WHUMARS = ["synthetic.py", "build.py", "whu_mars/whu_mars_dataset_builder.py"]


@pytest.mark.skipif(not all((REPO / "tfds_whumars" / f).exists() for f in _TFDS_WHUMARS),
                    reason="the whu_mars TFDS builder or synthetic generator (tfds_whumars/) "
                           "is not there yet")
def test_tfds_built_synthetic_whu_mars(tmp_path):
  raw, data_dir = tmp_path / "raw", tmp_path / "tfds"
  for command in (["tfds_whumars.synthetic", "--out", raw, "--ids", "8", "--seed", "0",
                   "--crop_scale", "0.5"],
                  ["tfds_whumars.build", "--config=whumars1000", f"--manual_dir={raw}",
                   f"--data_dir={data_dir}"]):
    result = subprocess.run([sys.executable, "-m", *map(str, command)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stderr[-3000:]}"

  config = uad.get_config("synthetic")  # P=4, K=2, R=1
  config.dataset.data_dir = str(data_dir)
  config.dataset.synthetic_ids = 0      # built above, by hand: data_dir holds it as it is
  config.model.image_size = (128, 64)
  config.optim.epochs = 2
  train = input_pipeline.train_plan_from_config(config)
  assert train.num_classes == 4  # half of the 8 synthetic identities train
  assert len(train.steps_per_epoch) == 2 and train.total_steps >= 2
  step = next(iter(input_pipeline.train_dataset_from_config(config, train)))
  assert step["pixels"].shape == (24, 128, 64, 3) and step["augment"].shape == (24, 8)
  assert step["raw_sizes"].shape == (24, 2)
  labels = step["labels"].reshape(3, -1)
  assert np.all(labels == labels[:1]) and np.all(step["modalities"] == np.repeat([0, 1, 2], 8))
  plan = train.sampler.epoch_steps(0)[0]
  np.testing.assert_array_equal(step["cameras"], train.metadata.cameras[plan])
  config.augment_on = "host"
  host_step = next(iter(input_pipeline.train_dataset_from_config(config, train)))
  assert host_step.keys() == {"images", "labels", "modalities", "cameras"}

  evals = input_pipeline.eval_datasets_from_config(config, 16)
  for split, dataset in evals.items():
    source = input_pipeline.open_split("whu_mars/whumars1000", split, str(data_dir))
    batches = list(dataset)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(source) and batches[0]["pixels"].shape == (16, 128, 64, 3)
    person_ids = np.concatenate([b["person_ids"] for b in batches])[mask]
    np.testing.assert_array_equal(person_ids, input_pipeline.read_metadata(source).person_ids)
