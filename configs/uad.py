"""UAD on WHU-MARS. Usage: ``--config=configs/uad.py:PRESET[,loss=…][,fsdp]``.

Presets:
  whumars2337  the reference recipe on WHU-MARS-2337 (ViT-B/16, 4 replica groups of 16×3×4).
  whumars1000  the same recipe on WHU-MARS-1000.
  synthetic    a tiny ViT on the synthetic WHU-MARS, small enough for one CPU.
Args:
  loss   base | base+proca | base+gpd | uad (the ablation rows of the paper).
  fsdp   shard parameters over the data axis too (fully sharded data parallel).

Every field below has one default and one comment; the returned config is locked, so a typo in
``--config.x=y`` fails instead of being ignored.
"""
import ml_collections

from configs import common

PRESETS = ("whumars2337", "whumars1000", "synthetic")
LOSSES = ("base", "base+proca", "base+gpd", "uad")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, preset="synthetic", loss="uad", fsdp=False)
  if arg.preset not in PRESETS:
    raise ValueError(f"unknown preset {arg.preset!r}; expected one of {PRESETS}")
  if arg.loss not in LOSSES:
    raise ValueError(f"unknown loss {arg.loss!r}; expected one of {LOSSES}")
  reference = arg.preset != "synthetic"
  c = ml_collections.ConfigDict()
  c.preset = arg.preset                      # which preset this config was built from
  c.seed = 1234                              # the reference's seed

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "whu_mars"                # TFDS builder name (tfds_whumars)
  c.dataset.config = arg.preset if reference else "whumars1000"  # builder config: raw folder
  c.dataset.data_dir = "data/tfds"           # where the built ArrayRecord dataset lives
  c.dataset.manual_dir = "data/raw" if reference else "data/synthetic"  # the raw WHU-MARS root
  c.dataset.synthetic_ids = 0 if reference else 100  # >0: generate a synthetic set of this many ids
  c.dataset.synthetic_difficulty = "demo"    # default | demo (tfds_whumars.synthetic.DIFFICULTIES)
  c.dataset.synthetic_train_fraction = 0.5   # of the synthetic ids for training; the rest are test
  # Identity-count scaling studies (python -m uad_jax.commands.scaling).
  c.dataset.synthetic_test_ids = 0           # >0: ids 1..N test, the same people whatever
                                             # synthetic_ids; the other ids train (no fraction)
  c.dataset.synthetic_train_frames = 0       # >0: mean frames per (train id, camera), not 2
  c.dataset.train_identities = 0             # 0: all; N: a seeded subset of N train ids, nested
                                             # in every larger one, relabelled 0..N-1
  # Width of the classifier and the prototype memory; 0 = the identities trained on. A larger
  # value only adds classes that never get data (padding, e.g. to shard evenly over "model").
  c.num_classes = 0

  c.sampler = ml_collections.ConfigDict()
  c.sampler.identities = 16 if reference else 4   # P: identities per replica group
  c.sampler.modalities = 3                        # M: RGB, NIR, TIR
  c.sampler.instances = 4 if reference else 2     # K: images per identity and modality
  c.num_replicas = 4 if reference else 1          # R: replica groups per optimizer step

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16" if reference else "mu/8"  # ViT size/patch: mu, Ti, S, B
  c.model.stem = "patch" if reference else "conv"  # patch (vit_base) | ics (vit_ics_lup) | conv
  c.model.image_size = (256, 128) if reference else (64, 32)  # input H, W
  c.model.stochastic_depth = 0.1             # drop-path rate of the last block (linear from 0)
  # Zero padding before the random crop: the reference's 10 px at 256×128; the demo's small
  # images get a padding of the same scale.
  c.augment_padding = 10 if reference else 3
  # Where flip, pad-crop, normalisation and erasing run: device (in the jitted step; uint8
  # crosses) | host (float32 crosses). Only the erased boxes' noise values differ.
  c.augment_on = "device"
  c.model.dtype = "bfloat16"                 # compute dtype of the matrix products
  # What the products return: auto (float32 on the CPU, whose bf16-result dots are slow; bfloat16
  # on GPUs and TPUs, halving activation memory) | float32 | bfloat16. Norms, softmax statistics,
  # the residual stream and the loss heads are fp32 in every form.
  c.model.activations = "auto"
  c.pretrained = ""                          # ImageNet ViT checkpoint (.npz/.safetensors/.pth)

  # The synthetic demo's stand-in for ImageNet weights: unless config.pretrained is given, the
  # backbone is first trained (CE, AdamW) on a synthetic set of other people, and the result is
  # written as a checkpoint and loaded through the importer (uad_jax.training.pretrain).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.synthetic_ids = 0 if reference else 440  # >0: pretrain on this many other identities
  c.pretrain.train_fraction = 0.9            # of them for training; the rest check the stage
  c.pretrain.seed = 4321                     # its generator and training seed (other people)
  c.pretrain.epochs = 15                     # its length
  c.pretrain.lr = 2e-3                       # AdamW peak learning rate (warm-up + cosine)
  c.pretrain.weight_decay = 0.05             # AdamW's decoupled weight decay
  c.pretrain.label_smoothing = 0.1           # of its cross-entropy
  c.pretrain.identities = 16                 # P of its batches (K = 1 image per modality)
  c.pretrain.dir = "data/pretrained"         # where pretrained backbones are kept, by settings

  c.loss = ml_collections.ConfigDict()
  c.loss.name = arg.loss                     # which terms: base | base+proca | base+gpd | uad
  c.loss.proca_weight = 0.01                 # weight of ProCA in the total loss
  c.loss.gpd_weight = 1.0                    # weight of GPD in the total loss
  c.loss.gpd_tau = 0.03                      # GPD softmax temperature
  c.loss.prototype_momentum = 0.2            # weight of the new anchor in the memory EMA
  c.loss.label_smoothing = 0.0               # of the CE term (the reference uses none)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"                       # sgd (the reference) | adamw (pretraining stage)
  c.optim.lr_per_replica = 0.008 if reference else 0.02  # base LR of one replica group
  c.optim.momentum = 0.9                     # SGD momentum (no Nesterov)
  c.optim.weight_decay = 1e-4                # torch-style coupled L2, on every trained parameter
  c.optim.bias_lr_factor = 2.0               # LR multiplier of parameters named "*bias*"
  c.optim.grad_clip_norm = 1.0               # global L2 norm clipping
  c.optim.epochs = 120 if reference else 30  # training length in epochs
  c.optim.warmup_epochs = 5 if reference else 3  # epochs 1 … warmup−1 warm up linearly
  c.optim.warmup_factor = 0.01               # warm-up starts at this fraction of the base LR
  c.optim.min_lr_factor = 0.002              # cosine floor as a fraction of the base LR

  c.mesh = (("data", -1), ("model", 1))      # mesh axes and sizes; -1 takes the other devices
  # Logical → mesh axis rules (first match wins). Activations are data parallel; the identity
  # dimension of the classifier and the prototype memory can go over "model".
  c.sharding_rules = (
      (("embed", "data"),) if arg.fsdp else ()) + (
      ("act_batch", "data"),
      ("classes", "model"),
  )
  c.eval_every_epochs = 10                   # evaluation period in epochs
  c.eval_batch_size = 256                    # images per inference step during evaluation
  c.camera_rule = "sysu"                     # gallery exclusion: sysu | market | none (spec §7)
  # Exact k-reciprocal re-ranking (uad_jax/evaluation/reranking.py) of every evaluation, reported
  # beside the plain metrics; the reference's settings (the common ones: k1=20, k2=6, λ=0.3).
  c.rerank = ml_collections.ConfigDict()
  c.rerank.enabled = False                   # also evaluate with re-ranked distances
  c.rerank.k1 = 50                           # k of the k-reciprocal neighbour sets
  c.rerank.k2 = 15                           # neighbours averaged by the query expansion
  c.rerank.lambda_value = 0.3                # weight of the original distance (1 − λ: Jaccard)
  c.missing_modality = "error"               # train ids lacking a modality: error | drop
  c.data_workers = 0                         # decode/augment worker processes per host
  c.data_threads = 2                         # decode/augment threads per process
  c.max_nonfinite_steps = 5                  # consecutive skipped (non-finite) steps that stop
  c.keep_checkpoints = 2                     # the last k checkpoints kept, and the best by mAP
  c.log_every_steps = 10                     # step metrics to TensorBoard/metrics.jsonl every N
  c.lock()
  return c
