"""The networks: the ViT family, the UAD ReID head, mixed-precision products, pretrained import.

May import: uad_jax.sharding, uad_jax.numerics (never data, evaluation or training).
"""
