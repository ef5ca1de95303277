"""Features and metrics of a model on the eval splits: what training, evaluation of a checkpoint
and the retrieval tools share. Every process feeds its slice of each batch; features and metadata
come back whole to every process."""
import functools
import time

import jax
import numpy as np

from uad_jax import sharding
from uad_jax.data import input_pipeline
from uad_jax.evaluation import protocols, report


@functools.lru_cache(maxsize=4)
def _inference_fn(model, mesh):
  """The jitted inference forward, compiled once per model and mesh for the whole run."""
  return jax.jit(lambda params, images: model.apply({"params": params}, images, train=False),
                 out_shardings=sharding.replicated(mesh))


def extract_features(model, params, config, split_dataset, mesh) -> protocols.RetrievalSide:
  """Pre-BN global features of every record of an eval split, with its metadata (NumPy)."""
  batch_sharding = sharding.batch_sharding(mesh)
  infer = _inference_fn(model, mesh)
  feats, meta = [], {k: [] for k in ("person_ids", "cameras", "modalities", "viewpoints")}
  with sharding.context(mesh, config.sharding_rules):
    for batch in split_dataset:
      images = jax.make_array_from_process_local_data(batch_sharding, batch["images"])
      out = np.asarray(jax.device_get(infer(params, images)))
      mask = _gather_rows(batch["mask"])
      feats.append(out[mask])
      for k in meta:
        meta[k].append(_gather_rows(batch[k])[mask])
  meta = {k: np.concatenate(v) for k, v in meta.items()}
  return protocols.RetrievalSide(
      feats=np.concatenate(feats), ids=meta["person_ids"], cams=meta["cameras"],
      modalities=meta["modalities"], viewpoints=meta["viewpoints"])


def _gather_rows(local):
  """The global rows of a per-process metadata array (every process gets them all)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def evaluate_model(model, params, config, mesh, out_dir: str | None, label: str, log=print):
  """Every protocol of ``config``'s test split for this model; the report goes to ``out_dir``
  (process 0 writes it). ``label`` starts the logged summary (e.g. "epoch 10")."""
  datasets = input_pipeline.eval_datasets_from_config(
      config, config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data_threads)
  start = time.perf_counter()
  query = extract_features(model, params, config, datasets["query"], mesh)
  gallery = extract_features(model, params, config, datasets["gallery"], mesh)
  features_s = time.perf_counter() - start
  results = protocols.evaluate_protocols(query, gallery, camera_rule=config.camera_rule)
  log(f"{label}: {len(query.feats)} queries x {len(gallery.feats)} gallery, features "
      f"{features_s:.1f} s, metrics {time.perf_counter() - start - features_s:.1f} s\n"
      + report.format_table(results))
  if out_dir and jax.process_index() == 0:
    report.write_report(results, out_dir, print_table=False)
  return results
