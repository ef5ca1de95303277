"""One process of a multi-process training run on CPU devices, as a pod host would run it.

  python tests/multiprocess_driver.py SPEC.json PROCESS_ID

SPEC: {"workdir", "config": {dotted field: value}, "cache_dir", "devices": CPU devices of this
process, "num_processes", "coordinator": "127.0.0.1:PORT" (with more than one process), and
optionally "sigterm": {"process": i, "after_step": n} (SIGTERM to process i while step n runs,
as a preempted host gets it) and "probe": a JSON path where process 0 writes `probe_results`,
computed by every process together}. Exit status: the loop's (0, or 128+signal after a stop), 3
when the config is refused.
"""
import json
import os
import signal
import sys

if __name__ == "__main__":   # (the test imports `probe_results` from here)
  with open(sys.argv[1]) as f:
    SPEC = json.load(f)
  # Before JAX is imported: this process's own devices (the parent's test set-up has 8).
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={SPEC['devices']}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from uad_jax import distributed  # noqa: E402
from uad_jax.evaluation import metrics  # noqa: E402
from uad_jax.testing import configs  # noqa: E402
from uad_jax.training import config_checks, loop, stop_requests, train_step  # noqa: E402


def probe_results() -> list:
  """`metrics.evaluate` of fixed features: 41 queries, and a single one (a process without a
  share), as JSON-ready dicts."""
  rng = np.random.default_rng(7)
  q_feats, g_feats = rng.normal(size=(41, 8)), rng.normal(size=(150, 8))
  q_ids, g_ids = rng.integers(0, 9, 41), rng.integers(0, 9, 150)
  q_cams, g_cams = rng.integers(0, 6, 41), rng.integers(0, 6, 150)
  results = [metrics.evaluate(q_feats[rows], g_feats, q_ids[rows], g_ids, q_cams[rows], g_cams,
                              max_rank=10) for rows in (slice(None), slice(0, 1))]
  return json.loads(json.dumps(results, default=lambda x: np.asarray(x).tolist()))


def _sigterm_at(step_to_stop: int):
  jit_step = train_step.jit_train_step

  def signalled_jit_step(*args, **kwargs):
    step_fn = jit_step(*args, **kwargs)

    def run(state, batch):
      n = int(state.step) + 1          # read before the step donates the state
      out = step_fn(state, batch)
      if n == step_to_stop:
        os.kill(os.getpid(), signal.SIGTERM)   # handled at the step boundary, like preemption
      return out
    return run
  train_step.jit_train_step = signalled_jit_step


def main(spec: dict, process_id: int):
  jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if spec["num_processes"] > 1:
    distributed.initialize("on", coordinator_address=spec["coordinator"],
                           num_processes=spec["num_processes"], process_id=process_id,
                           initialization_timeout=60)
  else:
    distributed.initialize("off")
  assert jax.process_count() == spec["num_processes"] and jax.process_index() == process_id
  sigterm = spec.get("sigterm")
  if sigterm and sigterm["process"] == process_id:
    _sigterm_at(sigterm["after_step"])
  try:
    loop.train_and_evaluate(configs.with_fields(spec["config"]), spec["workdir"])
  except stop_requests.StopRequested as stop:
    sys.exit(stop.exit_status)
  except config_checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if spec.get("probe"):
    results = probe_results()
    if process_id == 0:
      with open(spec["probe"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
  main(SPEC, int(sys.argv[2]))
