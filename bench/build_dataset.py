"""Images/s of the synthetic generator and of the whu_mars TFDS build with 1 and 2 worker processes.

Workers decode-check the JPEGs (the larger share of a build); serialising and writing the
ArrayRecord shards stays in the main process, as TFDS without Beam writes sequentially. The raw
files are freshly written, so the build reads them from the page cache.

  python bench/build_dataset.py [--images 6000] [--seed 0] [--repeats 3]
"""
import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # noqa: E402

from tfds_whumars import build  # noqa: E402
from tfds_whumars import jpeg_check  # noqa: E402
from tfds_whumars import synthetic  # noqa: E402

# A synthetic identity has ~30 images with the default options.
_IMAGES_PER_ID = 30


def _best_seconds(fn, repeats: int) -> float:
  """Fastest of `repeats` runs: other load on the machine only ever adds time."""
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=6000, help="approximate size of the set")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=3, help="builds per setting; best is shown")
  args = parser.parse_args()
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory(prefix="bench_whumars_") as tmp:
    manual = Path(tmp) / "manual"
    num_ids = max(2, math.ceil(args.images / _IMAGES_PER_ID))
    start = time.perf_counter()
    images = synthetic.generate(manual, num_ids, args.seed)
    seconds = time.perf_counter() - start
    print(f"generator: {len(images)} images ({num_ids} ids) in {seconds:.2f} s = "
          f"{len(images) / seconds:.0f} images/s (1 core)")
    rel_paths = [image.rel_path for image in images]
    for workers in (1, 2):
      check_seconds = _best_seconds(
          lambda: jpeg_check.find_corrupt(manual / "WHU-MARS", rel_paths, workers), args.repeats)
      data_dirs = iter(tempfile.mkdtemp(dir=tmp) for _ in range(args.repeats))
      build_seconds = _best_seconds(lambda: build.build(
          "whumars1000", manual, next(data_dirs), num_workers=workers), args.repeats)
      print(f"build, {workers} worker(s): {len(images) / build_seconds:.0f} images/s "
            f"({build_seconds:.2f} s; the JPEG check alone: {check_seconds:.2f} s = "
            f"{len(images) / check_seconds:.0f} images/s)")


if __name__ == "__main__":
  main()
