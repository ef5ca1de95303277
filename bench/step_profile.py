"""Where the UAD train step's time goes, by kind of XLA op: matrix products, transposes and copies,
dtype converts, reductions, element-wise fusions.

  python bench/step_profile.py [--variant B/16] [--identities 4 --instances 4] [--dtype bfloat16]
                               [--steps 2] [--top 15]

Runs the jitted step (bench/train_step.py's config and batch) under ``jax.profiler.trace``, reads
the Perfetto trace's per-thunk events (XLA:CPU names each by its HLO instruction) and classifies
each instruction from the compiled HLO: a fusion counts as a product if it contains a dot or a
convolution, as a transpose if its root is a transpose or copy, and so on. Prints the share of
the step in each kind and the most expensive instructions.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402  (bench/machine.py: this folder is the script's sys.path[0])
import train_step as bench_step  # noqa: E402  (bench/train_step.py)
from uad_jax import sharding  # noqa: E402
from uad_jax.training import train_state, train_step  # noqa: E402

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_PRODUCTS = ("dot", "convolution")


def sites(hlo_text: str) -> dict[str, str]:
  """Instruction name → where in the model it comes from: its JAX op_name with the block index
  dropped and the backward pass marked, e.g. "bwd backbone/block*/mlp/fc2/dot_general"."""
  found = {}
  for line in hlo_text.splitlines():
    match, op_name = _INSTRUCTION.match(line), _OP_NAME.search(line)
    if match and op_name:
      name = op_name.group(1).removeprefix("jit(train_step)/")
      direction = "bwd" if name.startswith("transpose(") else "fwd"
      name = re.sub(r"(transpose|jvp)\((\w+)\)", r"\2", name)
      name = re.sub(r"block\d+", "block*", name).replace("UADNet/", "")
      found.setdefault(match.group(1), f"{direction} {name}")
  return found


def hlo_instructions(hlo_text: str):
  """{computation: [(name, opcode, called computation, is_root)]} of an HLO module's text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0]:
      current = computations.setdefault(head.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      called = _CALLS.search(line)
      current.append((match.group(1), match.group(2), called.group(1) if called else None,
                      line.lstrip().startswith("ROOT")))
  return computations


def kinds_of(computations) -> dict[str, str]:
  """Kind of every instruction name: product | transpose/copy | convert | reduce | elementwise |
  other, looking inside fusions and calls."""
  def ops(computation, seen=()):
    found = []
    for _, opcode, called, _ in computations.get(computation, ()):
      found.append(opcode)
      if called and called not in seen:
        found += ops(called, seen + (computation,))
    return found

  def root(computation):
    return next((op for _, op, _, is_root in computations.get(computation, ()) if is_root), "")

  kinds = {}
  for instructions in computations.values():
    for name, opcode, called, _ in instructions:
      inner = ops(called) if called else [opcode]
      if opcode in _PRODUCTS or any(op in _PRODUCTS for op in inner) or "dot" in name:
        kind = "product"
      elif opcode in ("transpose", "copy") or (called and root(called) in ("transpose", "copy")):
        kind = "transpose/copy"
      elif opcode == "convert" or (called and set(inner) <= {"convert", "parameter", "bitcast",
                                                             "broadcast", "constant"}):
        kind = "convert"
      elif opcode in ("reduce", "reduce-window") or "reduce" in inner:
        kind = "reduce"
      elif opcode == "fusion":
        kind = "elementwise"
      else:
        kind = "other"
      kinds[name] = kind
  return kinds


def profile(c, num_classes, steps):
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  state, shardings = train_state.create_train_state(c, num_classes, 100, mesh, log=None)
  step = train_step.jit_train_step(shardings, mesh)
  batch = jax.device_put(bench_step.make_batch(c, num_classes, np.random.RandomState(0)),
                         sharding.batch_sharding(mesh))
  with sharding.context(mesh, c.sharding_rules):
    hlo = step.lower(state, batch).compile().as_text()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as folder:
      with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
          state, metrics = step(state, batch)
          jax.block_until_ready(metrics)
      path = glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
      with gzip.open(path) as f:
        trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  seconds = collections.Counter()
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    if event.get("ph") == "X" and op:
      seconds[op] += event["dur"] / 1e6 / steps
  return seconds, kinds_of(hlo_instructions(hlo)), sites(hlo)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--identities", type=int, default=4)
  parser.add_argument("--instances", type=int, default=4)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--activations", default="auto", help="auto | float32 | bfloat16")
  parser.add_argument("--num-classes", type=int, default=2337)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  args.replicas, args.mesh, args.fsdp, args.loss = 1, "1,1", False, "uad"
  c = bench_step.make_config(args, args.num_classes)
  seconds, kinds, where = profile(c, args.num_classes, args.steps)
  total = sum(seconds.values())
  by_kind = collections.Counter()
  for op, s in seconds.items():
    by_kind[kinds.get(op, "other")] += s
  n = c.sampler.modalities * c.sampler.identities * c.sampler.instances
  print(f"# UAD step profile, ViT-{args.variant}, batch {n}, {args.dtype} products, "
        f"{args.activations} activations, "
        f"{machine.cpu_model()}, jax {jax.__version__}")
  print(f"ops total {total:.2f} s/step ({n / total:.2f} img/s)")
  for kind, s in by_kind.most_common():
    print(f"  {kind:15s} {s:7.3f} s  {100 * s / total:5.1f} %")
  print(f"# top {args.top} instructions")
  for op, s in seconds.most_common(args.top):
    print(f"  {s:7.3f} s  {kinds.get(op, 'other'):15s} {op:24s} {where.get(op, '')}")
  by_site = collections.Counter()
  for op, s in seconds.items():
    by_site[(kinds.get(op, "other"), where.get(op, op))] += s
  print(f"# top {args.top} sites (all blocks together)")
  for (kind, site), s in by_site.most_common(args.top):
    print(f"  {s:7.3f} s  {100 * s / total:5.1f} %  {kind:15s} {site}")


if __name__ == "__main__":
  main()
