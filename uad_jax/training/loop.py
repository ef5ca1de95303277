"""The training loop: prepare WHU-MARS, train UAD, evaluate AS-ReID, checkpoint and resume.

Only the loop lives here; dataset preparation (``data.prepare``), a model's features and metrics
(``evaluation.inference``), checkpoints (``training.checkpointing``), the run's history and curves
(``training.history``) and what reaches the console (``console``) are called from it.
"""
import os
import time

import jax
import numpy as np

from uad_jax import console, sharding
from uad_jax.data import input_pipeline, prepare
from uad_jax.evaluation import inference, report
from uad_jax.training import checkpointing, history, train_state, train_step


def _global_batch(local_batch, batch_sharding):
  """This process's rows → one global array per key, sharded over the data axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k])
          for k in ("images", "labels")}


def evaluation_due(config, epoch: int) -> bool:
  return epoch % config.eval_every_epochs == 0 or epoch == config.optim.epochs


def _evaluate(state, config, mesh, workdir, epoch, log, bars):
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return inference.evaluate_model(state.model, variables, config, mesh,
                                  history.report_dir(workdir, epoch), f"epoch {epoch}", log,
                                  progress=bars)


def train_and_evaluate(config, workdir: str, log=print):
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Process 0 logs with ``log``; with the built-in ``print`` on a terminal it also draws progress
  bars (``console``'s rule).
  """
  bars = console.bars_enabled(log)
  log = console.for_this_process(log)
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
  done = int(np.searchsorted(epoch_ends, step, side="right"))  # completed epochs
  records = history.load(workdir, done)
  images_per_step = plan.sampler.shape.step_rows
  try:
    # The checkpoint precedes the evaluation: one interrupted in between has no report yet.
    if done and evaluation_due(config, done) and not (
        report.report_complete(history.report_dir(workdir, done))):
      log(f"epoch {done}: its evaluation was interrupted; running it again")
      _evaluate(state, config, mesh, workdir, done, log, bars)
      if jax.process_index() == 0 and records:
        history.draw_curves(workdir, records)
    while step < plan.total_steps:
      epoch = int(np.searchsorted(epoch_ends, step, side="right")) + 1
      start, epoch_metrics = time.perf_counter(), []
      bar = console.progress((int(epoch_ends[epoch - 1]) - step) * images_per_step,
                             f"epoch {epoch}/{config.optim.epochs}", enabled=bars)
      with sharding.context(mesh, config.sharding_rules), bar:
        while step < epoch_ends[epoch - 1]:
          state, metrics = step_fn(state, _global_batch(next(train_iter), batch_sharding))
          # Waiting for the previous step keeps one step queued behind the running one, so the
          # bar counts finished steps and input batches cannot pile up on the device. The
          # metrics stay there until the epoch ends.
          if epoch_metrics:
            jax.block_until_ready(epoch_metrics[-1])
          epoch_metrics.append(metrics)
          step += 1
          bar.update(images_per_step)
      count = len(epoch_metrics)
      fetched = jax.device_get(epoch_metrics)
      means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      skipped = sum(int(m["nonfinite"]) for m in fetched)
      if skipped:
        log(f"WARNING: epoch {epoch}: {skipped} step(s) had a non-finite loss and were skipped")
      rate = count * images_per_step / (time.perf_counter() - start)
      log(history.epoch_line(epoch, config.optim.epochs, means, count, rate))
      records.append({"epoch": epoch, **means})
      checkpoints.save(step, state, train_iter.get_state())
      if jax.process_index() == 0:
        history.save(workdir, records)
      if evaluation_due(config, epoch):
        _evaluate(state, config, mesh, workdir, epoch, log, bars)
      if jax.process_index() == 0:  # after the evaluation, so that the curves include it
        history.draw_curves(workdir, records)
  finally:
    # An interrupted run still completes the checkpoint it was writing.
    checkpoints.wait()
    checkpoints.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return state
