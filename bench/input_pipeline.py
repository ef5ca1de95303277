"""Train input pipeline throughput (read + JPEG decode + augment + batch), images/s, against the
reference's PyTorch DataLoader.

Builds a synthetic WHU-MARS with tfds_whumars (generator + TFDS ArrayRecord build) in a temporary
folder, then times the train stream of one replica group (16×3×4 = 192 images at 256×128 by
default) for each worker count, with the augmentation on the device (what the host does: decode,
draw, and resize only the images larger than the output; uint8 out) and on the host (float32
out). The first step of each run (worker start-up, epoch planning) is not timed; the prefetch
buffers it lets fill (a few hundred images)
are a small part of the timed steps.

The peer, where torch is installed: a torch DataLoader (default collate) over the same records in
the same order, with the reference's transforms (Resize bicubic, RandomHorizontalFlip, Pad(10),
RandomCrop, ToTensor, Normalize(.5, .5), RandomErasing(p=.5, value='random')) written here on PIL
and torch, torchvision's semantics, since torchvision need not be installed. It gets the same
budget as each of our settings: num_workers = decode threads × worker processes (at least 1).
images/s per core divides by the cores a run can use: min(budget, CPUs).

Also times the device side of `augment_on="device"`: the jitted `device_augment.augment_batch`
of `--device_rows` images, every one resized there (the most work), to set beside a train step.

  python bench/input_pipeline.py [--ids 60] [--steps 10] [--repeats 3] [--threads 2]
                                 [--workers 0,1,2] [--device_rows 48]
"""
import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import machine  # noqa: E402  (bench/machine.py: this folder is the script's sys.path[0])
from uad_jax.data import augment  # noqa: E402
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


def _plan(metadata, shape, args):
  # Enough epochs for the timed steps; planning a small set's epochs is quick.
  return input_pipeline.plan_training(metadata, shape, seed=0,
                                      num_epochs=args.steps * args.repeats + 1,
                                      missing_modality="drop")


def _timed(iterator, rows: int, args) -> list[float]:
  """images/s of each of `args.repeats` windows of `args.steps` batches after a first one."""
  next(iterator)  # start-up
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      next(iterator)
    rates.append(args.steps * rows / (time.perf_counter() - start))
  return rates


def images_per_second(source, metadata, shape, args, num_workers: int,
                      augment_on: str) -> list[float]:
  """Our pipeline's images/s in each timed window, one iterator."""
  dataset = input_pipeline.make_train_dataset(
      source, _plan(metadata, shape, args), image_size=tuple(args.image_size),
      augment_on=augment_on, num_workers=num_workers, num_threads=args.threads)
  iterator = iter(dataset)
  try:
    return _timed(iterator, shape.step_rows, args)
  finally:
    iterator.close()


def reference_transform(image_size, padding: int = augment.PADDING):
  """The reference's train transforms, torchvision's semantics on PIL and torch: a callable PIL
  image → float32 tensor [3, H, W]."""
  import torch  # pylint: disable=g-import-not-at-top
  height, width = image_size

  def flip(image):  # RandomHorizontalFlip(p=0.5)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else image

  def random_crop(image):  # RandomCrop((H, W)) of the padded image
    top = int(torch.randint(0, image.height - height + 1, size=(1,)))
    left = int(torch.randint(0, image.width - width + 1, size=(1,)))
    return image.crop((left, top, left + width, top + height))

  def to_tensor(image):  # ToTensor, then Normalize(0.5, 0.5)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div(255).sub_(0.5).div_(0.5)

  def random_erasing(x, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):  # p=0.5, value='random'
    if torch.rand(1) >= 0.5:
      return x
    channels, h_img, w_img = x.shape
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
      area = h_img * w_img * torch.empty(1).uniform_(*scale).item()
      aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if h < h_img and w < w_img:
        noise = torch.empty([channels, h, w], dtype=torch.float32).normal_()
        top = int(torch.randint(0, h_img - h + 1, size=(1,)))
        left = int(torch.randint(0, w_img - w + 1, size=(1,)))
        x[:, top:top + h, left:left + w] = noise
        return x
    return x

  def transform(image):
    image = image.resize((width, height), Image.BICUBIC)  # Resize((H, W), BICUBIC)
    image = ImageOps.expand(flip(image), border=padding, fill=0)  # Pad(10)
    return random_erasing(to_tensor(random_crop(image)))
  return transform


def peer_images_per_second(source, metadata, shape, args, num_workers: int) -> list[float]:
  """The reference's DataLoader's images/s over the same records in the same order."""
  import torch  # pylint: disable=g-import-not-at-top
  plan = _plan(metadata, shape, args)
  order = np.concatenate([plan.sampler.epoch_steps(e).ravel()
                          for e in range(len(plan.steps_per_epoch))])
  transform = reference_transform(args.image_size)

  class Records(torch.utils.data.Dataset):
    def __len__(self):
      return len(source)

    def __getitem__(self, index):
      record = source[int(index)]
      return transform(augment.to_rgb_image(record["image"])), int(record["label"])

  loader = torch.utils.data.DataLoader(Records(), batch_size=shape.step_rows,
                                       sampler=order.tolist(), num_workers=num_workers,
                                       drop_last=True)
  return _timed(iter(loader), shape.step_rows, args)


def device_augment_seconds(rows: int, image_size, repeats: int = 5) -> float:
  """Best time of the jitted device augmentation of `rows` images, each resized from a smaller
  size first (compiled beforehand)."""
  import jax  # pylint: disable=g-import-not-at-top
  from uad_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (rows, *image_size, 3), dtype=np.uint8)
  raw_sizes = np.stack([rng.integers(1, image_size[0], rows), rng.integers(1, image_size[1], rows)],
                       axis=1).astype(np.int32)
  params = np.stack([augment.train_params(augment.image_rng(0, 0, i), image_size)
                     for i in range(rows)])
  inputs = jax.device_put((pixels, params, raw_sizes))
  run = jax.jit(device_augment.augment_batch)
  run(*inputs).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(*inputs).block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times)


def share_resized_on_device(source, image_size, count: int = 2000) -> float:
  """Share of the split's images no larger than the output, which the device resizes (read from
  the JPEG headers of up to `count` records)."""
  height, width = image_size
  fits = []
  for index in range(min(count, len(source))):
    with Image.open(io.BytesIO(source[index]["image"])) as image:
      fits.append(image.height <= height and image.width <= width)
  return float(np.mean(fits))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ids", type=int, default=60, help="synthetic identities (half train)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed windows per setting; the best is the least disturbed by "
                           "other load on the machine")
  parser.add_argument("--threads", type=int, default=2, help="decode threads per process")
  parser.add_argument("--workers", default="0,1,2", help="worker process counts to time")
  parser.add_argument("--identities", type=int, default=16, help="P")
  parser.add_argument("--instances", type=int, default=4, help="K")
  parser.add_argument("--image_size", type=int, nargs=2, default=(256, 128), help="H W")
  parser.add_argument("--device_rows", type=int, default=48,
                      help="images of the timed device augmentation (0: skip it)")
  args = parser.parse_args()

  print(f"CPU: {machine.cpu_model()}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    peer = f"torch {torch.__version__}"
  except ImportError as e:
    torch, peer = None, None
    print(f"peer: skipped (torch not importable: {e})")
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    data_dir = build_synthetic(folder, args.ids)
    source = input_pipeline.open_split("whu_mars/whumars1000", "train", data_dir)
    metadata = input_pipeline.read_metadata(source)
    print(f"synthetic set: {len(source)} train images, {args.ids} ids "
          f"(built in {time.perf_counter() - start:.1f} s)")
    print(f"images no larger than {args.image_size[0]}×{args.image_size[1]}, resized on the "
          f"device: {100 * share_resized_on_device(source, args.image_size):.1f} %")
    shape = sampler.BatchShape(identities=args.identities, instances=args.instances)
    print(f"step: {shape.step_rows} images at {args.image_size[0]}×{args.image_size[1]}, "
          f"{args.threads} decode thread(s) per process, {os.cpu_count()} CPU core(s)")
    for workers in (int(w) for w in args.workers.split(",")):
      budget = max(1, workers) * args.threads
      cores = min(budget, os.cpu_count())
      best = {}
      for augment_on in augment.AUGMENT_ON:
        rates = images_per_second(source, metadata, shape, args, workers, augment_on)
        best[augment_on] = max(rates)
        print(f"workers={workers} augment_on={augment_on}: {best[augment_on]:7.0f} images/s, "
              f"{best[augment_on] / cores:6.0f} per core (best of {len(rates)} windows; all: "
              f"{', '.join(f'{r:.0f}' for r in rates)})")
      if torch is not None:
        rates = peer_images_per_second(source, metadata, shape, args, budget)
        print(f"  peer ({peer} DataLoader, num_workers={budget}): {max(rates):7.0f} images/s, "
              f"{max(rates) / cores:6.0f} per core (all: {', '.join(f'{r:.0f}' for r in rates)})")
        print(f"  ours (device) / peer: {best['device'] / max(rates):.2f}× per core "
              f"(host: {best['host'] / max(rates):.2f}×; same {cores} core(s))")
  if args.device_rows:
    seconds = device_augment_seconds(args.device_rows, tuple(args.image_size))
    print(f"device augmentation (jit, {args.device_rows} images at {args.image_size[0]}×"
          f"{args.image_size[1]}): {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
