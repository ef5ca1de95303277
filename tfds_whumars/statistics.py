"""Dataset statistics: identities, images and cameras per split x modality x viewpoint.

Computed from the scanned file list (no image is opened), stored as JSON in the dataset's
metadata and printed by the build command.
"""
from tfds_whumars import raw_layout

ALL = "all"
COLUMNS = ("split", "modality", "viewpoint", "identities", "images", "cameras")


def _rows_of_split(split, images, camera_viewpoints) -> list[dict]:
  # One pass over the images into (modality, viewpoint) cells; rows then merge cells.
  cells = {}
  for image in images:
    cell = cells.setdefault((image.modality, camera_viewpoints[image.camera]), [set(), 0, set()])
    cell[0].add(image.person_id)
    cell[1] += 1
    cell[2].add(image.camera)
  rows = []
  for modality in raw_layout.MODALITIES + (ALL,):
    for viewpoint in raw_layout.VIEWPOINTS + (ALL,):
      selected = [cell for (m, v), cell in cells.items()
                  if modality in (ALL, m) and viewpoint in (ALL, v)]
      rows.append({"split": split, "modality": modality, "viewpoint": viewpoint,
                   "identities": len(set().union(*(cell[0] for cell in selected))),
                   "images": sum(cell[1] for cell in selected),
                   "cameras": len(set().union(*(cell[2] for cell in selected)))})
  return rows


def table(images_by_split: dict[str, list[raw_layout.RawImage]],
          camera_viewpoints: tuple[str, ...]) -> list[dict]:
  """One row per split x (modality | all) x (viewpoint | all)."""
  return [row for split, images in images_by_split.items()
          for row in _rows_of_split(split, images, camera_viewpoints)]


def ids_missing_modality(images: list[raw_layout.RawImage]) -> dict[str, list[int]]:
  """{modality: sorted ids} of the identities in `images` that have no image in that modality."""
  ids_of = {m: {image.person_id for image in images if image.modality == m}
            for m in raw_layout.MODALITIES}
  every_id = set().union(*ids_of.values())
  return {m: sorted(every_id - ids) for m, ids in ids_of.items() if every_id - ids}


def format_table(rows: list[dict]) -> str:
  lines = ["{:8s} {:8s} {:9s} {:>10s} {:>9s} {:>7s}".format(*COLUMNS)]
  lines += ["{split:8s} {modality:8s} {viewpoint:9s} {identities:10d} {images:9d} {cameras:7d}"
            .format(**row) for row in rows]
  return "\n".join(lines)
