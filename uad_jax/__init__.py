"""uad-jax: UAD for Any-Scenario person re-identification on WHU-MARS, in JAX/Flax.

Packages by layer, following the data; a layer imports only layers listed before it:
  sharding, numerics, console, distributed
              cross-cutting helpers every layer may use (no uad_jax imports)
  data        the input side: P×M×K sampler, augmentation, Grain pipeline, dataset preparation
  models      the ViT family, the UAD ReID network, mixed precision, pretrained import
  evaluation  exact retrieval metrics, the AS-ReID protocols, reports, a model's features on a split
  training    losses, prototype memory, optimizer, train state and step, checkpoints, the loop
  commands    what users run (``run.py`` calls ``commands.train``)
``testing`` holds test-only peers (timm); nothing in the layers imports it.
"""
