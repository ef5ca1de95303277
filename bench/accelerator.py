"""Our UAD train step beside the PyTorch peer on one accelerator: images/s, MFU, and the ratio.

  python bench/accelerator.py [--steps 50 --warmup 5] [--peak_tflops 989] [--no_peer]
  python bench/accelerator.py --tiny          # mu/8 at 64x32, 24 images, 2 steps: CPU and CI
  python bench/accelerator.py --activations float32 --no_peer   # the other precision form

Before timing, it checks the model on this device: which attention the chosen activation form
compiles to (cuDNN's fused kernel, counted in the lowered step, or XLA's), and how far that form's
features and gradients sit from the fp32-activation form's on the same parameters and images.

The reference recipe's shapes: ViT-B/16, 256x128, UAD loss, 2337 identities, one replica group
of 16 identities x 3 modalities x 4 instances = 192 images per step, on one chip. The peer is
bench/train_step.py's (timm ViT, BNNeck, classifier, CE + WRT + ProCA + GPD, SGD), under bf16
autocast, on CUDA where torch sees a GPU, on the CPU only when JAX runs there too (a CPU peer
beside a TPU compares nothing). MFU = analytic FLOPs per image (bench/train_step.py, matrix
products only) x images/s over the chip's dense bf16 peak. The defaults take well under 5 minutes
on an H100, most of it compilation and start-up.
"""
import argparse
import os
import re
import sys
import time

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The peer shares the GPU with this process's JAX: JAX takes memory as it needs it instead of
# reserving 75 % of the chip when it starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402
import train_step as step_bench  # noqa: E402  (bench/train_step.py: the builders and FLOPs)
from configs import uad  # noqa: E402
from uad_jax.models import precision, vit  # noqa: E402
from uad_jax.training import train_state  # noqa: E402

# Dense bf16 TFLOP/s per chip (vendor specifications), by a pattern of the device's name; the
# first match wins, so the specific names stand before the general ones.
PEAK_TFLOPS = (
    (r"H100 PCIe", 756.0),
    (r"H100 NVL|H200 NVL", 835.0),
    (r"H100|H200|GH200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"TPU v5 ?lite|TPU v5e", 197.0),
    (r"TPU v4", 275.0),
)


def peak_tflops(device_name, override=None):
  """The chip's dense bf16 peak in TFLOP/s, or None where the name is not in the table."""
  if override:
    return override
  return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_name)), None)


def make_config(tiny, identities, activations="auto"):
  c = uad.get_config("synthetic" if tiny else "whumars2337")
  with c.unlocked():
    c.model.activations = activations
    c.model.stem = "patch"  # the peer's stem, and the one the analytic FLOP count assumes
    c.num_replicas = 1
    c.sampler.identities = identities or c.sampler.identities
    c.mesh = (("data", 1), ("model", 1))
  return c


def check_model(c, num_classes, batch=8):
  """The model's attention path and its distance from the fp32-activation form on this device:
  (cuDNN fused-attention calls in the lowered forward and backward, feature and gradient relative
  errors). The loss weighs features and logits by fixed random directions, as the tests do."""
  model = train_state.build_model(c, num_classes)
  reference = model.clone(activations=jnp.dtype(jnp.float32))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(batch, *c.model.image_size, 3), jnp.float32)
  variables = reference.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                             train=True)
  direction = jnp.asarray(rng.randn(model.num_classes), jnp.float32)

  def loss(params, net):
    (logits, feat), _ = net.apply({**variables, "params": params}, x, train=True,
                                  rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    return jnp.sum(feat) + jnp.sum(logits @ direction), feat

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  fused = grad.lower(variables["params"], model).as_text().count("__cudnn$fmha")
  (_, feat), grads = grad(variables["params"], model)
  (_, want_feat), want_grads = grad(variables["params"], reference)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(jnp.square(t.astype(jnp.float32)))
                                         for t in jax.tree.leaves(tree))))
  feat_error = norm(feat - want_feat) / norm(want_feat)
  grad_error = norm(jax.tree.map(jnp.subtract, grads, want_grads)) / norm(want_grads)
  return fused, feat_error, grad_error


def peer_device():
  """Where the peer runs, or why it does not (raises ImportError without torch)."""
  import torch
  if torch.cuda.is_available():
    return "cuda", torch.cuda.get_device_name(0)
  if jax.devices()[0].platform == "cpu":
    torch.set_num_threads(os.cpu_count())
    return "cpu", machine.cpu_model()
  return None, "no CUDA device for torch beside JAX's accelerator"


def report(name, images_per_s, flops, peak):
  mfu = f"{100 * images_per_s * flops / (peak * 1e12):.1f} %" if peak else "unknown"
  print(f"{name:5s} {images_per_s:9.2f} img/s  MFU {mfu}  "
        f"({images_per_s * flops / 1e12:.3f} TFLOP/s)", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tiny", action="store_true", help="mu/8 at 64x32, 2 steps: for the CPU")
  parser.add_argument("--identities", type=int, default=0, help="P; 0: the preset's (16, tiny 4)")
  parser.add_argument("--num_classes", type=int, default=2337)
  parser.add_argument("--steps", type=int, default=0, help="timed steps; 0: 50 (tiny 2)")
  parser.add_argument("--warmup", type=int, default=0, help="untimed steps; 0: 5 (tiny 1)")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's bf16 peak")
  parser.add_argument("--no_peer", action="store_true", help="time our step only")
  parser.add_argument("--activations", default="auto", choices=precision.ACTIVATION_FORMS,
                      help="what the products return (config.model.activations)")
  args = parser.parse_args()
  steps = args.steps or (2 if args.tiny else 50)
  warmup = args.warmup or (1 if args.tiny else 5)
  c = make_config(args.tiny, args.identities, args.activations)
  h, w = c.model.image_size
  m, p, k = c.sampler.modalities, c.sampler.identities, c.sampler.instances
  n = m * p * k
  flops = step_bench.flops_per_image(c.model.variant, c.model.image_size, args.num_classes)
  device = jax.devices()[0]
  activations = precision.activation_dtype(c.model.dtype, c.model.activations)
  print(f"# ViT-{c.model.variant} {h}x{w}, UAD loss, batch {n} ({m}x{p}x{k}), "
        f"{args.num_classes} ids, {c.model.dtype} products returning {activations.name} "
        f"(activations={c.model.activations}); {warmup} warm-up + {steps} timed steps")
  print(f"jax devices: {jax.devices()} ({device.device_kind})")
  print(f"cpu: {machine.cpu_model()}")
  print(f"flops: {flops / 1e9:.4g} GFLOP per image (analytic)", flush=True)
  fused, feat_error, grad_error = check_model(c, args.num_classes)
  print(f"attention: {f'cuDNN fused ({fused} calls, forward and backward)' if fused else 'XLA'}; "
        f"vs fp32 activations: features {feat_error:.2e}, gradients {grad_error:.2e} "
        f"(relative)", flush=True)
  for (shape, dtype), reason in vit.CUDNN_REFUSALS.items():
    print(f"cuDNN refused q {shape} {dtype}: {reason}")

  seconds, first_s = step_bench.time_jax_step(c, args.num_classes, steps, warmup)
  ours = n / seconds
  peak = peak_tflops(device.device_kind, args.peak_tflops)
  print(f"peak: {f'{peak:g} TFLOP/s' if peak else 'unknown'} ({device.device_kind})")
  report("ours", ours, flops, peak)
  print(f"first step (compile): {first_s:.1f} s", flush=True)

  try:
    where, name = (None, "--no_peer") if args.no_peer else peer_device()
    print(f"torch device: {name}")
    if where:
      peer = n / step_bench.time_torch_step(c, args.num_classes, steps, True, where, warmup)
      report("peer", peer, flops, peak_tflops(name, args.peak_tflops))
      print(f"ratio ours/peer: {ours / peer:.2f}x")
    else:
      print(f"peer: skipped ({name})")
  except ImportError as e:
    print(f"peer: skipped (torch/timm not importable: {e})")
  print(f"elapsed: {time.perf_counter() - _START:.1f} s")


if __name__ == "__main__":
  main()
