"""FLOPs per image of the compiled UAD train step and of the inference forward, from XLA's cost
analysis (compiled, never run), beside the analytic count of bench/train_step.py.

  python bench/step_flops.py [--variant B/16] [--num-classes 1000,2337] [--replicas 4]

The numbers docs/projection.md builds on. XLA counts a multiply-add as 2 FLOPs and counts every
op (norms, softmax, losses, the optimizer's element-wise update), so its count is a little above
the matrix-product-only analytic one.
"""
import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import uad  # noqa: E402
from uad_jax import sharding  # noqa: E402
from uad_jax.training import train_state, train_step  # noqa: E402


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _bench_train_step():
  spec = importlib.util.spec_from_file_location(
      "bench_train_step", os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_step_flops(variant, num_classes, replicas):
  c = uad.get_config("whumars2337")
  with c.unlocked():
    c.model.variant, c.num_replicas, c.mesh = variant, replicas, (("data", 1), ("model", 1))
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  abstract, shardings = train_state.create_train_state(c, num_classes, 100, mesh,
                                                       abstract_only=True)
  n = replicas * c.sampler.modalities * c.sampler.identities * c.sampler.instances
  batch = {"images": jax.ShapeDtypeStruct((n, *c.model.image_size, 3), jnp.float32),
           "labels": jax.ShapeDtypeStruct((n,), jnp.int32)}
  with sharding.context(mesh, c.sharding_rules):
    compiled = train_step.jit_train_step(shardings, mesh).lower(abstract, batch).compile()
  return _flops(compiled) / n, n, c


def forward_flops(c, num_classes, batch=256):
  model = train_state.build_model(c, num_classes)
  images = jax.ShapeDtypeStruct((batch, *c.model.image_size, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((1, *c.model.image_size, 3)), train=False))["params"]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  return _flops(compiled) / batch


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--num-classes", default="1000,2337")
  parser.add_argument("--replicas", type=int, default=4, help="R groups of 192 images per step")
  args = parser.parse_args()
  analytic = _bench_train_step().flops_per_image
  print(f"# ViT-{args.variant}, 256x128, UAD loss, jax {jax.__version__}, XLA cost analysis "
        f"({jax.devices()[0].platform}); GFLOP per image")
  for num_classes in (int(x) for x in args.num_classes.split(",")):
    step, n, c = train_step_flops(args.variant, num_classes, args.replicas)
    forward = forward_flops(c, num_classes)
    print(f"{num_classes:5d} ids: train step {step / 1e9:7.2f} (batch {n}), inference forward "
          f"{forward / 1e9:6.2f}, train/forward {step / forward:.2f}; analytic train step "
          f"{analytic(args.variant, c.model.image_size, num_classes) / 1e9:7.2f}", flush=True)


if __name__ == "__main__":
  main()
