"""One UAD train step at 10^4 / 10^5 / 10^6 identities, the classifier and the prototype memory
sharded over the mesh's ``model`` axis, with the memory it takes per device.

  python bench/identity_scaling.py [--variants mu/16,B/16] [--identities 10000,100000,1000000]
                                   [--mesh 1,8] [--fsdp] [--budget-gib 12] [--steps 2]
                                   [--state-only] [--compile-only] [--no-peer]

Each (variant, identity count) runs in a fresh process on 8 fake CPU devices
(``--xla_force_host_platform_device_count``), so its peak RSS is its own. Per device (XLA's
compiled memory analysis, the same on any backend): the state's bytes, the scratch of the state's
initialisation, the scratch of the compiled train step. For the whole process: its peak RSS after
creating the state and after the steps, and the step time. A configuration whose predicted
process memory exceeds ``--budget-gib`` is compiled, not run.

The PyTorch peer, where torch and timm are installed: the same backbone, BNNeck, a C-way
classifier and a [C, D] memory on one CPU device, SGD with momentum (bench/train_step.py's step),
in fp32; run in the same session where its weights, gradients, momentum and memory fit the budget.

Step times on fake devices are not accelerator numbers: with a data axis of 1 every device runs
the whole batch's backbone, so the 2 cores do that work 8 times; they show how the classifier's
share grows with the identity count.
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import machine  # bench/machine.py: this folder is the script's sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _bench_train_step():
  """bench/train_step.py (its config, batch and PyTorch step), imported by path."""
  spec = importlib.util.spec_from_file_location(
      "bench_train_step", os.path.join(ROOT, "bench", "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _step_args(args, variant):
  return argparse.Namespace(variant=variant, identities=args.ids_per_batch,
                            instances=args.instances, replicas=1, mesh=args.mesh,
                            fsdp=args.fsdp, dtype=args.dtype, loss="uad", steps=args.steps)


def measure_jax(args, variant, num_classes):
  import jax
  import numpy as np
  from uad_jax import sharding
  from uad_jax.training import train_state, train_step
  bts = _bench_train_step()
  c = bts.make_config(_step_args(args, variant), num_classes)
  c.lock()
  n_dev = math.prod(size for _, size in c.mesh)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:n_dev])
  abstract, shardings = train_state.create_train_state(c, num_classes, 100, mesh,
                                                       abstract_only=True)
  per_device = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                for x in jax.tree.leaves(tree))
  r = {"variant": variant, "ids": num_classes, "devices": n_dev,
       "state_per_device": per_device(abstract),
       "classifier_per_device": per_device(
           [abstract.params["classifier"], abstract.prototypes]),
       "init_temp_per_device": train_state.compiled_init(
           c, num_classes, 100, mesh).memory_analysis().temp_size_in_bytes}
  batch = bts.make_batch(c, num_classes, np.random.RandomState(0))
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in batch.items()}
  r["batch"] = len(batch["labels"])
  baseline = machine.peak_rss_bytes()
  predicted_state = baseline + n_dev * (r["state_per_device"] + r["init_temp_per_device"])
  run = not args.compile_only and predicted_state <= args.budget_gib * GIB
  if run:
    start = time.perf_counter()
    state, shardings = train_state.create_train_state(c, num_classes, 100, mesh, log=None)
    jax.block_until_ready(state)
    r["create_s"] = time.perf_counter() - start
    r["rss_after_state"] = machine.peak_rss_bytes()
    abstract = state
  else:
    r["not_run"] = (f"predicted {predicted_state / GIB:.1f} GiB for the state > "
                    f"{args.budget_gib} GiB" if not args.compile_only else "--compile-only")
  if args.state_only:
    return r
  with sharding.context(mesh, c.sharding_rules):
    start = time.perf_counter()
    step = train_step.jit_train_step(shardings, mesh).lower(abstract, abstract_batch).compile()
    r["compile_s"] = time.perf_counter() - start
    memory = step.memory_analysis()
    r["step_temp_per_device"] = memory.temp_size_in_bytes
    predicted = predicted_state + n_dev * (memory.temp_size_in_bytes
                                           + memory.argument_size_in_bytes
                                           - r["state_per_device"])
    if not run:
      return r
    if predicted > args.budget_gib * GIB:
      r["not_run"] = f"predicted {predicted / GIB:.1f} GiB for the step > {args.budget_gib} GiB"
      return r
    batches = [jax.device_put(bts.make_batch(c, num_classes, np.random.RandomState(i)),
                              batch_sharding) for i in range(2)]
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):
      state, metrics = step(state, batches[(i + 1) % 2])
    jax.block_until_ready(metrics)
    r["step_s"] = (time.perf_counter() - start) / args.steps
    r["rss_peak"] = machine.peak_rss_bytes()
  return r


def torch_bytes(variant, num_classes):
  """What the PyTorch peer holds for the identity count (classifier weight, gradient and
  momentum, the memory and its normalisation temporary) plus the backbone's parameters,
  gradients and momentum."""
  from uad_jax.models import vit
  s = vit.parse_variant(variant)
  backbone = s.depth * (4 * s.width**2 + 2 * s.width * s.mlp_dim) + 3 * s.patch**2 * s.width
  return 4 * (5 * num_classes * s.width + 3 * backbone)


def measure_torch(args, variant, num_classes):
  import torch
  torch.set_num_threads(os.cpu_count())
  bts = _bench_train_step()
  step_args = _step_args(args, variant)
  c = bts.make_config(step_args, num_classes)
  seconds = bts.time_torch_step(step_args, c, num_classes, autocast_bf16=False)
  return {"variant": variant, "ids": num_classes, "step_s": seconds,
          "rss_peak": machine.peak_rss_bytes()}


def child(args, kind, variant, num_classes):
  env = dict(os.environ)
  if kind == "jax":
    n_dev = math.prod(int(x) for x in args.mesh.split(","))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_dev}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
  argv = [sys.executable, os.path.abspath(__file__), f"--one={kind},{variant},{num_classes}",
          *sys.argv[1:]]
  done = subprocess.run(argv, env=env, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
  return {"variant": variant, "ids": num_classes, "failed": " | ".join(tail)}


def gb(x):
  return f"{x / 1e9:.3f}" if x is not None else "-"


def seconds(x, width):
  return f"{x:{width}.2f}" if x is not None else "-".rjust(width)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="mu/16,B/16")
  parser.add_argument("--identities", default="10000,100000,1000000")
  parser.add_argument("--mesh", default="1,8", help="data,model mesh sizes")
  parser.add_argument("--fsdp", action="store_true",
                      help="backbone parameters sharded over data too (the fsdp config)")
  parser.add_argument("--ids-per-batch", type=int, default=4, help="P (one replica group)")
  parser.add_argument("--instances", type=int, default=2, help="K")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
  parser.add_argument("--budget-gib", type=float, default=12.0)
  parser.add_argument("--compile-only", action="store_true", help="memory analysis, no run")
  parser.add_argument("--state-only", action="store_true", help="create the state, no step")
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.one:
    kind, variant, num_classes = args.one.split(",")
    sys.path.insert(0, ROOT)
    measure = measure_jax if kind == "jax" else measure_torch
    print("RESULT " + json.dumps(measure(args, variant, int(num_classes))), flush=True)
    return

  import jax
  print(f"# identity scaling: CPU {machine.cpu_model()}; jax {jax.__version__}; mesh data,model = "
        f"{args.mesh}{' with fsdp' if args.fsdp else ''}; batch M·P·K = "
        f"3·{args.ids_per_batch}·{args.instances}, 256x128, {args.dtype} products; "
        f"budget {args.budget_gib} GiB", flush=True)
  print("# per device: state, its classifier + memory, init scratch, step scratch (GB);"
        " process: peak RSS after the state / after the steps (GB); times (s)")
  print(f"{'variant':7s} {'ids':>9s} | {'state':>6s} {'cls+mem':>7s} {'init tmp':>8s} "
        f"{'step tmp':>8s} | {'RSS st':>6s} {'RSS pk':>6s} | {'create':>6s} {'compile':>7s} "
        f"{'step':>7s}")
  sys.path.insert(0, ROOT)
  for variant in args.variants.split(","):
    for num_classes in (int(float(x)) for x in args.identities.split(",")):
      r = child(args, "jax", variant, num_classes)
      if "failed" in r:
        print(f"{variant:7s} {num_classes:>9,d} | failed: {r['failed']}", flush=True)
        continue
      print(f"{variant:7s} {num_classes:>9,d} | {gb(r['state_per_device']):>6s} "
            f"{gb(r['classifier_per_device']):>7s} {gb(r['init_temp_per_device']):>8s} "
            f"{gb(r.get('step_temp_per_device')):>8s} | {gb(r.get('rss_after_state')):>6s} "
            f"{gb(r.get('rss_peak')):>6s} | {seconds(r.get('create_s'), 6)} "
            f"{seconds(r.get('compile_s'), 7)} {seconds(r.get('step_s'), 7)}"
            + (f"   not run: {r['not_run']}" if "not_run" in r else ""), flush=True)
  if args.no_peer or args.state_only:
    return
  try:
    from uad_jax.testing import timm_peer
    timm_peer.import_timm()
    import torch
  except ImportError:
    print("# PyTorch peer: torch/timm not installed")
    return
  print(f"# PyTorch {torch.__version__} peer, one CPU device, fp32: the whole classifier and "
        f"memory on it")
  for variant in args.variants.split(","):
    for num_classes in (int(float(x)) for x in args.identities.split(",")):
      need = torch_bytes(variant, num_classes)
      if need > args.budget_gib * GIB:
        print(f"torch   {variant:7s} {num_classes:>9,d} ids: weights, gradients, momentum and "
              f"memory alone need {need / 1e9:.1f} GB > {args.budget_gib} GiB: not run")
        continue
      r = child(args, "torch", variant, num_classes)
      if "failed" in r:
        print(f"torch   {variant:7s} {num_classes:>9,d} ids: failed: {r['failed']}")
        continue
      print(f"torch   {variant:7s} {num_classes:>9,d} ids: {r['step_s']:7.2f} s/step, peak RSS "
            f"{gb(r['rss_peak'])} GB (predicted held {need / 1e9:.2f} GB)", flush=True)


if __name__ == "__main__":
  main()
