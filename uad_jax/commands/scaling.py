"""Identity-count scaling of AS-ReID as one command: a sweep over the number of training
identities, and its table and figure.

  python -m uad_jax.commands.scaling --config=configs/uad.py:synthetic --workdir=workdir/scaling \
      --identities=100,1000,10000 [--collect_only]

Each count N of --identities is one run of the training job (the pretraining stage first when
the config asks for it, as ``commands/train.py`` runs it) in ``workdir/ids_N`` with
``config.dataset.train_identities = N``: nested subsets of one pool of training identities, all
evaluated on one test split. A run whose final report exists is read back, not rerun; an
interrupted one resumes. ``--collect_only`` trains nothing and tabulates the finished runs.

A synthetic config gets one set for the whole sweep: a fixed test split
(``dataset.synthetic_test_ids``; when that is 0, as many test people as the config's own split
gives) and max(N) training identities beside it (``dataset.synthetic_ids`` is set to their sum).

Each run is a process of its own (this command with --point=N), so that the peak memory it
records is its own: the largest ``peak_bytes_in_use`` of its devices' ``memory_stats()``, or,
where the backend keeps none (CPU), the process's peak resident set size, labelled as such.
Writes ``workdir/scaling.md``, ``scaling.json`` and ``scaling.png`` (``scaling_report``).
"""
import os
import resource
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

from configs import common
from uad_jax.commands import common_flags
from uad_jax import console
from uad_jax.commands import scaling_report
from uad_jax.data import prepare
from uad_jax.training import (checkpoint_eval, config_checks, loop, pretrain,
                              stop_requests)
from uad_jax.training import workdir as workdirs

_IDENTITIES = flags.DEFINE_list("identities", ["100", "300", "1000"],
                                "Training identity counts, one run each.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False,
                                  "Train nothing: tabulate the runs that are finished.")
_POINT = flags.DEFINE_integer("point", -1, "Internal, set by the sweep for its processes: 0 "
                              "prepares the data and the pretrained backbone, N trains count N.")


def parse_identities(values) -> list[int]:
  """The sorted distinct counts of --identities; refuses anything but positive integers."""
  try:
    counts = sorted({int(value) for value in values})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise ValueError(f"--identities={','.join(map(str, values))}: expected positive integers, "
                     "e.g. 100,1000,10000")
  return counts


def sweep_config(config, counts):
  """`config` with, for a synthetic set, the sweep's set: fixed test identities and max(counts)
  training identities."""
  d = config.dataset
  if d.synthetic_ids <= 0:
    return config
  test_ids = d.synthetic_test_ids or d.synthetic_ids - prepare.synthetic_train_ids(config)
  return common.replaced(config, {"dataset.synthetic_test_ids": test_ids,
                                  "dataset.synthetic_ids": max(counts) + test_ids})


def describe(config, counts) -> str:
  d = config.dataset
  data = (f"synthetic, {d.synthetic_test_ids} fixed test ids, seed {config.seed}, "
          f"{d.synthetic_difficulty}" + (f", {d.synthetic_train_frames} frame(s) per train id "
                                         f"and camera" if d.synthetic_train_frames else "")
          if d.synthetic_ids else d.config)
  return (f"AS-ReID against training identities ({data}; {config.optim.epochs} epochs, "
          f"{config.model.variant} {config.model.stem} stem, camera rule {config.camera_rule})")


def peak_memory() -> dict:
  """The peak memory of this process's devices, or of the process where devices keep none."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
  if all(peak is not None for peak in peaks):
    return {"peak_bytes_per_device": max(peaks),
            "memory_source": f"device memory_stats() peak_bytes_in_use, the largest of "
                             f"{len(devices)} {devices[0].platform} device(s)"}
  # Linux reports KiB, macOS bytes.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                              else 1024)
  return {"peak_bytes_per_device": rss,
          "memory_source": f"host peak RSS of the run's process, all its {len(devices)} "
                           f"{devices[0].platform} device(s) and the input pipeline together "
                           f"(the backend keeps no device memory stats)"}


def prepare_point(config, workdir: str, counts, log=print) -> None:
  """The sweep's data and pretrained backbone, made once before its runs (refusing counts the
  train split cannot give), and the evaluation of the backbone every run starts from."""
  largest = scaling_report.point_config(sweep_config(config, counts), max(counts))
  config_checks.check(largest)
  largest = pretrain.with_pretrained_backbone(largest, log)
  prepare.prepare_dataset(largest, log)
  if not scaling_report.start_evaluated(workdir):
    checkpoint_eval.evaluate_initial_state(largest, scaling_report.start_dir(workdir), log)


def run_point(config, workdir: str, counts, count: int, log=print) -> None:
  """Trains (or resumes) count `count` in its run folder, and records what it measured."""
  config = scaling_report.point_config(sweep_config(config, counts), count)
  config = pretrain.with_pretrained_backbone(config, log)
  out = scaling_report.run_dir(workdir, count)
  os.makedirs(out, exist_ok=True)
  chosen, available = prepare.train_identities(config)
  scaling_report.write_json(os.path.join(out, scaling_report.IDENTITIES_FILE),
                            {"available": available, "raw_ids": chosen})
  start = time.perf_counter()
  state = loop.train_and_evaluate(config, out, log)
  scaling_report.write_json(os.path.join(out, scaling_report.POINT_FILE), {
      "identities": count, "available": available, "steps": int(state.step),
      "run_s": time.perf_counter() - start, **peak_memory()})


def _run_process(argv, point: int) -> int:
  """This command again, as the process of one point; its exit status."""
  process = subprocess.Popen([sys.executable, "-m", "uad_jax.commands.scaling", *argv,
                              f"--point={point}"])
  # Preemption signals this process: the point's process stops at a step boundary with a
  # checkpoint. Ctrl-C reaches both (one process group): wait for it to do the same.
  previous = signal.signal(signal.SIGTERM, lambda signum, _: process.send_signal(signum))
  try:
    while True:
      try:
        return process.wait()
      except KeyboardInterrupt:
        continue
  finally:
    signal.signal(signal.SIGTERM, previous)


def run_sweep(config, workdir: str, counts, argv, log=print, collect_only: bool = False) -> str:
  """Runs the points of `counts` not finished yet, each in a process of its own started with
  `argv` (this command's flags), unless `collect_only`; writes and returns the table."""
  config = sweep_config(config, counts)
  config_checks.check(scaling_report.point_config(config, max(counts)))
  pending = [count for count in counts
             if not scaling_report.finished(scaling_report.point_config(config, count), workdir,
                                            count)]
  if (pending or not scaling_report.start_evaluated(workdir)) and not collect_only:
    log(f"scaling: {len(pending)} of {len(counts)} runs to train {pending}, after the data and "
        "the starting backbone are ready; one process each")
    for point in [0] + pending:
      status = _run_process(argv, point)
      if status:
        what = ("preparing the data and the starting backbone" if point == 0 else
                f"the run of {point} identities")
        raise SystemExit(status if status > 128 else
                         f"error: {what} failed (exit status {status}); rerun to resume")
  collected = scaling_report.collect(config, workdir, counts)
  table = scaling_report.write(collected, workdir, describe(config, counts))
  log(table + f"figure: {os.path.join(workdir, scaling_report.FIGURE_FILE)}")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries_unless_asked()
  try:
    counts = parse_identities(_IDENTITIES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  workdir = common_flags.workdir("workdir/scaling")
  try:
    if _POINT.value == 0:
      prepare_point(common_flags.CONFIG.value, workdir, counts)
    elif _POINT.value > 0:
      run_point(common_flags.CONFIG.value, workdir, counts, _POINT.value)
    else:
      forwarded = [arg for arg in sys.argv[1:]
                   if not arg.startswith(("--point", "--collect_only", "--nocollect_only"))]
      run_sweep(common_flags.CONFIG.value, workdir, counts, forwarded,
                collect_only=_COLLECT_ONLY.value)
  except config_checks.ConfigError as e:  # the flags' fault: absl shows the usage, no traceback
    raise app.UsageError(str(e)) from e
  except stop_requests.StopRequested as stop:  # the loop has said where it stopped
    sys.exit(stop.exit_status)
  except (workdirs.WorkdirBusy, workdirs.ConfigChanged, loop.NonFiniteTraining) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
