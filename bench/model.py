"""Forward+backward images/s of the ViT backbone at 256×128, fp32 and bf16 compute.

Where torch and timm are installed, timm's ViT with the same shapes is measured in the same run
(fp32, and bf16 autocast, torch's fastest CPU mode) and the ratios are printed.

  python bench/model.py [--variant B/16] [--batch 48] [--steps 3]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from uad_jax.models import vit  # noqa: E402


def _time(fn, steps):
  fn()  # compile / warm up
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def bench_flax(variant, batch, steps, dtype):
  model = vit.ViT(variant, (256, 128), 0.1, dtype)
  images = jnp.asarray(np.random.RandomState(0).randn(batch, 256, 128, 3), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  direction = jax.random.normal(jax.random.key(1), (vit.parse_variant(variant).width,))

  @jax.jit
  def fwd_bwd(params, rng):
    def loss(p):
      feats = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
      return jnp.mean(feats @ direction)
    return jax.grad(loss)(params)

  rng = jax.random.key(2)
  return batch / _time(lambda: jax.block_until_ready(fwd_bwd(params, rng)), steps)


def bench_timm(variant, batch, steps, autocast_bf16):
  import torch
  from uad_jax.testing import timm_peer
  timm = timm_peer.import_timm()
  names = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
           "B/16": "vit_base_patch16_224"}
  model = timm.create_model(names[variant], pretrained=False, img_size=(256, 128),
                            num_classes=0, drop_path_rate=0.1)
  model.train()
  images = torch.randn(batch, 3, 256, 128)
  direction = torch.randn(model.num_features)

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
      loss = (model(images).float() @ direction).mean()
    loss.backward()

  return batch / _time(step, steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=48)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  print(f"# ViT-{args.variant} 256x128, batch {args.batch}, forward+backward, "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  results = {}
  for name, dtype in [("flax fp32", jnp.float32), ("flax bf16", jnp.bfloat16)]:
    results[name] = bench_flax(args.variant, args.batch, args.steps, dtype)
    print(f"{name:18s} {results[name]:7.2f} img/s", flush=True)
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
    for name, bf16 in [("timm fp32", False), ("timm bf16-autocast", True)]:
      results[name] = bench_timm(args.variant, args.batch, args.steps, bf16)
      print(f"{name:18s} {results[name]:7.2f} img/s", flush=True)
  except ImportError:
    print("torch/timm not installed: no peer numbers")
    return
  for ours in ("flax fp32", "flax bf16"):
    for peer in ("timm fp32", "timm bf16-autocast"):
      print(f"ratio {ours} / {peer}: {results[ours] / results[peer]:.2f}x")


if __name__ == "__main__":
  main()
