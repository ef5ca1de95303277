"""Features and metrics of a model on the eval splits: what training, evaluation of a checkpoint
and the retrieval tools share. Every process feeds its slice of each batch; features and metadata
come back whole to every process. The same pass pools the images for the raw-pixel baseline
(`baselines`), so an evaluation reads and decodes each image once.

In a multi-process run the metrics are shared work too: `metrics.evaluate_cells` deals the
queries to the processes and gathers their counts, so every process holds the whole result and
process 0 alone logs it and writes the report."""
import functools
import time
from typing import NamedTuple

import jax
import numpy as np

from uad_jax import console, sharding
from uad_jax.data import augment, image_folder, input_pipeline
from uad_jax.evaluation import baselines, protocols, report, reranking


class SplitFeatures(NamedTuple):
  """An eval split seen by the model and by the raw-pixel baseline (the same rows and labels)."""
  model: protocols.RetrievalSide   # the model's pre-BN global features
  pixels: protocols.RetrievalSide  # baselines.pixel_features of the same images


def _forward(model, variables, pixels):
  """(features, model input) of uint8 pixels: the evaluation's and the retrieval tools' one
  normalisation, the exports' table too (bit for bit the host's `augment.normalize`)."""
  images = augment.normalize_batch(pixels)
  return model.apply(variables, images, train=False), images


@functools.lru_cache(maxsize=4)
def _inference_fn(model, mesh):
  """The jitted inference forward, compiled once per model and mesh for the whole run; it also
  pools the images for the raw-pixel baseline while they are on the device."""
  def infer(variables, pixels):
    feats, images = _forward(model, variables, pixels)
    return feats, baselines.pixel_features(images)
  return jax.jit(infer, out_shardings=sharding.replicated(mesh))


def extract_features(model, variables, config, split_dataset, mesh, bar=None) -> SplitFeatures:
  """Pre-BN global features and raw-pixel features of every record of an eval split, with its
  metadata (NumPy). `variables`: {"params", "batch_stats"} (the ICS stem's BatchNorms need the
  statistics). `bar` (a `console.progress` bar) advances by the split's real images."""
  batch_sharding = sharding.batch_sharding(mesh)
  infer = _inference_fn(model, mesh)
  feats, pixels = [], []
  meta = {k: [] for k in ("person_ids", "cameras", "modalities", "viewpoints")}
  with sharding.context(mesh, config.sharding_rules):
    for batch in split_dataset:
      batch_pixels = jax.make_array_from_process_local_data(batch_sharding, batch["pixels"])
      out, pooled = (np.asarray(x) for x in jax.device_get(infer(variables, batch_pixels)))
      mask = _gather_rows(batch["mask"])
      feats.append(out[mask])
      pixels.append(pooled[mask])
      for k in meta:
        meta[k].append(_gather_rows(batch[k])[mask])
      if bar is not None:
        bar.update(int(mask.sum()))
  meta = {k: np.concatenate(v) for k, v in meta.items()}
  sides = [protocols.RetrievalSide(
      feats=np.concatenate(x), ids=meta["person_ids"], cams=meta["cameras"],
      modalities=meta["modalities"], viewpoints=meta["viewpoints"]) for x in (feats, pixels)]
  return SplitFeatures(*sides)


def _gather_rows(local):
  """The global rows of a per-process metadata array (every process gets them all)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


@functools.lru_cache(maxsize=4)
def _uint8_inference_fn(model, mesh):
  def infer(variables, pixels):
    return _forward(model, variables, pixels)[0]
  return jax.jit(infer, out_shardings=sharding.replicated(mesh))


class ImageForward:
  """A live model as the retrieval tools call it: uint8 [n, H, W, 3] images, resized to the
  model's input size, in; float32 [n, D] pre-BN features out (as the evaluation computes them).

  Batches are padded to one fixed size (a multiple of the devices) so that one compilation
  serves every batch, and split over the mesh's data axis. An export loaded with
  `models.serving_export.load` is called the same way.
  """

  def __init__(self, model, variables, mesh, rules, batch_size: int):
    devices = mesh.devices.size
    self.batch_size = -(-batch_size // devices) * devices
    self._model, self._variables, self._mesh, self._rules = model, variables, mesh, rules

  def __call__(self, images: np.ndarray) -> np.ndarray:
    count = len(images)
    if not 0 < count <= self.batch_size:
      raise ValueError(f"batches of 1..{self.batch_size} images, got {count}")
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.uint8)
    padded[:count] = images
    infer = _uint8_inference_fn(self._model, self._mesh)
    with sharding.context(self._mesh, self._rules):
      batch = jax.device_put(padded, sharding.batch_sharding(self._mesh))
      return np.asarray(infer(self._variables, batch))[:count]


def embed_folder(images: image_folder.FolderImages, forward, image_size, batch_size: int, *,
                 threads: int = 4, bar=None) -> np.ndarray:
  """float32 [N, D]: `forward` (an `ImageForward` or a loaded export) over every image of
  `images`, decoded and resized as the evaluation does. `bar` advances by images."""
  files = [images.file(i) for i in range(len(images))]
  feats = []
  for batch in image_folder.batches(files, image_size, batch_size, threads=threads):
    feats.append(np.asarray(forward(batch), np.float32))
    if bar is not None:
      bar.update(len(batch))
  return np.concatenate(feats)


def _eval_dataset(config, source):
  return input_pipeline.make_eval_dataset(
      source, config.eval_batch_size, image_size=tuple(config.model.image_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data_threads)


def evaluate_model(model, variables, config, mesh, out_dir: str | None, label: str, log=print,
                   progress: bool | None = None):
  """Every protocol of `config`'s test split for this model, and the baselines it must beat.

  Logs a headline (AS-ReID mAP / R1 / mINP beside chance and raw pixels, `label` first, e.g.
  "epoch 10") and where the report went; process 0 writes the report (table, JSON, figures) to
  `out_dir`. Without `out_dir` the table is logged instead. `progress`: draw a bar over the
  feature extraction (default: `console.bars_enabled(log)`). Every process of a multi-process
  run calls it (the features and the metrics are computed by all of them); only process 0 logs.
  """
  if progress is None:
    progress = console.bars_enabled(log)
  log = console.for_this_process(log)
  sources = [input_pipeline.open_split_from_config(config, split) for split in ("query", "gallery")]
  start = time.perf_counter()
  with console.progress(sum(map(len, sources)), f"{label}: features", enabled=progress) as bar:
    query, gallery = (extract_features(model, variables, config, _eval_dataset(config, source),
                                       mesh, bar) for source in sources)
  features_s = time.perf_counter() - start
  results = protocols.evaluate_protocols(query.model, gallery.model,
                                         camera_rule=config.camera_rule)
  results["baselines"] = baselines.evaluate_baselines(query.pixels, gallery.pixels,
                                                      camera_rule=config.camera_rule)
  where = (f"full table and figures in {out_dir}" if out_dir
           else "\n" + report.format_table(results))
  log(f"{label}: {report.format_headline(results)}\n"
      f"  {len(query.model.feats)} queries x {len(gallery.model.feats)} gallery, features "
      f"{features_s:.1f} s, metrics {time.perf_counter() - start - features_s:.1f} s; {where}")
  # After the log line: a job stopped while logging has no report, and evaluates again on resume.
  if out_dir and jax.process_index() == 0:
    report.write_report(results, out_dir, print_table=False)
  if config.rerank.enabled:
    _evaluate_reranked(query, gallery, results, config, out_dir, label, log)
  return results


RERANKED_PREFIX = "retrieval_reranked"


def _evaluate_reranked(query: SplitFeatures, gallery: SplitFeatures, results: dict, config,
                       out_dir, label: str, log) -> dict:
  """Every protocol again on the exact k-reciprocal re-ranked distances (`reranking`), logged
  and written beside the plain report as retrieval_reranked.*; the plain results stay the run's
  record (best checkpoint, curves). Every process computes it whole on its own devices."""
  settings = reranking.RerankSettings(config.rerank.k1, config.rerank.k2,
                                      config.rerank.lambda_value)
  start = time.perf_counter()
  reranked = protocols.evaluate_protocols_reranked(query.model, gallery.model, settings=settings,
                                                   camera_rule=config.camera_rule)
  reranked["baselines"] = results["baselines"]  # the same chance and raw-pixel rows
  log(f"{label}, re-ranked (k1={settings.k1}, k2={settings.k2}, λ={settings.lambda_value}): "
      f"{report.format_headline(reranked)}; {time.perf_counter() - start:.1f} s")
  if out_dir and jax.process_index() == 0:
    report.write_report(reranked, out_dir, prefix=RERANKED_PREFIX, print_table=False)
  return reranked
