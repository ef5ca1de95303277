"""Runs the training loop in a process of its own, with faults injected where a test asks.

  python tests/loop_driver.py SPEC.json

SPEC: {"workdir", "config": {dotted field: value}, "cache_dir", "dump": path for the final state
(.npz) when the run ends normally, and any of the faults below}. Faults are counted in steps as
the loop counts them (the n-th step taken, from 1) and in epochs:
  sigkill_after_step n     SIGKILL while step n runs (dispatched, not finished)
  sigterm_after_step n     SIGTERM to itself while step n runs (the loop stops after it)
  sigkill_in_save n        SIGKILL while the checkpoint of step n is being written
  sigkill_in_eval e        SIGKILL in epoch e's evaluation, between the query and gallery sides
  sigkill_after_epoch e    SIGKILL once epoch e is over (saved, evaluated, curves drawn)
  nan_steps [n, …]         NaN images in the batch of each of these steps
The loop's own code is untouched: faults wrap the functions it calls.
"""
import json
import os
import signal
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from uad_jax.evaluation import inference  # noqa: E402
from uad_jax.testing import configs, faults  # noqa: E402
from uad_jax.training import (checkpointing, history, loop, stop_requests,  # noqa: E402
                              train_step)


def _die(signum=signal.SIGKILL):
  sys.stdout.flush()
  os.kill(os.getpid(), signum)


def state_arrays(state) -> dict:
  state = jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _inject(spec):
  jit_step = train_step.jit_train_step

  def faulty_jit_step(*args, **kwargs):
    step_fn = jit_step(*args, **kwargs)

    def run(state, batch):
      n = int(state.step) + 1
      if n in spec.get("nan_steps", ()):
        batch = faults.nan_images(batch)
      out = step_fn(state, batch)
      if n == spec.get("sigkill_after_step"):
        _die()
      if n == spec.get("sigterm_after_step"):
        _die(signal.SIGTERM)
      return out
    return run
  train_step.jit_train_step = faulty_jit_step

  save = checkpointing.Checkpointer.save

  def faulty_save(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == spec.get("sigkill_in_save"):
      _die()                                  # the asynchronous write is still in flight
  checkpointing.Checkpointer.save = faulty_save

  evaluate_model, extract = inference.evaluate_model, inference.extract_features
  sides = []

  def faulty_evaluate_model(*args, **kwargs):
    sides.clear()
    sides.append(args[5] if len(args) > 5 else kwargs["label"])
    return evaluate_model(*args, **kwargs)

  def faulty_extract(*args, **kwargs):
    result = extract(*args, **kwargs)
    sides.append("side")
    if sides[0] == f"epoch {spec.get('sigkill_in_eval')}" and len(sides) == 2:
      _die()                                  # the query side done, the gallery side not
    return result
  inference.evaluate_model, inference.extract_features = faulty_evaluate_model, faulty_extract

  draw = history.draw_curves

  def faulty_draw(workdir, records):
    draw(workdir, records)
    if records and records[-1]["epoch"] == spec.get("sigkill_after_epoch"):
      _die()
  history.draw_curves = faulty_draw


def main(path):
  with open(path) as f:
    spec = json.load(f)
  jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  _inject(spec)
  try:
    state = loop.train_and_evaluate(configs.with_fields(spec["config"]), spec["workdir"])
  except stop_requests.StopRequested as stop:
    sys.exit(stop.exit_status)
  np.savez(spec["dump"], **state_arrays(state))


if __name__ == "__main__":
  main(sys.argv[1])
