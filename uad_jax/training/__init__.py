"""Training: UAD losses, the prototype memory, the optimizer, TrainState and the jitted step,
Orbax checkpoints and the loop. May import: data, models, evaluation, sharding, numerics."""
