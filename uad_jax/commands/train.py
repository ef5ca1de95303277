"""Trains and evaluates UAD: flags only; the job is uad_jax.training.loop.train_and_evaluate.

  python run.py --config=configs/uad.py:synthetic --workdir=workdir/synthetic
  python run.py --config=configs/uad.py:whumars2337 --workdir=… \\
      --config.dataset.manual_dir=/data/raw --config.pretrained=jx_vit_base_p16_224-80ecf9dd.pth

(``python -m uad_jax.commands.train`` is the same command.)

The console shows the job's own lines: the dataset, one line per epoch, each evaluation's
headline; on a terminal, progress bars too (``uad_jax.console``). Libraries log warnings and
errors only; absl's ``--verbosity=0`` (``-v 0``) brings back their INFO lines (Orbax, TFDS and its
progress bars, JAX), ``-v 1`` adds DEBUG.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from uad_jax import console
from uad_jax.training import loop, pretrain

_CONFIG = config_flags.DEFINE_config_file("config", "configs/uad.py:synthetic",
                                          "Config file and its argument.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/synthetic",
                               "Checkpoints, evaluation reports and logs go here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries_unless_asked()
  config = pretrain.with_pretrained_backbone(_CONFIG.value)
  loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
