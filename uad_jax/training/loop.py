"""The training loop: prepare WHU-MARS, train UAD, evaluate AS-ReID, checkpoint and resume.

Only the loop lives here; the config's checks (``training.config_checks``), the workdir's lock and
config record (``training.workdir``), dataset preparation (``data.prepare``), a model's features
and metrics (``evaluation.inference``), checkpoints (``training.checkpointing``), the run's history
and curves (``training.history``), metric files (``training.metric_writers``), signals
(``training.stop_requests``) and what reaches the console (``console``) are called from it.

Positions: ``state.step`` counts every step taken, skipped ones included; it names the checkpoint
and fixes the data position and the epoch, so a resumed run replays nothing and skips nothing.
"""
import dataclasses
import math
import os
import time

import jax
import numpy as np

from uad_jax import console, numerics, sharding
from uad_jax.data import input_pipeline, prepare
from uad_jax.evaluation import inference, report
from uad_jax.training import (checkpointing, config_checks, history, metric_writers,
                              stop_requests, train_state, train_step)
from uad_jax.training import workdir as workdirs


class NonFiniteTraining(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient, or the parameters overflowed."""


def _global_batch(local_batch, batch_sharding):
  """This process's rows of what the step reads → one global array per key, sharded over the
  data axis; the pipeline's other keys (modalities, cameras) never leave the host."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in local_batch.items() if k in train_step.INPUT_KEYS}


def evaluation_due(config, epoch: int) -> bool:
  return epoch % config.eval_every_epochs == 0 or epoch == config.optim.epochs


@dataclasses.dataclass
class _Run:
  """What the loop's steps share: the settings, the places it writes, and the position."""
  config: object
  workdir: str
  log: object
  bars: bool
  mesh: object
  checkpoints: checkpointing.Checkpointer
  writer: metric_writers.MetricWriter
  stops: stop_requests.StopRequests
  epoch_ends: np.ndarray
  images_per_step: int
  nonfinite_run: list          # the steps of the current run of consecutive skipped steps
  window_start: float = 0.0    # when the current logging window of steps began
  window_steps: int = 0        # steps taken since

  def open_window(self) -> None:
    self.window_start, self.window_steps = time.perf_counter(), 0

  def completed_epochs(self, step: int) -> int:
    return int(np.searchsorted(self.epoch_ends, step, side="right"))

  def take(self, step: int, metrics, epoch_steps: list) -> None:
    """Step `step`'s metrics (its number counted from 1), fetched once the next step runs."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    epoch_steps.append(m)
    if m["nonfinite"]:
      self.nonfinite_run.append(step)
      self.log(f"WARNING: step {step}: non-finite loss or gradient "
               f"(loss {m['loss/total']:.4g}, grad norm {m['grad_norm']:.4g}); step skipped")
      if len(self.nonfinite_run) >= self.config.max_nonfinite_steps:
        raise NonFiniteTraining(
            f"steps {self.nonfinite_run[0]}–{self.nonfinite_run[-1]}: "
            f"{len(self.nonfinite_run)} consecutive non-finite steps "
            f"(config.max_nonfinite_steps={self.config.max_nonfinite_steps}); stopping. "
            f"{self._last_good()} Lower config.optim.lr_per_replica or check the data.")
    else:
      self.nonfinite_run.clear()
    self.window_steps += 1
    if step % self.config.log_every_steps == 0:
      rate = self.window_steps * self.images_per_step / (time.perf_counter() - self.window_start)
      self.open_window()
      self.writer.write_scalars(step, {**{k: v for k, v in m.items() if k != "nonfinite"},
                                       "images_per_s": rate})

  def _last_good(self) -> str:
    last = self.checkpoints.latest_step()
    return (f"The last good checkpoint is step {last} in {self.checkpoints.directory}."
            if last is not None else "No checkpoint was written yet.")

  def save(self, step: int, state, train_iter, epoch_steps=None) -> None:
    """A checkpoint of this position; never one of non-finite parameters."""
    if not bool(numerics.all_finite(state.params)):
      raise NonFiniteTraining(f"step {step}: the parameters hold non-finite values and are not "
                              f"saved. {self._last_good()} Lower config.optim.lr_per_replica.")
    extra = {"nonfinite_run": self.nonfinite_run}
    if epoch_steps:  # a stop mid-epoch: the resumed epoch's means need its steps so far
      extra["epoch_steps"] = epoch_steps
    self.checkpoints.save(step, state, train_iter.get_state(), extra)

  def evaluate(self, state, epoch: int, step: int) -> None:
    # The epoch's checkpoint is made durable first: a run killed during a long evaluation then
    # loses only the evaluation, which runs again on resume, never the epoch's training.
    self.checkpoints.wait()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    with self.stops.at_once():
      results = inference.evaluate_model(state.model, variables, self.config, self.mesh,
                                         history.report_dir(self.workdir, epoch), f"epoch {epoch}",
                                         self.log, progress=self.bars)
    self.checkpoints.record_metric(step, report.as_reid(results)["mAP"])
    self.writer.write_scalars(step, metric_writers.evaluation_scalars(results))


def prepared_plan(config, log):
  """The dataset built (by process 0), its training plan, the identity count and the mesh, with
  every check that needs them made before any compilation (the mesh's before any data)."""
  mesh = sharding.make_mesh(config.mesh)
  data_parts = mesh.shape[sharding.DATA]
  step_rows = math.prod((config.num_replicas, config.sampler.modalities,
                         config.sampler.identities, config.sampler.instances))
  for what, rows in (("the global batch R·M·P·K", step_rows),
                     ("config.eval_batch_size", config.eval_batch_size)):
    if rows % data_parts:
      raise ValueError(f"{what} = {rows} is not divisible by the {data_parts} devices of the "
                       f"data axis (config.mesh={tuple(config.mesh)})")
    # Each process loads its own rows of every batch; the mesh must put those rows on its devices.
    try:
      sharding.check_process_batches(mesh, rows, what)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.mesh={tuple(config.mesh)}: {e}") from None
  if jax.process_index() == 0:
    prepare.prepare_dataset(config, log)
  if jax.process_count() > 1:  # the other hosts read what process 0 built
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("whu_mars prepared")
  plan = input_pipeline.train_plan_from_config(config,
                                               missing_modality=config.missing_modality)
  assert plan.sampler.shape.step_rows == step_rows, "the sampler's batch is not R·M·P·K"
  num_classes = config.num_classes or plan.num_classes
  if num_classes < plan.num_classes:
    raise ValueError(f"config.num_classes={config.num_classes} but the train split has "
                     f"{plan.num_classes} identities")
  return plan, num_classes, mesh


def train_and_evaluate(config, workdir: str, log=print):
  """Trains ``config`` in ``workdir``, resuming from its latest intact checkpoint if there is one.

  Process 0 logs with ``log``; with the built-in ``print`` on a terminal it also draws progress
  bars (``console``'s rule). SIGTERM or SIGINT stop the run at the next step boundary with a
  checkpoint of that position (``stop_requests.StopRequested``).
  """
  config_checks.check(config)
  bars = console.bars_enabled(log)
  log = console.for_this_process(log)
  os.makedirs(workdir, exist_ok=True)
  with workdirs.lock(workdir, jax.process_index()), stop_requests.StopRequests() as stops:
    return _train(config, workdir, log, bars, stops)


def _train(config, workdir, log, bars, stops):
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           keep=config.keep_checkpoints)
  checkpoints.check_writable()
  # Every process compares (all of them stop on a refused change); the writes are atomic.
  changed = workdirs.record_config(workdir, config, resuming=checkpoints.latest_step() is not None)
  if changed:
    log("resuming with changed settings that do not change training: "
        + ", ".join(map(str, changed)))
  plan, num_classes, mesh = prepared_plan(config, log)
  state, shardings = train_state.create_train_state(config, num_classes, plan.steps_per_epoch,
                                                    mesh, log=log)
  log(f"{num_classes} identities, {plan.total_steps} steps over {config.optim.epochs} epochs, "
      f"mesh {dict(mesh.shape)}")
  train_iter = iter(input_pipeline.train_dataset_from_config(
      config, plan, process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data_workers, num_threads=config.data_threads))
  extra = {}
  restored = checkpoints.restore_latest_intact(checkpointing.abstract_state(state, shardings),
                                               log)
  if restored is not None:
    state, extra = restored.state, restored.extra or {}
    train_iter.set_state(restored.data_state)
    log(f"resumed from step {restored.step}")
  step = int(state.step)
  run = _Run(config, workdir, log, bars, mesh, checkpoints,
             metric_writers.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                         resume_step=step),
             stops, np.cumsum(plan.steps_per_epoch), plan.sampler.shape.step_rows,
             list(extra.get("nonfinite_run", [])))
  step_fn = train_step.jit_train_step(shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  done = run.completed_epochs(step)
  records = history.load(workdir, done)
  epoch_steps = list(extra.get("epoch_steps") or [])  # of an epoch stopped midway
  try:
    # The checkpoint precedes the evaluation: one interrupted in between has no report yet.
    if (done and evaluation_due(config, done)
        and not report.report_complete(history.report_dir(workdir, done))):
      log(f"epoch {done}: its evaluation was interrupted; running it again")
      run.evaluate(state, done, step)
      if jax.process_index() == 0 and records:
        history.draw_curves(workdir, records)
    while step < run.epoch_ends[-1]:
      epoch = run.completed_epochs(step) + 1
      end = int(run.epoch_ends[epoch - 1])
      run.open_window()
      start = run.window_start
      steps_before = len(epoch_steps)
      bar = console.progress((end - step) * run.images_per_step,
                             f"epoch {epoch}/{config.optim.epochs}", enabled=bars)
      with sharding.context(mesh, config.sharding_rules), bar:
        pending = None
        while step < end:
          state, metrics = step_fn(state, _global_batch(next(train_iter), batch_sharding))
          # Fetching the previous step's metrics keeps one step queued behind the running one,
          # so the bar counts finished steps and input batches cannot pile up on the device.
          if pending is not None:
            run.take(*pending, epoch_steps)
          step += 1
          pending = (step, metrics)
          bar.update(run.images_per_step)
          run.checkpoints.check()   # a save that failed in the background (disk full) stops now
          signum = stops.pending()
          if signum and step < end:
            run.take(*pending, epoch_steps)
            _stop(run, signum, step, epoch, state, train_iter, epoch_steps)
        run.take(*pending, epoch_steps)
      means = history.epoch_means(epoch_steps)
      if means["skipped_steps"]:
        log(f"WARNING: epoch {epoch}: {means['skipped_steps']} step(s) had a non-finite loss "
            "or gradient and were skipped; the means are over the others")
      rate = (len(epoch_steps) - steps_before) * run.images_per_step / (
          time.perf_counter() - start)
      log(history.epoch_line(epoch, config.optim.epochs, means, len(epoch_steps), rate))
      records.append({"epoch": epoch, **means})
      run.save(step, state, train_iter)
      epoch_steps = []
      if jax.process_index() == 0:
        history.save(workdir, records)
      if evaluation_due(config, epoch):
        run.evaluate(state, epoch, step)
      if jax.process_index() == 0:  # after the evaluation, so that the curves include it
        history.draw_curves(workdir, records)
      signum = stops.pending()
      if signum and step < run.epoch_ends[-1]:
        _stop(run, signum, step, epoch + 1, None, None, None)
  finally:
    # An interrupted run still completes the checkpoint it was writing.
    checkpoints.wait()
    checkpoints.close()
    run.writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return state


def _stop(run, signum, step, epoch, state, train_iter, epoch_steps):
  """Ends the run at this step boundary, with a checkpoint of it unless one was just written."""
  name = stop_requests.NAMES[signum]
  if state is not None:
    run.save(step, state, train_iter, epoch_steps)
    where = f"in epoch {epoch} at step {step}"
  else:
    where = f"before epoch {epoch}, at step {step}"
  run.checkpoints.wait()
  message = (f"stopped by {name} {where}; checkpoint {run.checkpoints.directory}/{step} "
             "written. Run the same command again to resume.")
  run.log(message)
  raise stop_requests.StopRequested(message, signum)
