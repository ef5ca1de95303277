"""The training loop: prepare WHU-MARS, train UAD, evaluate AS-ReID, checkpoint and resume.

Only the loop lives here; dataset preparation (``data.prepare``), a model's features and metrics
(``evaluation.inference``) and checkpoints (``training.checkpointing``) are called from it.
"""
import json
import os
import time

import jax
import numpy as np

from uad_jax import sharding
from uad_jax.data import input_pipeline, prepare
from uad_jax.evaluation import inference, report
from uad_jax.training import checkpointing, train_state, train_step


def _global_batch(local_batch, batch_sharding):
  """This process's rows → one global array per key, sharded over the data axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k])
          for k in ("images", "labels")}


def report_dir(workdir: str, epoch: int) -> str:
  return os.path.join(workdir, f"eval_epoch{epoch:03d}")


def evaluation_due(config, epoch: int) -> bool:
  return epoch % config.eval_every_epochs == 0 or epoch == config.optim.epochs


def _evaluate(state, config, mesh, workdir, epoch, log):
  return inference.evaluate_model(state.model, state.params, config, mesh,
                                  report_dir(workdir, epoch), f"epoch {epoch}", log)


def train_and_evaluate(config, workdir: str, log=print):
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    prepare.prepare_dataset(config, log)
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
    if done and evaluation_due(config, done) and not (
        report.report_complete(report_dir(workdir, done))):
      log(f"epoch {done}: its evaluation was interrupted; running it again")
      _evaluate(state, config, mesh, workdir, done, log)
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
        report.write_atomically(history_path, lambda f: f.write(text))
      if evaluation_due(config, epoch):
        _evaluate(state, config, mesh, workdir, epoch, log)
  finally:
    # An interrupted run still completes the checkpoint it was writing.
    checkpoints.wait()
    checkpoints.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return state
