"""Trains and evaluates UAD: flags only; the job is uad_jax.training.loop.train_and_evaluate.

  python run.py --config=configs/uad.py:synthetic --workdir=workdir/synthetic
  python run.py --config=configs/uad.py:whumars2337 --workdir=… \\
      --config.dataset.manual_dir=/data/raw --config.pretrained=jx_vit_base_p16_224-80ecf9dd.pth

  python run.py --config=configs/uad.py:synthetic --workdir=workdir/synthetic --mode=eval \
      --checkpoint=best

(``python -m uad_jax.commands.train`` is the same command.)

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
from ml_collections import config_flags

from uad_jax import console
from uad_jax.training import (checkpoint_eval, config_checks, loop, pretrain,
                              stop_requests)
from uad_jax.training import workdir as workdirs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/uad.py:synthetic",
                                          "Config file and its argument.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/synthetic",
                               "Checkpoints, evaluation reports and logs go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume) and evaluate; eval: evaluate one checkpoint "
                          "of --workdir and write its reports to eval_stepNNNNNN/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest",
                                  "With --mode=eval: latest, best (by AS-ReID mAP) or a step.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries_unless_asked()
  try:
    config_checks.check(_CONFIG.value)
  except config_checks.ConfigError as e:  # the flags' fault: absl shows the usage, no traceback
    raise app.UsageError(str(e)) from e
  try:
    if _MODE.value == "eval":
      checkpoint_eval.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
    else:
      config = pretrain.with_pretrained_backbone(_CONFIG.value)
      loop.train_and_evaluate(config, _WORKDIR.value)
  except stop_requests.StopRequested as stop:  # the loop has said where it stopped
    sys.exit(stop.exit_status)
  except (workdirs.WorkdirBusy, workdirs.ConfigChanged, loop.NonFiniteTraining) as e:
    # Situations, not bugs: the message says what to do, a traceback would bury it.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
