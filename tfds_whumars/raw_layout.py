"""The raw WHU-MARS folder layout: names, file-name parsing, and a scan that explains bad input.

One place for what the released archive looks like, shared by the TFDS builder (which reads it)
and the synthetic generator (which writes it):

  <root>/WHU-MARS/ or <root>/WHU-MARS_2337/
    train/ query/ test/            (test/ is the gallery)
      RGB/ IR/ Thermal/            (RGB, near infrared, thermal infrared)
        <id>_c<cam>_<anything>.jpg (id and 1-based camera from the regex (\\d+)_c(\\d+);
                                    .jpg or .jpeg, in any case)

This module does not import tfds, so the generator and tests can use it on their own.
"""
import dataclasses
import re
from pathlib import Path

# Split name in the dataset -> folder name in the archive. `test/` holds the gallery.
SPLIT_FOLDERS = {"train": "train", "query": "query", "gallery": "test"}
# Modality name in the dataset -> folder name in the archive.
MODALITY_FOLDERS = {"RGB": "RGB", "NIR": "IR", "TIR": "Thermal"}
MODALITIES = tuple(MODALITY_FOLDERS)
VIEWPOINTS = ("ground", "aerial")

# Camera (0-based, file name's c-1) -> viewpoint. WHU-MARS has 5 ground nodes and 2 UAVs, but the
# file names do not say which camera is which: "cameras 0..4 ground, 5..6 aerial" is OUR
# convention. The builder config carries this table (`camera_viewpoints`) and may override it;
# the synthetic generator renders with the same table, so both agree by construction.
DEFAULT_CAMERA_VIEWPOINTS = ("ground",) * 5 + ("aerial",) * 2

RAW_FOLDERS = {"whumars1000": "WHU-MARS", "whumars2337": "WHU-MARS_2337"}
FILE_NAME_PATTERN = re.compile(r"(\d+)_c(\d+)")
# Image suffixes, compared in lower case: archives copied through Windows tools say .JPG.
IMAGE_SUFFIXES = (".jpg", ".jpeg")
# How many offending names an error message lists before it only counts the rest.
MAX_LISTED = 10


class RawLayoutError(ValueError):
  """The raw folder does not look like the released WHU-MARS archive."""


@dataclasses.dataclass(frozen=True)
class RawImage:
  """One image file of the archive, with what its path and name tell."""
  rel_path: str  # relative to the raw root, '/'-separated: "train/RGB/0001_c1_000001.jpg"
  split: str  # train | query | gallery
  modality: str  # RGB | NIR | TIR
  person_id: int  # raw id from the file name
  camera: int  # 0-based


def expected_layout(root: Path) -> str:
  """The layout an error message shows, rooted at the folder the user gave."""
  lines = [f"{root}/"]
  for split_folder in SPLIT_FOLDERS.values():
    note = "   (the gallery)" if split_folder == "test" else ""
    lines.append(f"  {split_folder}/{note}")
    for modality_folder in MODALITY_FOLDERS.values():
      lines.append(f"    {modality_folder}/<id>_c<camera>_<frame>{IMAGE_SUFFIXES[0]}")
  return "\n".join(lines)


def parse_file_name(name: str) -> tuple[int, int] | None:
  """(raw person id, 0-based camera) from a file name, or None if it does not match."""
  match = FILE_NAME_PATTERN.search(name)
  if match is None or int(match.group(2)) < 1:
    return None  # camera numbers are 1-based in the archive: c0 would become camera -1
  return int(match.group(1)), int(match.group(2)) - 1


def format_listing(items: list[str]) -> str:
  """The first MAX_LISTED items, one a line, and how many more there are."""
  shown = "\n".join(f"  {item}" for item in items[:MAX_LISTED])
  more = len(items) - MAX_LISTED
  return shown + (f"\n  ... and {more} more" if more > 0 else "")


def _require_dir(path: Path, root: Path, what: str) -> None:
  if not path.is_dir():
    raise RawLayoutError(
        f"Missing {what} folder: {path}\nExpected layout:\n{expected_layout(root)}")


def scan(root: Path) -> dict[str, list[RawImage]]:
  """Lists every image of the archive at `root`, per split, sorted by path.

  Hidden files (.DS_Store, macOS's ._* forks) are passed over: they are the copying system's, not
  the archive's. Raises RawLayoutError naming the missing folder (with the expected layout), or
  listing the first entries that are not images and the first file names that do not match
  `<id>_c<cam>`, each with their total count.
  """
  root = Path(root)
  _require_dir(root, root, "WHU-MARS raw")
  images = {}
  not_images, bad_names = [], []
  for split, split_folder in SPLIT_FOLDERS.items():
    _require_dir(root / split_folder, root, f"split '{split}'")
    images[split] = []
    for modality, modality_folder in MODALITY_FOLDERS.items():
      folder = root / split_folder / modality_folder
      _require_dir(folder, root, f"modality '{modality}' of split '{split}'")
      for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        rel_path = f"{split_folder}/{modality_folder}/{path.name}"
        if not (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()):
          not_images.append(rel_path)
          continue
        parsed = parse_file_name(path.name)
        if parsed is None:
          bad_names.append(rel_path)
          continue
        images[split].append(RawImage(rel_path, split, modality, *parsed))
  problems = []
  if not_images:
    problems.append(
        f"{len(not_images)} item(s) under {root} are not {'/'.join(IMAGE_SUFFIXES)} image files "
        f"(suffixes in any case):\n{format_listing(not_images)}")
  if bad_names:
    problems.append(
        f"{len(bad_names)} file name(s) under {root} do not match '<id>_c<camera>' (regex "
        f"{FILE_NAME_PATTERN.pattern}, camera >= 1):\n{format_listing(bad_names)}")
  if problems:
    raise RawLayoutError("\n".join(problems))
  for split, split_images in images.items():
    if not split_images:
      raise RawLayoutError(
          f"Split '{split}' has no {'/'.join(IMAGE_SUFFIXES)} files under "
          f"{root / SPLIT_FOLDERS[split]}\nExpected layout:\n{expected_layout(root)}")
  return images
