"""UAD train-step throughput, and what GPD and the classifier cost as the identity count grows.

  python bench/train_step.py [--variant B/16] [--identities 4 --instances 4 --replicas 1]
                             [--mesh 1,1] [--fsdp] [--dtype bfloat16] [--steps 3] [--sweep]

Prints images/s and achieved FLOP/s for our jitted step; where torch and timm are installed, a
PyTorch step in the same run (timm ViT of the same shape, BNNeck, classifier, CE + WRT + ProCA +
GPD, SGD with momentum, coupled weight decay and clipping) in fp32 and bf16 autocast, and the
ratios. ``--sweep`` times the step at 10^3 … 10^6 identities.

FLOP count (multiply-add = 2 FLOPs), per image, T = 1 + (H/16)(W/16) tokens, width D, MLP F,
depth L, C identities:
  forward  = 2·(H·W·3)·D                       patch embedding
           + L·(2·T·D·3D + 2·T·D·D + 4·T·D·F   qkv, proj, MLP
                + 4·T²·D)                      attention scores and weighted sum
           + 2·D·C (classifier) + 2·D·C (GPD logits)
  step     = 3 × backbone and classifier forward (backward = 2× forward)
           + 2 × GPD (its backward reaches the features only: the memory has no gradient).
Losses, norms and elementwise work are not counted.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import uad  # noqa: E402
from uad_jax import sharding  # noqa: E402
from uad_jax.models import vit  # noqa: E402
from uad_jax.training import train_state, train_step  # noqa: E402

import machine  # noqa: E402  (bench/machine.py: this folder is the script's sys.path[0])


def flops_per_image(variant, image_size, num_classes):
  s = vit.parse_variant(variant)
  h, w = image_size
  t = 1 + (h // s.patch) * (w // s.patch)
  d, f = s.width, s.mlp_dim
  backbone = 2 * h * w * 3 * d + s.depth * (2 * t * d * 3 * d + 2 * t * d * d + 4 * t * d * f +
                                            4 * t * t * d)
  return 3 * (backbone + 2 * d * num_classes) + 2 * 2 * d * num_classes


def make_config(args, num_classes):
  c = uad.get_config(f"whumars2337,loss={args.loss},fsdp={args.fsdp}")
  with c.unlocked():
    c.model.variant = args.variant
    c.model.dtype = args.dtype
    c.model.activations = args.activations
    c.sampler.identities, c.sampler.instances = args.identities, args.instances
    c.num_replicas = args.replicas
    data, model = (int(x) for x in args.mesh.split(","))
    c.mesh = (("data", data), ("model", model))
  return c


def make_batch(c, num_classes, rng):
  m, p, k, r = c.sampler.modalities, c.sampler.identities, c.sampler.instances, c.num_replicas
  labels = np.concatenate([np.tile(np.repeat(rng.choice(num_classes, p, replace=False), k), m)
                           for _ in range(r)]).astype(np.int32)
  images = rng.randn(len(labels), *c.model.image_size, 3).astype(np.float32)
  return {"images": images, "labels": labels}


def time_jax_step(c, num_classes, steps, warmup=1):
  """Seconds per step (after the first, compiling, step and warmup − 1 more) and the first's."""
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:math.prod(size for _, size in c.mesh)])
  state, shardings = train_state.create_train_state(c, num_classes, 100, mesh, log=None)
  step = train_step.jit_train_step(shardings, mesh)
  rng = np.random.RandomState(0)
  batches = [jax.device_put(make_batch(c, num_classes, rng), sharding.batch_sharding(mesh))
             for _ in range(2)]
  with sharding.context(mesh, c.sharding_rules):
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(1, warmup):
      state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, compile_s


def time_torch_step(c, num_classes, steps, autocast_bf16, device="cpu", warmup=1):
  """Seconds per step of the PyTorch peer on ``device`` ("cpu" or "cuda"), after warm-up."""
  import torch
  import torch.nn.functional as F
  from uad_jax.testing import timm_peer
  timm = timm_peer.import_timm()
  s = vit.parse_variant(c.model.variant)
  backbone = timm.models.vision_transformer.VisionTransformer(
      img_size=tuple(c.model.image_size), patch_size=s.patch, embed_dim=s.width, depth=s.depth,
      num_heads=s.heads, mlp_ratio=s.mlp_dim / s.width, qkv_bias=True, num_classes=0,
      drop_path_rate=c.model.stochastic_depth)
  bnneck = torch.nn.BatchNorm1d(s.width)
  bnneck.bias.requires_grad_(False)
  classifier = torch.nn.Linear(s.width, num_classes, bias=False)
  for module in (backbone, bnneck, classifier):
    module.to(device)
  memory = F.normalize(torch.randn(num_classes, s.width, device=device), dim=1)
  params = [p for m in (backbone, bnneck, classifier) for p in m.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.008, momentum=0.9, weight_decay=1e-4)
  m_, p_, k_ = c.sampler.modalities, c.sampler.identities, c.sampler.instances
  batch = make_batch(c, num_classes, np.random.RandomState(0))
  images = torch.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy()).to(device)
  labels = torch.from_numpy(batch["labels"]).long().to(device)
  # CUDA runs asynchronously: the clock stops only when the queued steps are done.
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None

  def losses(feat, logits):
    feat = feat.float()
    ce = F.cross_entropy(logits.float(), labels)
    dist = torch.cdist(feat, feat).clamp_min(1e-6)
    pos = (labels[:, None] == labels[None]).float()
    neg = 1 - pos
    ap, an = dist * pos, dist * neg
    wp = torch.exp(ap - ap.max(1, keepdim=True)[0]) * pos
    wn = torch.exp(-an) * neg
    dp = (ap * wp / (wp.sum(1, keepdim=True) + 1e-6)).sum(1)
    dn = (an * wn / (wn.sum(1, keepdim=True) + 1e-6)).sum(1)
    wrt = F.softplus(dp - dn).mean()
    f = F.normalize(feat, dim=1).reshape(m_, p_, k_, -1)
    centres = F.normalize(f.mean(2), dim=-1)
    anchors = F.normalize(centres.mean(0), dim=-1).detach()
    proca = ((centres - anchors[None])**2).sum(-1).sum(0).mean() / m_
    gpd = F.cross_entropy(F.normalize(feat, dim=1) @ memory.T / 0.03, labels)
    return ce + wrt + 0.01 * proca + gpd

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast_bf16):
      feat = backbone(images)
      logits = classifier(bnneck(feat.float()))
    losses(feat, logits).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

  for _ in range(warmup):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--identities", type=int, default=4, help="P per replica group")
  parser.add_argument("--instances", type=int, default=4, help="K")
  parser.add_argument("--replicas", type=int, default=1, help="R replica groups per step")
  parser.add_argument("--mesh", default="1,1", help="data,model mesh sizes")
  parser.add_argument("--fsdp", action="store_true", help="parameters sharded over data too")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--activations", default="auto", help="auto | float32 | bfloat16")
  parser.add_argument("--loss", default="uad")
  parser.add_argument("--num-classes", type=int, default=2337)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--sweep", action="store_true", help="identity counts 10^3 … 10^6")
  parser.add_argument("--no-peer", action="store_true")
  args = parser.parse_args()

  c = make_config(args, args.num_classes)
  seconds, compile_s = time_jax_step(c, args.num_classes, args.steps)
  n = c.num_replicas * c.sampler.modalities * c.sampler.identities * c.sampler.instances
  flops = flops_per_image(args.variant, c.model.image_size, args.num_classes) * n
  print(f"# UAD step, ViT-{args.variant} {c.model.image_size[0]}x{c.model.image_size[1]}, "
        f"batch {n} (R={c.num_replicas} x {c.sampler.modalities}x{c.sampler.identities}x"
        f"{c.sampler.instances}), {args.num_classes} ids, loss {args.loss}, mesh {args.mesh}, "
        f"{jax.devices()[0].platform}, activations {args.activations}; {machine.cpu_model()}")
  ours = n / seconds
  print(f"jax {args.dtype:9s} {ours:7.2f} img/s  {flops / seconds / 1e12:.3f} TFLOP/s  "
        f"(compile {compile_s:.1f} s)", flush=True)
  if not args.no_peer:
    try:
      import torch
      torch.set_num_threads(os.cpu_count())
      for name, bf16 in [("torch fp32", False), ("torch bf16-autocast", True)]:
        peer = n / time_torch_step(c, args.num_classes, args.steps, bf16)
        print(f"{name:19s} {peer:7.2f} img/s   ratio jax/{name}: {ours / peer:.2f}x", flush=True)
    except ImportError:
      print("torch/timm not installed: no peer numbers")
  if args.sweep:
    print("# step time vs identity count (classifier + GPD memory)")
    for num_classes in (10**3, 10**4, 10**5, 10**6):
      seconds, _ = time_jax_step(make_config(args, num_classes), num_classes, args.steps)
      print(f"{num_classes:>9,d} ids: {seconds:7.3f} s/step  {n / seconds:7.2f} img/s", flush=True)


if __name__ == "__main__":
  main()
