"""Train input pipeline throughput (read + JPEG decode + augment + batch), images/s.

Builds a synthetic WHU-MARS with tfds_whumars (generator + TFDS ArrayRecord build) in a temporary
folder, then times the train stream of one replica group (16×3×4 = 192 images at 256×128 by
default) with 0, 1 and 2 worker processes. The first step of each run (worker start-up, epoch
planning) is not timed; the prefetch buffers it lets fill (a few hundred images) are a small
part of the timed steps.

  python bench/input_pipeline.py [--ids 60] [--steps 10] [--repeats 3] [--threads 2]
                                 [--workers 0,1,2]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uad_jax.data import input_pipeline  # noqa: E402
from uad_jax.data import sampler  # noqa: E402


def build_synthetic(folder: str, ids: int) -> str:
  """Generates and builds a synthetic whu_mars/whumars1000 under `folder`; returns its data_dir."""
  raw, data_dir = os.path.join(folder, "raw"), os.path.join(folder, "tfds")
  for command in (["tfds_whumars.synthetic", "--out", raw, "--ids", str(ids), "--seed", "0"],
                  ["tfds_whumars.build", "--config=whumars1000", f"--manual_dir={raw}",
                   f"--data_dir={data_dir}"]):
    subprocess.run([sys.executable, "-m", *command], check=True, capture_output=True)
  return data_dir


def images_per_second(source, metadata, shape, args, num_workers: int) -> list[float]:
  """images/s of each of `args.repeats` timed windows of `args.steps` steps, one iterator."""
  # Enough epochs for the timed steps; planning a small set's epochs is quick.
  plan = input_pipeline.plan_training(metadata, shape, seed=0,
                                      num_epochs=args.steps * args.repeats + 1,
                                      missing_modality="drop")
  dataset = input_pipeline.make_train_dataset(source, plan, image_size=tuple(args.image_size),
                                              num_workers=num_workers, num_threads=args.threads)
  iterator = iter(dataset)
  rates = []
  try:
    next(iterator)  # start-up
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        next(iterator)
      rates.append(args.steps * shape.step_rows / (time.perf_counter() - start))
    return rates
  finally:
    iterator.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ids", type=int, default=60, help="synthetic identities (half train)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed windows per worker count; the best is the least disturbed by "
                           "other load on the machine")
  parser.add_argument("--threads", type=int, default=2, help="decode threads per process")
  parser.add_argument("--workers", default="0,1,2", help="worker process counts to time")
  parser.add_argument("--identities", type=int, default=16, help="P")
  parser.add_argument("--instances", type=int, default=4, help="K")
  parser.add_argument("--image_size", type=int, nargs=2, default=(256, 128), help="H W")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    data_dir = build_synthetic(folder, args.ids)
    source = input_pipeline.open_split("whu_mars/whumars1000", "train", data_dir)
    metadata = input_pipeline.read_metadata(source)
    print(f"synthetic set: {len(source)} train images, {args.ids} ids "
          f"(built in {time.perf_counter() - start:.1f} s)")
    shape = sampler.BatchShape(identities=args.identities, instances=args.instances)
    print(f"step: {shape.step_rows} images at {args.image_size[0]}×{args.image_size[1]}, "
          f"{args.threads} decode thread(s) per process, {os.cpu_count()} CPU core(s)")
    for workers in (int(w) for w in args.workers.split(",")):
      rates = images_per_second(source, metadata, shape, args, workers)
      print(f"workers={workers}: {max(rates):7.0f} images/s (best of {len(rates)} windows; all: "
            f"{', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
  main()
