"""A folder of images for the retrieval tools: what each file's path tells, and its pixels.

Any folder works. Where a path follows the WHU-MARS archive (`tfds_whumars.raw_layout`), its
labels come with it: the identity and camera from the file name (`<id>_c<camera>_…`), the
modality from the nearest folder named after one (RGB; IR or NIR; Thermal or TIR, in any case),
the viewpoint from the camera (the dataset's camera → viewpoint table). What a path does not tell
is unknown (−1), and the tools then say "unknown" instead of guessing.

Pixels are decoded with Pillow in threads and resized as the evaluation does (bilinear to H×W),
but kept uint8: normalisation happens on the device, a quarter of the bytes over the wire.
"""
import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from tfds_whumars import raw_layout
from uad_jax.data import augment

UNKNOWN = -1
MODALITIES = raw_layout.MODALITIES        # index = the dataset's modality label
VIEWPOINTS = raw_layout.VIEWPOINTS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Folder name (lower case) → modality. The archive's own names and the modality names.
MODALITY_FOLDERS = {
    **{folder.lower(): name for name, folder in raw_layout.MODALITY_FOLDERS.items()},
    **{name.lower(): name for name in MODALITIES}}


@dataclasses.dataclass(frozen=True)
class FolderImages:
  """The images under `root`, sorted by path, with the labels their paths tell (−1: unknown)."""
  root: str
  paths: tuple[str, ...]      # relative to root, '/'-separated
  person_ids: np.ndarray      # raw ids from the file names
  cameras: np.ndarray         # 0-based
  modalities: np.ndarray      # index into MODALITIES
  viewpoints: np.ndarray      # index into VIEWPOINTS

  def __len__(self) -> int:
    return len(self.paths)

  def file(self, index: int) -> str:
    return os.path.join(self.root, self.paths[index])


def scan(root, *, modality: str | None = None,
         camera_viewpoints: Sequence[str] = raw_layout.DEFAULT_CAMERA_VIEWPOINTS) -> FolderImages:
  """Every image file under `root` (recursively) and its labels.

  `modality`: the modality of the images whose folders do not name one (a folder of one
  sensor's images); the folder names win where they say it. `camera_viewpoints[c]`: the
  viewpoint of 0-based camera c. Raises ValueError naming the folder when it is missing or holds
  no image.
  """
  root = Path(root)
  if not root.is_dir():
    raise ValueError(f"{root}: not a folder")
  if modality is not None and modality not in MODALITIES:
    raise ValueError(f"modality {modality!r}: expected one of {MODALITIES}")
  unknown_views = sorted(set(camera_viewpoints) - set(VIEWPOINTS))
  if unknown_views:
    raise ValueError(f"camera viewpoints {unknown_views}: expected {VIEWPOINTS}")
  files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
  labels = np.full((4, len(files)), UNKNOWN, np.int32)  # ids, cameras, modalities, viewpoints
  for i, rel_path in enumerate(files):
    parts = rel_path.split("/")
    parsed = raw_layout.parse_file_name(parts[-1])
    if parsed is not None:
      labels[0, i], labels[1, i] = parsed
      if parsed[1] < len(camera_viewpoints):
        labels[3, i] = VIEWPOINTS.index(camera_viewpoints[parsed[1]])
    name = next((MODALITY_FOLDERS[p.lower()] for p in reversed(parts[:-1])
                 if p.lower() in MODALITY_FOLDERS), modality)
    if name is not None:
      labels[2, i] = MODALITIES.index(name)
  return FolderImages(str(root), tuple(files), *labels)


def load_image(path: str, image_size) -> np.ndarray:
  """uint8 [H, W, 3]: the file decoded to RGB (grey images get three equal channels) and resized
  as the evaluation does (`augment.test_resize`, before it normalises)."""
  augment.check_image_size(image_size)  # a bad size fails before any file is read
  try:
    with open(path, "rb") as f:
      image = augment.to_rgb_image(f.read())
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise ValueError(f"{path}: cannot read the image: {error}") from error
  return augment.test_resize(image, image_size)


def batches(files: Sequence[str], image_size, batch_size: int, *,
            threads: int = 4) -> Iterator[np.ndarray]:
  """uint8 [n, H, W, 3] batches of `files` in order (n = batch_size, the last one shorter),
  decoded by `threads` threads one batch ahead of the consumer."""
  if batch_size < 1:
    raise ValueError(f"batch size must be >= 1, got {batch_size}")
  starts = range(0, len(files), batch_size)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    def submit(start):
      return [pool.submit(load_image, path, image_size)
              for path in files[start:start + batch_size]]
    pending = submit(starts[0]) if starts else None
    for k in range(len(starts)):
      current = pending
      pending = submit(starts[k + 1]) if k + 1 < len(starts) else None
      yield np.stack([future.result() for future in current])
