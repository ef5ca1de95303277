"""The input side: the P×M×K sampler, augmentation, the Grain pipeline and dataset preparation.

May import: uad_jax.sharding, uad_jax.numerics, tfds_whumars. Only this package imports grain/tfds.
"""
