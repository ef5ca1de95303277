"""The networks: the ViT family, the UAD ReID head, mixed-precision products, pretrained import.

May import: uad_jax.sharding, uad_jax.numerics, and uad_jax.data.augment for the pixel convention
of the model's input (the exports normalise inside); never evaluation or training.
"""
