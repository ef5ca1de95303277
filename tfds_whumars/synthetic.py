"""Synthetic WHU-MARS: a raw folder with the released layout and learnable, non-trivial people.

  python -m tfds_whumars.synthetic --out DIR --ids N --seed S [--root_name WHU-MARS_2337] \
      [--difficulty demo] [--test_ids T]

writes DIR/WHU-MARS/{train,query,test}/{RGB,IR,Thermal}/<id:04d>_c<cam>_<frame:06d>.jpg. Like
ReID datasets, about half the identities are for training and the others for testing (disjoint);
per test identity and modality a few images go to query/, the rest to test/ (the gallery). Every
identity is seen by a random subset of the cameras (at least one ground camera and one UAV) and
every frame is a synchronised RGB/NIR/TIR triplet. The same seed gives the same bytes.

For identity-count scaling studies, `Options.test_ids` = T fixes the test people instead: raw ids
1..T are the test identities and T+1..N train, and since everything a person's images depend on
is drawn from generators seeded by the set's seed and that person's id, the query/ and test/
folders of two sets with the same seed and T are the same bytes whatever their N.
"""
import argparse
import dataclasses
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tfds_whumars import raw_layout
from tfds_whumars import synthetic_people
from tfds_whumars import synthetic_render


@dataclasses.dataclass(frozen=True)
class Options:
  """Knobs of a synthetic set beyond its size and seed. Defaults give ~30 images per identity."""
  frames_per_camera: int = 2  # mean frames per (identity, camera); a frame is an RGB/NIR/TIR triple
  min_cameras: int = 3  # per identity, out of the 7; at least one ground and one aerial
  train_fraction: float = 0.5  # of identities; the rest are query/gallery identities
  queries_per_modality: int = 1  # per test identity: frames moved from the gallery to query/
  lookalike_fraction: float = 0.1  # identities dressed almost like another one of their split
  night_fraction: float = 0.3  # frames captured at night
  train_ids_missing_modality: int = 0  # train identities given no images in one modality
  crop_scale: float = 1.0  # multiplies crop sizes (dummy_data uses small crops to stay tiny)
  spectral_coupling: float = 0.0  # 0: NIR/heat independent of colour; 1: they follow luminance
  jpeg_quality: int = 90
  camera_viewpoints: tuple[str, ...] = raw_layout.DEFAULT_CAMERA_VIEWPOINTS
  # Scaling studies (module docstring). 0 keeps the plain sets above, made before these existed.
  test_ids: int = 0  # >0: raw ids 1..test_ids test, the others train; train_fraction unused
  train_frames_per_camera: int = 0  # >0: frames_per_camera of train identities (a cheaper set)


@dataclasses.dataclass
class _Capture:
  """One frame of one camera showing one person, and where each modality's image goes (planning
  moves some of a test identity's images to query/ after the capture is made)."""
  person_id: int
  camera: int  # 0-based
  frame: int
  split_of_modality: dict[str, str]  # modality -> split; a modality left out has no image


# Named difficulties. "default" is the benchmark-like set (night frames, look-alikes, sensor tables
# independent of colour). "demo" is what a tiny model trained for minutes on a CPU can learn to
# re-identify across modalities: daylight only, no look-alikes, and garments whose NIR and heat
# follow their colour's brightness (so patterns and two-tone outfits carry across sensors).
DIFFICULTIES = {
    "default": Options(),
    "demo": Options(night_fraction=0.0, lookalike_fraction=0.0, spectral_coupling=0.8),
}

# Fewest and most identities of a set: one train and one test identity; the released sets have
# 4-digit raw ids, a scaling study may need 5 (the file-name pattern takes any number of digits).
ID_RANGE = (2, 99999)


def options_for(difficulty: str, **overrides) -> Options:
  """The Options of a named difficulty, with fields replaced by `overrides`."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"unknown synthetic difficulty {difficulty!r}; expected one of "
                     f"{sorted(DIFFICULTIES)}")
  return dataclasses.replace(DIFFICULTIES[difficulty], **overrides)


def num_train_ids(num_ids: int, options: Options) -> int:
  """How many of a set's `num_ids` identities are for training."""
  if options.test_ids:
    if not 1 <= options.test_ids < num_ids:
      raise ValueError(f"test_ids must be in 1..num_ids-1 (at least one train identity), got "
                       f"test_ids={options.test_ids} of num_ids={num_ids}")
    return num_ids - options.test_ids
  return min(num_ids - 1, max(1, int(round(num_ids * options.train_fraction))))


def _identity_split(num_ids: int, seed: int, options: Options) -> tuple[list[int], list[int]]:
  """Raw ids 1..num_ids shuffled into train and test, so train ids are not contiguous; with
  options.test_ids, 1..test_ids test and the rest train, so the test ids do not depend on
  num_ids."""
  if not ID_RANGE[0] <= num_ids <= ID_RANGE[1]:
    raise ValueError(f"num_ids must be in {ID_RANGE[0]}..{ID_RANGE[1]}, got {num_ids}")
  num_train = num_train_ids(num_ids, options)
  if options.test_ids:
    return list(range(options.test_ids + 1, num_ids + 1)), list(range(1, options.test_ids + 1))
  ids = np.random.default_rng([seed, 0]).permutation(np.arange(1, num_ids + 1))
  return sorted(ids[:num_train].tolist()), sorted(ids[num_train:].tolist())


def _appearances(train_ids, test_ids, seed, options):
  """Identity -> Appearance; look-alike pairs are made within a split, where they confuse."""
  appearances = {pid: synthetic_people.sample_appearance(np.random.default_rng([seed, 1, pid]),
                                                        options.spectral_coupling)
                 for pid in train_ids + test_ids}
  shared = np.random.default_rng([seed, 2])
  for split, ids in enumerate((train_ids, test_ids)):
    # A fixed test set pairs its look-alikes with a generator of its own: a shared one would have
    # been advanced by the train split's draws, which depend on its size.
    rng = np.random.default_rng([seed, 2, split]) if options.test_ids else shared
    num_pairs = int(round(len(ids) * options.lookalike_fraction / 2))
    pairs = rng.permutation(ids)[:2 * num_pairs].reshape(-1, 2)
    for original, copy in pairs.tolist():
      appearances[copy] = synthetic_people.lookalike(
          appearances[original], np.random.default_rng([seed, 3, copy]))
  return appearances


def _cameras_of(pid: int, seed: int, options: Options) -> list[int]:
  viewpoints = np.array(options.camera_viewpoints)
  rng = np.random.default_rng([seed, 4, pid])
  ground, aerial = np.flatnonzero(viewpoints == "ground"), np.flatnonzero(viewpoints == "aerial")
  must = [rng.choice(group) for group in (ground, aerial) if len(group)]
  others = np.setdiff1d(np.arange(len(viewpoints)), must)
  count = rng.integers(max(options.min_cameras, len(must)), len(viewpoints) + 1)
  chosen = must + rng.choice(others, count - len(must), replace=False).tolist()
  return sorted(int(camera) for camera in chosen)


def plan(num_ids: int, seed: int, options: Options = Options()):
  """(captures, appearances) of a synthetic set, without rendering anything."""
  train_ids, test_ids = _identity_split(num_ids, seed, options)
  rng = np.random.default_rng([seed, 5])
  missing = dict(zip(
      rng.permutation(train_ids)[:options.train_ids_missing_modality].tolist(),
      rng.choice(raw_layout.MODALITIES, size=options.train_ids_missing_modality).tolist()))
  captures = []
  train_set = set(train_ids)
  for pid in train_ids + test_ids:
    pid_rng = np.random.default_rng([seed, 6, pid])
    split = "train" if pid in train_set else "gallery"
    frames_per_camera = (options.train_frames_per_camera if split == "train" else 0
                         ) or options.frames_per_camera
    pid_captures = []
    for camera in _cameras_of(pid, seed, options):
      num_frames = pid_rng.integers(1, 2 * frames_per_camera)
      for frame in sorted(pid_rng.choice(1_000_000, size=num_frames, replace=False).tolist()):
        split_of_modality = {m: split for m in raw_layout.MODALITIES if missing.get(pid) != m}
        pid_captures.append(_Capture(pid, camera, frame, split_of_modality))
    if split == "gallery":
      for modality in raw_layout.MODALITIES:
        count = min(options.queries_per_modality, len(pid_captures) - 1)
        for index in pid_rng.choice(len(pid_captures), size=count, replace=False):
          pid_captures[index].split_of_modality[modality] = "query"
    captures.extend(pid_captures)
  return captures, _appearances(train_ids, test_ids, seed, options)


def _file_of(capture: _Capture, modality: str) -> raw_layout.RawImage:
  split = capture.split_of_modality[modality]
  name = f"{capture.person_id:04d}_c{capture.camera + 1}_{capture.frame:06d}.jpg"
  rel_path = (f"{raw_layout.SPLIT_FOLDERS[split]}/{raw_layout.MODALITY_FOLDERS[modality]}/"
              f"{name}")
  return raw_layout.RawImage(rel_path, split, modality, capture.person_id, capture.camera)


def _jpeg(array: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def generate(out_dir, num_ids: int, seed: int, root_name: str = "WHU-MARS",
             options: Options = Options()) -> list[raw_layout.RawImage]:
  """Writes `out_dir/root_name/...` and returns the images written, sorted by path.

  The set is written under a temporary name and renamed when complete, so an interrupted run
  never leaves a folder that looks like a finished one; an existing `root_name` is an error.
  """
  if root_name not in raw_layout.RAW_FOLDERS.values():
    raise ValueError(f"root_name must be one of {sorted(raw_layout.RAW_FOLDERS.values())}, "
                     f"got {root_name!r}")
  root = Path(out_dir) / root_name
  if root.exists():
    raise FileExistsError(f"{root} already exists; choose another --out or remove it")
  staging = Path(out_dir) / f".{root_name}.incomplete"
  shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted run of ours
  for split_folder in raw_layout.SPLIT_FOLDERS.values():
    for modality_folder in raw_layout.MODALITY_FOLDERS.values():
      (staging / split_folder / modality_folder).mkdir(parents=True)

  captures, appearances = plan(num_ids, seed, options)
  written = []
  for capture in captures:
    rng = np.random.default_rng([seed, 7, capture.person_id, capture.camera, capture.frame])
    images = synthetic_render.render_capture(
        appearances[capture.person_id], options.camera_viewpoints[capture.camera],
        capture.camera, rng, night=bool(rng.uniform() < options.night_fraction),
        crop_scale=options.crop_scale)
    for modality in capture.split_of_modality:
      image = _file_of(capture, modality)
      (staging / image.rel_path).write_bytes(_jpeg(images[modality], options.jpeg_quality))
      written.append(image)
  os.rename(staging, root)
  return sorted(written, key=lambda image: image.rel_path)


def count_by_split_and_modality(images: list[raw_layout.RawImage]) -> dict[tuple[str, str], int]:
  counts = {}
  for image in images:
    counts[image.split, image.modality] = counts.get((image.split, image.modality), 0) + 1
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder to create the raw root in")
  parser.add_argument("--ids", type=int, required=True,
                      help=f"number of identities ({ID_RANGE[0]}..{ID_RANGE[1]})")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root_name", "--root-name", default="WHU-MARS",
                      choices=sorted(raw_layout.RAW_FOLDERS.values()))
  parser.add_argument("--difficulty", default="default", choices=sorted(DIFFICULTIES),
                      help="named set of the knobs below (DIFFICULTIES)")
  # Each knob given replaces the difficulty's value.
  parser.add_argument("--frames_per_camera", "--frames-per-camera", type=int)
  parser.add_argument("--crop_scale", "--crop-scale", type=float)
  parser.add_argument("--train_ids_missing_modality", "--train-ids-missing-modality", type=int)
  parser.add_argument("--test_ids", "--test-ids", type=int,
                      help="fixed test identities 1..T, the same people whatever --ids")
  parser.add_argument("--train_frames_per_camera", "--train-frames-per-camera", type=int)
  args = parser.parse_args(argv)
  overrides = {k: getattr(args, k) for k in ("frames_per_camera", "crop_scale",
                                             "train_ids_missing_modality", "test_ids",
                                             "train_frames_per_camera")
               if getattr(args, k) is not None}
  options = options_for(args.difficulty, **overrides)
  start = time.perf_counter()
  images = generate(args.out, args.ids, args.seed, args.root_name, options)
  seconds = time.perf_counter() - start
  for (split, modality), count in sorted(count_by_split_and_modality(images).items()):
    print(f"{split:8s} {modality:4s} {count:8d} images")
  print(f"wrote {len(images)} images to {Path(args.out) / args.root_name} in {seconds:.1f} s "
        f"({len(images) / seconds:.0f} images/s)")


if __name__ == "__main__":
  main()
