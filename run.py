"""Trains and evaluates UAD: ``python run.py --config=configs/uad.py:PRESET [--workdir=DIR]``.

The command and its flags are uad_jax.commands.train; this file is its entry point at the top of
the repository.
"""
from absl import app

from uad_jax.commands import train

if __name__ == "__main__":
  app.run(train.main)
