"""Generic pretraining of the backbone on other synthetic people: the synthetic demo's stand-in
for ImageNet weights.

The published recipe fine-tunes a backbone that already sees (ImageNet ViT-B/16, or LUPerson for
the ICS stem). A tiny ViT trained from scratch on a CPU has nothing of the kind, and the UAD
losses cannot start from nothing: WRT collapses the features, and GPD then sees one prototype
direction. So when ``config.pretrain.synthetic_ids`` > 0 and no ``config.pretrained`` is given,
the backbone is first trained with a generic objective (label-smoothed cross-entropy over the
identities of a disjoint synthetic set, with its own seed, AdamW), written as a timm / TransReID
``.safetensors`` checkpoint (``models.backbone_export``), and the UAD stage loads it through the
importer, exactly as a real run loads downloaded weights.

The stage is an ordinary run of the training loop in ``pretrain.dir/<tag>/``, the tag naming its
settings: it resumes when interrupted, and any later run with the same settings (the ablation's
four variants, a rerun) reuses its ``backbone.safetensors``.
"""
import hashlib
import json
import os

import jax

from uad_jax.data import prepare
from uad_jax.models import backbone_export
from uad_jax.training import config_checks, loop

BACKBONE_FILE = "backbone.safetensors"


def pretrain_config(config):
  """The config of the pretraining run that ``config`` asks for."""
  p = config.pretrain
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.seed = p.seed
    c.dataset.synthetic_ids = p.synthetic_ids
    c.dataset.synthetic_train_fraction = p.train_fraction
    # The stage's own set, whole, whatever the UAD stage's scaling-study settings.
    c.dataset.synthetic_test_ids = c.dataset.synthetic_train_frames = 0
    c.dataset.train_identities = 0
    c.num_classes = 0
    c.sampler.identities, c.sampler.instances, c.num_replicas = p.identities, 1, 1
    c.loss.name, c.loss.label_smoothing = "ce", p.label_smoothing
    c.optim.name, c.optim.lr_per_replica = "adamw", p.lr
    c.optim.weight_decay, c.optim.bias_lr_factor = p.weight_decay, 1.0
    c.optim.epochs, c.optim.warmup_epochs = p.epochs, 2
    c.eval_every_epochs = p.epochs        # one check on its own held-out people, at the end
    c.pretrain.synthetic_ids = 0          # a pretraining run has no stage before it
    c.pretrained = ""
  c.lock()
  return c


# Fixed by pretrain_config, so they name nothing; left out, the tags made before they existed
# stay valid.
_FIXED = ("synthetic_test_ids", "synthetic_train_frames", "train_identities")
# Settings that change where or how fast the pretraining runs, not what it learns (and _FIXED).
_NOT_IN_TAG = {"dataset": ("manual_dir", "data_dir") + _FIXED, "pretrain": ("dir",)}
_NOT_IN_TAG_TOP = ("eval_batch_size", "data_workers", "data_threads", "mesh", "sharding_rules",
                   "max_nonfinite_steps", "keep_checkpoints", "log_every_steps")


def run_dir(config) -> str:
  """``pretrain.dir/<tag>``: the tag names the model and the stage's length, and hashes every
  setting of the stage that shapes what it learns (and the synthetic set's generator settings)."""
  settings = pretrain_config(config).to_dict()
  for key in _NOT_IN_TAG_TOP:
    settings.pop(key)
  for group, keys in _NOT_IN_TAG.items():
    for key in keys:
      settings[group].pop(key)
  settings["synthetic_set"] = prepare.synthetic_request(pretrain_config(config))
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
  p, m = config.pretrain, config.model
  height, width = m.image_size
  tag = (f"{m.variant.replace('/', 'p')}-{m.stem}-{height}x{width}-{p.synthetic_ids}ids-"
         f"{p.epochs}ep-{digest[:10]}")
  return os.path.join(p.dir, tag)


def with_pretrained_backbone(config, log=print):
  """``config`` itself, or, when it asks for the pretraining stage, a copy whose ``pretrained`` is
  the stage's backbone checkpoint (trained now unless an earlier run left it). Raises
  config_checks.ConfigError, before any work, when a field of ``config`` is bad."""
  config_checks.check(config)
  if config.pretrain.synthetic_ids <= 0 or config.pretrained:
    return config
  workdir = run_dir(config)
  path = os.path.join(workdir, BACKBONE_FILE)
  if os.path.exists(path):
    log(f"pretrained backbone: {path} (made earlier with these settings)")
  else:
    log(f"stage 1/2: pretraining the backbone on {config.pretrain.synthetic_ids} other synthetic "
        f"identities (cross-entropy, AdamW, {config.pretrain.epochs} epochs) in {workdir}")
    state = loop.train_and_evaluate(pretrain_config(config), workdir, log)
    if jax.process_index() == 0:
      variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
      backbone_export.save_backbone(path, variables)
    if jax.process_count() > 1:  # the other hosts read what process 0 wrote
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("pretrained backbone written")
    log(f"pretrained backbone: {path}\nstage 2/2: UAD on the task's own training identities")
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.pretrained = path
  c.lock()
  return c
