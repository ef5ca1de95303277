"""Trains and evaluates UAD: flags only; the job is uad_jax.training.loop.train_and_evaluate.

  python run.py --config=configs/uad.py:synthetic --workdir=workdir/synthetic
  python run.py --config=configs/uad.py:whumars2337 --workdir=… \\
      --config.dataset.manual_dir=/data/raw --config.pretrained=jx_vit_base_p16_224-80ecf9dd.pth

  python run.py --config=configs/uad.py:synthetic --workdir=workdir/synthetic --mode=eval \
      --checkpoint=best

(``python -m uad_jax.commands.train`` is the same command.)

Several processes (a TPU pod slice, multi-GPU hosts) run the same command on every host;
``--distributed`` (``uad_jax.distributed``) joins them into one job before JAX starts: by default
when JAX detects a cluster of several processes (TPU, SLURM, Open MPI) or when
``--coordinator_address``, ``--num_processes`` and ``--process_id`` say where and who. Data and
workdir must then be on a filesystem every host shares.

A rerun of the same command resumes from the latest intact checkpoint. SIGTERM (preemption) or
Ctrl-C stops the run at the next step boundary with a checkpoint of it, exit status 128+signal;
a second Ctrl-C stops at once.

The console shows the job's own lines: the dataset, one line per epoch, each evaluation's
headline; on a terminal, progress bars too (``uad_jax.console``). Libraries log warnings and
errors only; absl's ``--verbosity=0`` (``-v 0``) brings back their INFO lines (Orbax, TFDS and its
progress bars, JAX), ``-v 1`` adds DEBUG.
"""
import sys

from absl import app
from absl import flags

from uad_jax.commands import common_flags
from uad_jax import console, distributed
from uad_jax.training import (checkpoint_eval, config_checks, loop, pretrain,
                              stop_requests)
from uad_jax.training import workdir as workdirs

_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume) and evaluate; eval: evaluate one checkpoint "
                          "of --workdir and write its reports to eval_stepNNNNNN/.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "Join other processes with jax.distributed: auto (when the flags below are given or a "
    "cluster of several processes is detected: TPU, SLURM, Open MPI), on, off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process (else found "
    "by JAX's cluster detection or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 … "
                                   "num_processes-1.", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Device ids this process uses (e.g. 0,1,2,3,4,5,6,7 for all GPUs "
    "of a host when SLURM starts one process per host; JAX otherwise gives it one GPU).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries_unless_asked()
  _join_other_processes()  # before anything starts a JAX backend
  console.quiet_other_processes()
  try:
    config_checks.check(common_flags.CONFIG.value)
  except config_checks.ConfigError as e:  # the flags' fault: absl shows the usage, no traceback
    raise app.UsageError(str(e)) from e
  workdir = common_flags.workdir("workdir/synthetic")
  try:
    if _MODE.value == "eval":
      checkpoint_eval.evaluate_checkpoint(common_flags.CONFIG.value, workdir,
                                          common_flags.CHECKPOINT.value)
    else:
      config = pretrain.with_pretrained_backbone(common_flags.CONFIG.value,
                                                 console.for_this_process(print))
      loop.train_and_evaluate(config, workdir)
  except stop_requests.StopRequested as stop:  # the loop has said where it stopped
    sys.exit(stop.exit_status)
  except (workdirs.WorkdirBusy, workdirs.ConfigChanged, loop.NonFiniteTraining,
          config_checks.ConfigError) as e:
    # Situations, not bugs: the message says what to do, a traceback would bury it.
    sys.exit(f"error: {e}")


def _join_other_processes():
  ids = _LOCAL_DEVICE_IDS.value
  try:
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           local_device_ids=None if ids is None else [int(i) for i in ids])
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
