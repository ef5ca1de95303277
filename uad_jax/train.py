"""The main job: prepare WHU-MARS, train UAD, evaluate AS-ReID, checkpoint and resume.

``run.py`` holds the flags only; everything here is importable and testable.
"""
import functools
import json
import os
import time

import jax
import numpy as np

from uad_jax import (checkpointing, evaluation_protocols, evaluation_report, input_pipeline,
                     sharding, train_state, train_step)


def prepare_dataset(config, log=print) -> None:
  """Builds the TFDS dataset if needed; for the synthetic preset, writes the raw set first."""
  from tfds_whumars import build, synthetic
  from tfds_whumars.whu_mars import whu_mars_dataset_builder
  raw_folder = whu_mars_dataset_builder.Builder.builder_configs[config.dataset.config].raw_folder
  raw_root = os.path.join(config.dataset.manual_dir, raw_folder)
  if config.dataset.synthetic_ids > 0 and not os.path.isdir(raw_root):
    log(f"writing a synthetic WHU-MARS of {config.dataset.synthetic_ids} identities to {raw_root}")
    synthetic.generate(config.dataset.manual_dir, config.dataset.synthetic_ids, config.seed,
                       root_name=raw_folder)
  builder = build.build(config.dataset.config, config.dataset.manual_dir,
                        config.dataset.data_dir)
  log(build.summary(builder))


def _global_batch(local_batch, batch_sharding):
  """This process's rows → one global array per key, sharded over the data axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k])
          for k in ("images", "labels")}


@functools.lru_cache(maxsize=4)
def _inference_fn(model, mesh):
  """The jitted inference forward, compiled once per model and mesh for the whole run."""
  return jax.jit(lambda params, images: model.apply({"params": params}, images, train=False),
                 out_shardings=sharding.replicated(mesh))


def extract_features(state, config, split_dataset, mesh) -> evaluation_protocols.RetrievalSide:
  """Pre-BN global features of every record of an eval split, with its metadata (NumPy)."""
  batch_sharding = sharding.batch_sharding(mesh)
  infer = _inference_fn(state.model, mesh)
  feats, meta = [], {k: [] for k in ("person_ids", "cameras", "modalities", "viewpoints")}
  with sharding.context(mesh, config.sharding_rules):
    for batch in split_dataset:
      images = jax.make_array_from_process_local_data(batch_sharding, batch["images"])
      out = np.asarray(jax.device_get(infer(state.params, images)))
      mask = _gather_rows(batch["mask"])
      feats.append(out[mask])
      for k in meta:
        meta[k].append(_gather_rows(batch[k])[mask])
  meta = {k: np.concatenate(v) for k, v in meta.items()}
  return evaluation_protocols.RetrievalSide(
      feats=np.concatenate(feats), ids=meta["person_ids"], cams=meta["cameras"],
      modalities=meta["modalities"], viewpoints=meta["viewpoints"])


def _gather_rows(local):
  """The global rows of a per-process metadata array (every process gets them all)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def report_dir(workdir: str, epoch: int) -> str:
  return os.path.join(workdir, f"eval_epoch{epoch:03d}")


def evaluation_due(config, epoch: int) -> bool:
  return epoch % config.eval_every_epochs == 0 or epoch == config.optim.epochs


def evaluate_state(state, config, mesh, workdir, epoch, log=print):
  datasets = input_pipeline.eval_datasets_from_config(
      config, config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data_threads)
  start = time.perf_counter()
  query = extract_features(state, config, datasets["query"], mesh)
  gallery = extract_features(state, config, datasets["gallery"], mesh)
  features_s = time.perf_counter() - start
  results = evaluation_protocols.evaluate_protocols(query, gallery,
                                                    camera_rule=config.camera_rule)
  log(f"epoch {epoch}: {len(query.feats)} queries x {len(gallery.feats)} gallery, features "
      f"{features_s:.1f} s, metrics {time.perf_counter() - start - features_s:.1f} s\n"
      + evaluation_report.format_table(results))
  if jax.process_index() == 0:
    evaluation_report.write_report(results, report_dir(workdir, epoch), print_table=False)
  return results


def train_and_evaluate(config, workdir: str, log=print):
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    prepare_dataset(config, log)
  if jax.process_count() > 1:  # the other hosts read what process 0 built
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("whu_mars prepared")
  plan = input_pipeline.train_plan_from_config(config,
                                               missing_modality=config.missing_modality)
  num_classes = config.num_classes or plan.num_classes
  if num_classes < plan.num_classes:
    raise ValueError(f"config.num_classes={config.num_classes} but the train split has "
                     f"{plan.num_classes} identities")
  mesh = sharding.make_mesh(config.mesh)
  data_parts = mesh.shape[sharding.DATA]
  for what, rows in (("the global batch R·M·P·K", plan.sampler.shape.step_rows),
                     ("config.eval_batch_size", config.eval_batch_size)):
    if rows % data_parts:
      raise ValueError(f"{what} = {rows} is not divisible by the {data_parts} devices of the "
                       f"data axis (config.mesh={tuple(config.mesh)})")
  state, shardings = train_state.create_train_state(config, num_classes, plan.steps_per_epoch,
                                                    mesh, log=log)
  log(f"{num_classes} identities, {plan.total_steps} steps over {config.optim.epochs} epochs, "
      f"mesh {dict(mesh.shape)}")
  train_iter = iter(input_pipeline.train_dataset_from_config(
      config, plan, process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data_workers, num_threads=config.data_threads))
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  if checkpoints.latest_step() is not None:
    state, data_state = checkpoints.restore(checkpointing.abstract_state(state, shardings))
    train_iter.set_state(data_state)
    log(f"resumed from step {int(state.step)}")
  step_fn = train_step.jit_train_step(shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  epoch_ends = np.cumsum(plan.steps_per_epoch)
  step = int(state.step)
  history_path = os.path.join(workdir, "train_history.json")
  history = []
  done = int(np.searchsorted(epoch_ends, step, side="right"))  # completed epochs
  if step and os.path.exists(history_path):
    with open(history_path) as f:
      history = [h for h in json.load(f) if h["epoch"] <= done]
  try:
    # The checkpoint precedes the evaluation: one interrupted in between has no report yet.
    if done and evaluation_due(config, done) and not os.path.exists(
        os.path.join(report_dir(workdir, done), "retrieval.json")):
      log(f"epoch {done}: its evaluation was interrupted; running it again")
      evaluate_state(state, config, mesh, workdir, done, log)
    while step < plan.total_steps:
      epoch = int(np.searchsorted(epoch_ends, step, side="right")) + 1
      start, epoch_metrics = time.perf_counter(), []
      with sharding.context(mesh, config.sharding_rules):
        while step < epoch_ends[epoch - 1]:
          state, metrics = step_fn(state, _global_batch(next(train_iter), batch_sharding))
          epoch_metrics.append(metrics)  # fetched once per epoch: steps dispatch asynchronously
          step += 1
      count = len(epoch_metrics)
      fetched = jax.device_get(epoch_metrics)
      means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      skipped = sum(int(m["nonfinite"]) for m in fetched)
      if skipped:
        log(f"WARNING: epoch {epoch}: {skipped} step(s) had a non-finite loss and were skipped")
      rate = count * plan.sampler.shape.step_rows / (time.perf_counter() - start)
      log(f"epoch {epoch}/{config.optim.epochs} ({count} steps, {rate:.1f} img/s): "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items())))
      history.append({"epoch": epoch, **means})
      checkpoints.save(step, state, train_iter.get_state())
      if jax.process_index() == 0:
        text = json.dumps(history, indent=1).encode()
        evaluation_report.write_atomically(history_path, lambda f: f.write(text))
      if evaluation_due(config, epoch):
        evaluate_state(state, config, mesh, workdir, epoch, log)
  finally:
    # An interrupted run still completes the checkpoint it was writing.
    checkpoints.wait()
    checkpoints.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return state
