"""Grain input pipeline: P×M×K train steps and padded eval batches of WHU-MARS.

The only uad_jax module that imports grain or tfds itself (data.prepare builds datasets through
tfds_whumars). Records come from any random-access source (`len(source)`, `source[i]` → dict with
the whu_mars features below): a `tfds.data_source` split opened by `open_split`, or a plain list of
dicts in tests.

Train stream: the images in the order the sampler plans them (epoch 0, 1, …; step by step; rows
of a step in its group-major, modality-major layout), decoded, resized and augmented in chunks of
consecutive images on `num_threads` threads in each of `num_workers` processes, then joined into
steps. Each image is augmented with a generator seeded by (seed, epoch, position of the image in
its epoch), so the stream is the same whatever the thread, worker and process counts. With
`augment_on="device"` (the default) the host only draws the augmentation's random numbers: a step
holds uint8 pixels, each image's size in them and its int32 `augment.PARAMS`, and the jitted train
step resizes, flips, crops, normalises and erases (`device_augment`); a quarter of the bytes of
float32 images cross to the device, and the host's threads decode, and resize only the images
larger than H×W (`augment.train_pixels`). `augment_on="host"` sends float32 images augmented here
(`augment.train_transform`). Eval batches always send uint8 pixels, normalised on the device with
the same table (`augment.normalize_batch`). The iterator's state (`get_state` / `set_state`,
JSON-serialisable) is its position in the stream: a restored iterator yields exactly what the
original would have, across epoch boundaries too. The state's form depends on `num_workers`
(Grain keeps one position per worker), so restore it into a pipeline built with the same settings.
A plan of some of the split's identities (`config.dataset.train_identities`, `data.identities`)
makes the stream read only their records, relabelled 0..N−1.

Multi-host: the global batch of a step (R·M·P·K rows, group-major) is split into process_count
equal contiguous row slices; process i loads rows [i·n, (i+1)·n), n = R·M·P·K / process_count, so
concatenating the processes' batches in process order gives the global batch (what
`jax.make_array_from_process_local_data` assembles when the mesh orders the data axis by process,
the usual layout). With R a multiple of process_count every process holds whole replica groups.
Eval batches are split the same way.

Use:
  plan = input_pipeline.train_plan_from_config(config)  # num_classes, steps_per_epoch, sampler
  train = iter(input_pipeline.train_dataset_from_config(
      config, plan, process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=2))
  batch = next(train)  # {"pixels": [n, H, W, 3] uint8, "raw_sizes": [n, 2] int32,
                       #  "augment": [n, 8] int32, "labels": [n] int32, …}
  state = train.get_state()  # into the checkpoint; on resume: train.set_state(state)
"""
import dataclasses
import threading
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np

from uad_jax.data import augment
from uad_jax.data import identities
from uad_jax.data import prepare
from uad_jax.data import sampler as sampler_lib

# Feature names of a whu_mars record (tfds_whumars/whu_mars builder).
IMAGE = "image"  # encoded JPEG bytes (opened with tfds decoding skipped) or a uint8 array
LABEL = "label"  # contiguous train label 0..C−1; −1 in query/gallery
PERSON_ID = "person_id"  # raw identity from the file name
CAMERA = "camera"  # 0-based
MODALITY = "modality"  # 0 RGB, 1 NIR, 2 TIR
VIEWPOINT = "viewpoint"  # 0 ground, 1 aerial
FILE_NAME = "file_name"  # path relative to the raw folder, for error messages

# Per-process buffers, in images. A 256×128 image is 96 KiB as uint8 pixels (384 KiB as float32,
# augment_on="host"), so these bound the memory the prefetching holds to tens of MiB (a hundred
# or two in float32) while keeping the decode threads busy.
DEFAULT_PREFETCH_IMAGES = 256
DEFAULT_WORKER_BUFFER_IMAGES = 64
# Images per unit of work handed to a thread or a worker process (see `_parallel`).
MAX_CHUNK_IMAGES = 32


@dataclasses.dataclass(frozen=True)
class SplitMetadata:
  """Per-record metadata of one split, as NumPy arrays indexed by record."""
  labels: np.ndarray
  person_ids: np.ndarray
  cameras: np.ndarray
  modalities: np.ndarray
  viewpoints: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """What training needs to know of the train split before reading any image."""
  num_classes: int  # train identities C (labels 0..C−1), including any the sampler dropped
  steps_per_epoch: tuple[int, ...]  # optimizer steps of epochs 0 … num_epochs−1 (varies a little)
  sampler: sampler_lib.PMKSampler
  metadata: SplitMetadata  # per record the sampler plans (labels as training sees them)
  # The split's record of each of those, when they are a subset of it (config.dataset.
  # train_identities); None: all of the split's records, in order.
  source_records: np.ndarray | None = None

  @property
  def total_steps(self) -> int:
    return sum(self.steps_per_epoch)


def open_split(name: str, split: str, data_dir: str):
  """A `tfds.data_source` over a prepared split; images come as their stored JPEG bytes.

  Skipping TFDS's image decoding lets `augment.to_rgb_image` decode with PIL's
  ``convert('RGB')`` exactly as the reference reads images (1-channel NIR/TIR included).
  """
  # Imported here: TFDS is slow to import and only needed to open prepared datasets.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          decoders={IMAGE: tfds.decode.SkipDecoding()})


class _Records:
  """Some records of a split, in a given order, with their labels replaced: a train split as a
  subset of its identities sees it (`TrainPlan.source_records`)."""

  def __init__(self, source, records: np.ndarray, labels: np.ndarray):
    self._source, self._records, self._labels = source, records, labels

  def __len__(self) -> int:
    return len(self._records)

  def _relabelled(self, index: int, record) -> dict[str, Any]:
    return {**record, LABEL: self._labels[index]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._relabelled(index, self._source[int(self._records[index])])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    records = _read_records(self._source, [int(self._records[i]) for i in indices])
    return [self._relabelled(i, record) for i, record in zip(indices, records)]


def _read_records(source, indices: Sequence[int]) -> list[dict[str, Any]]:
  # TFDS/ArrayRecord sources read many records in one call much faster than one by one.
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(list(indices)))
  return [source[i] for i in indices]


def read_metadata(source, chunk: int = 4096) -> SplitMetadata:
  """Reads the metadata features of every record (no image decoding)."""
  columns = {key: np.empty(len(source), np.int64)
             for key in (LABEL, PERSON_ID, CAMERA, MODALITY, VIEWPOINT)}
  for start in range(0, len(source), chunk):
    indices = range(start, min(start + chunk, len(source)))
    for i, record in zip(indices, _read_records(source, indices)):
      for key, column in columns.items():
        column[i] = record[key]
  return SplitMetadata(labels=columns[LABEL], person_ids=columns[PERSON_ID],
                       cameras=columns[CAMERA], modalities=columns[MODALITY],
                       viewpoints=columns[VIEWPOINT])


def _load_image(source, index: int):
  """The record at `index` and its image as a PIL RGB image; names the file when it cannot."""
  record = source[index]
  try:
    return record, augment.to_rgb_image(record[IMAGE])
  except Exception as error:  # PIL raises several types for bad data; all mean the same here
    name = record.get(FILE_NAME, "?")
    if isinstance(name, bytes):
      name = name.decode()
    raise ValueError(f"cannot decode the image of record {index} (file {name}): {error}") from error


def process_rows(global_rows: int, process_index: int, process_count: int, what: str) -> int:
  """Rows of one process's slice of a global batch of `global_rows` rows."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside 0..process_count-1 "
                     f"(process_count={process_count})")
  if global_rows % process_count:
    raise ValueError(f"{what} of {global_rows} rows cannot be split evenly over "
                     f"process_count={process_count} processes")
  return global_rows // process_count


class _TrainImage(grain.transforms.Map):
  """Position of an image in this process's stream → its augmented image (or its pixels, their
  size and its augmentation parameters) and labels."""

  def __init__(self, source, sampler: sampler_lib.PMKSampler, steps_per_epoch, image_size,
               process_index: int, local_rows: int, padding: int, augment_on: str):
    self._source = source
    self._padding = padding
    self._augment_on = augment_on
    self._sampler = sampler
    self._image_size = tuple(image_size)
    self._first_step = np.concatenate([[0], np.cumsum(steps_per_epoch)])
    self._process_offset = process_index * local_rows
    self._local_rows = local_rows
    self._init_plan_cache()

  def _init_plan_cache(self):
    self._plans: dict[int, np.ndarray] = {}
    self._plan_lock = threading.Lock()

  def __getstate__(self):
    # Workers get a copy through pickling: locks do not pickle, and plans are cheap to redo.
    state = self.__dict__.copy()
    del state["_plans"], state["_plan_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_plan_cache()

  def _plan(self, epoch: int) -> np.ndarray:
    with self._plan_lock:
      if epoch not in self._plans:
        # Threads work near one epoch boundary at a time: keep the newest two epochs.
        for old in sorted(self._plans)[:-1]:
          del self._plans[old]
        self._plans[epoch] = self._sampler.epoch_steps(epoch)
      return self._plans[epoch]

  def map(self, position: int) -> dict[str, np.ndarray]:
    step, local_row = divmod(int(position), self._local_rows)
    epoch = int(np.searchsorted(self._first_step, step, side="right")) - 1
    step_in_epoch = step - int(self._first_step[epoch])
    row = self._process_offset + local_row
    record_index = int(self._plan(epoch)[step_in_epoch, row])
    record, image = _load_image(self._source, record_index)
    epoch_position = step_in_epoch * self._sampler.shape.step_rows + row
    rng = augment.image_rng(self._sampler.seed, epoch, epoch_position)
    if self._augment_on == "host":
      images = {"images": augment.train_transform(image, rng, self._image_size,
                                                  padding=self._padding)}
    else:
      pixels, raw_size = augment.train_pixels(image, self._image_size)
      images = {"pixels": pixels, "raw_sizes": raw_size,
                "augment": augment.train_params(rng, self._image_size, padding=self._padding)}
    return {
        **images,
        "labels": np.int32(record[LABEL]),
        "modalities": np.int32(record[MODALITY]),
        "cameras": np.int32(record[CAMERA]),
    }


def _chunk_rows(batch_rows: int) -> int:
  """The largest divisor of `batch_rows` up to MAX_CHUNK_IMAGES."""
  return max(d for d in range(1, min(batch_rows, MAX_CHUNK_IMAGES) + 1) if batch_rows % d == 0)


def _concatenate(chunks: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def _parallel(per_image: grain.MapDataset, batch_rows: int, num_workers: int, num_threads: int,
              prefetch_images: int) -> grain.IterDataset:
  """Per-image dataset → batches of `batch_rows` consecutive images, made on `num_threads`
  threads in each of `num_workers` processes (0: in this process).

  Grain's unit of work is a chunk of consecutive images (a divisor of the batch): each thread
  decodes a whole chunk, and worker w makes chunks w, w + num_workers, … whose results Grain
  interleaves back in order, so batches are the same whatever the thread and worker counts.
  Chunks rather than single images because every element has a fixed cost (queueing, shared
  memory, stacking) that per image is comparable to decoding it.
  """
  if num_workers < 0 or num_threads < 0:
    raise ValueError(f"num_workers ({num_workers}) and num_threads ({num_threads}) must be >= 0")
  chunk = _chunk_rows(batch_rows)
  prefetch_chunks = max(num_threads, prefetch_images // chunk) if num_threads else 0
  iterable = per_image.batch(chunk).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_chunks))
  if num_workers:
    # Grain's worker processes read absl flags, which fail unless parsed; a script without
    # absl.app (tests, benchmarks, notebooks) never parses them (google/grain issue #1355).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers,
        per_worker_buffer_size=max(1, DEFAULT_WORKER_BUFFER_IMAGES // chunk)))
  return iterable.batch(batch_rows // chunk, drop_remainder=True, batch_fn=_concatenate)


def plan_training(metadata: SplitMetadata, shape: sampler_lib.BatchShape, *, seed: int,
                  num_epochs: int, missing_modality: str = "error") -> TrainPlan:
  """The sampler and the step count of every epoch, from the train split's metadata.

  Plans every epoch once (NumPy only, ~0.1 s an epoch for WHU-MARS-sized metadata) because the
  number of steps depends on the order identities are drawn in.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  if len(metadata) and metadata.labels.min() < 0:
    raise ValueError(f"train records need labels >= 0, but record "
                     f"{int(np.argmin(metadata.labels))} has label {metadata.labels.min()}: "
                     f"is this a query or gallery split?")
  sampler = sampler_lib.PMKSampler(
      metadata.labels, metadata.modalities, shape, seed=seed, missing_modality=missing_modality,
      person_ids=metadata.person_ids)
  steps = sampler.steps_per_epoch(num_epochs)
  empty = [e for e, n in enumerate(steps) if n == 0]
  if empty:
    raise ValueError(f"epoch(s) {empty} have no step: {sampler.num_identities} usable identities "
                     f"give fewer than R={shape.replicas} batches of P={shape.identities}")
  return TrainPlan(num_classes=int(metadata.labels.max()) + 1, steps_per_epoch=steps,
                   sampler=sampler, metadata=metadata)


def make_train_dataset(source, plan: TrainPlan, *, image_size=augment.DEFAULT_IMAGE_SIZE,
                       padding: int = augment.PADDING, augment_on: str = "device",
                       process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                       num_threads: int = 2,
                       prefetch_images: int = DEFAULT_PREFETCH_IMAGES) -> grain.IterDataset:
  """The train stream of every planned epoch over the train split `source`.

  Yields dicts {"pixels": uint8 [n, H, W, 3], "raw_sizes": int32 [n, 2], "augment": int32
  [n, len(augment.PARAMS)]} (for `augment_on="device"`; `augment.train_pixels`) or {"images":
  float32 [n, H, W, 3]} ("host"), with "labels", "modalities", "cameras": int32 [n],
  n = R·M·P·K / process_count rows: this process's slice of each step (see the module docstring),
  `plan.total_steps` of them. Close iterators of a pipeline with worker processes
  (`iterator.close()`) when done with them.
  """
  augment.check_image_size(image_size)
  if augment_on not in augment.AUGMENT_ON:
    raise ValueError(f"augment_on must be one of {augment.AUGMENT_ON}, got {augment_on!r}")
  if plan.source_records is not None:
    source = _Records(source, plan.source_records, plan.metadata.labels)
  local_rows = process_rows(plan.sampler.shape.step_rows, process_index, process_count,
                            "the global batch R·M·P·K")
  per_image = grain.MapDataset.range(plan.total_steps * local_rows).map(
      _TrainImage(source, plan.sampler, plan.steps_per_epoch, image_size, process_index,
                  local_rows, padding, augment_on))
  return _parallel(per_image, local_rows, num_workers, num_threads, prefetch_images)


# Output key → record feature of the eval metadata arrays.
_EVAL_FEATURES = {"person_ids": PERSON_ID, "cameras": CAMERA, "modalities": MODALITY,
                  "viewpoints": VIEWPOINT}


class _EvalImage(grain.transforms.Map):
  """Position in this process's padded eval stream → test-resized uint8 pixels and metadata."""

  def __init__(self, source, batch_size: int, image_size, process_index: int, local_rows: int):
    self._source = source
    self._size = len(source)
    self._batch_size = batch_size
    self._image_size = tuple(image_size)
    self._process_offset = process_index * local_rows
    self._local_rows = local_rows

  def map(self, position: int) -> dict[str, np.ndarray]:
    batch, local_row = divmod(int(position), self._local_rows)
    index = batch * self._batch_size + self._process_offset + local_row
    if index >= self._size:  # padding of the last batch
      height, width = self._image_size
      return {"pixels": np.zeros((height, width, 3), np.uint8), "mask": np.False_,
              "indices": np.int32(-1), **{key: np.int32(-1) for key in _EVAL_FEATURES}}
    record, image = _load_image(self._source, index)
    return {"pixels": augment.test_resize(image, self._image_size), "mask": np.True_,
            "indices": np.int32(index),
            **{key: np.int32(record[feature]) for key, feature in _EVAL_FEATURES.items()}}


def make_eval_dataset(source, batch_size: int, *, image_size=augment.DEFAULT_IMAGE_SIZE,
                      process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                      num_threads: int = 2,
                      prefetch_images: int = DEFAULT_PREFETCH_IMAGES) -> grain.IterDataset:
  """Every record of a query or gallery split once, in record order, in fixed-size batches.

  Yields dicts {"pixels": uint8 [n, H, W, 3] (`augment.test_resize`; the model's input is their
  `augment.normalize_batch`), "person_ids", "cameras", "modalities", "viewpoints",
  "indices": int32 [n], "mask": bool [n]} with n = batch_size / process_count. The last global
  batch is padded: padded rows have mask False, zero pixels and −1 metadata.
  """
  if batch_size < 1:
    raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
  augment.check_image_size(image_size)
  local_rows = process_rows(batch_size, process_index, process_count, "the eval batch")
  num_batches = -(-len(source) // batch_size)
  per_image = grain.MapDataset.range(num_batches * local_rows).map(
      _EvalImage(source, batch_size, image_size, process_index, local_rows))
  return _parallel(per_image, local_rows, num_workers, num_threads, prefetch_images)


def subset_identities(metadata: SplitMetadata, count: int, seed: int
                      ) -> tuple[SplitMetadata, np.ndarray | None]:
  """(metadata, split record of each row) of the train records of `count` identities
  (`identities.choose`), relabelled 0..count−1; `metadata` itself and None for count 0."""
  if not count:
    return metadata, None
  chosen = identities.choose(metadata.person_ids, count, seed)
  records, labels = identities.relabel(metadata.person_ids, chosen)
  return SplitMetadata(labels=labels, person_ids=metadata.person_ids[records],
                       cameras=metadata.cameras[records],
                       modalities=metadata.modalities[records],
                       viewpoints=metadata.viewpoints[records]), records


def train_plan_from_config(config, *, missing_modality: str = "error") -> TrainPlan:
  """`plan_training` for the train split of the prepared dataset that `config` names, or for
  the subset of its identities that `config.dataset.train_identities` asks for."""
  source = open_split_from_config(config, "train")
  shape = sampler_lib.BatchShape(
      identities=config.sampler.identities, instances=config.sampler.instances,
      modalities=config.sampler.modalities, replicas=config.num_replicas)
  metadata, records = subset_identities(read_metadata(source), config.dataset.train_identities,
                                        config.seed)
  plan = plan_training(metadata, shape, seed=config.seed, num_epochs=config.optim.epochs,
                       missing_modality=missing_modality)
  return dataclasses.replace(plan, source_records=records)


def train_dataset_from_config(config, plan: TrainPlan, **kwargs) -> grain.IterDataset:
  """`make_train_dataset` on the train split of the prepared dataset that `config` names.

  kwargs: process_index, process_count, num_workers, num_threads, prefetch_images.
  """
  source = open_split_from_config(config, "train")
  return make_train_dataset(source, plan, image_size=tuple(config.model.image_size),
                            padding=config.augment_padding, augment_on=config.augment_on,
                            **kwargs)


def eval_datasets_from_config(config, batch_size: int, **kwargs) -> dict[str, grain.IterDataset]:
  """{"query": …, "gallery": …} eval datasets of the prepared dataset that `config` names."""
  return {split: make_eval_dataset(open_split_from_config(config, split), batch_size,
                                   image_size=tuple(config.model.image_size), **kwargs)
          for split in ("query", "gallery")}


def open_split_from_config(config, split: str):
  """`open_split` of the prepared dataset that `config` names (`prepare.dataset_dirs`)."""
  return open_split(f"{config.dataset.name}/{config.dataset.config}", split,
                    prepare.dataset_dirs(config)[1])
