"""A features file: embeddings of a set of images with what is known of each, and of the model.

One `.npz` (NumPy only, no pickle): `feats` float32 [N, D]; `person_ids`, `cameras`,
`modalities`, `viewpoints` int32 [N] (−1: unknown; modalities and viewpoints index
`protocols.MODALITIES` / `VIEWPOINTS`); `paths` [N] (relative to `root`); and `about`, a JSON
string: the format version, the image root, and where the features came from (workdir and step,
or an export), image size and feature kind. Written atomically: a reader never sees half a file.
"""
import dataclasses
import json
import os

import numpy as np

from uad_jax.evaluation import report

FORMAT = "uad-jax features"
VERSION = 1
UNKNOWN = -1
_LABELS = ("person_ids", "cameras", "modalities", "viewpoints")


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """Features of N images and their labels (−1: unknown)."""
  feats: np.ndarray
  person_ids: np.ndarray
  cameras: np.ndarray
  modalities: np.ndarray
  viewpoints: np.ndarray
  paths: tuple[str, ...]
  root: str
  model: dict  # where the features came from (JSON-ready)

  def __post_init__(self):
    feats = np.asarray(self.feats, np.float32)
    if feats.ndim != 2:
      raise ValueError(f"features must be [N, D], got shape {feats.shape}")
    object.__setattr__(self, "feats", feats)
    object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    for name in _LABELS:
      values = np.asarray(getattr(self, name), np.int32)
      if values.shape != (len(feats),):
        raise ValueError(f"{name} must have one entry per feature row ({len(feats)}), got "
                         f"shape {values.shape}")
      object.__setattr__(self, name, values)
    if len(self.paths) != len(feats):
      raise ValueError(f"{len(self.paths)} paths for {len(feats)} feature rows")

  def __len__(self) -> int:
    return len(self.feats)

  def file(self, index: int) -> str:
    return os.path.join(self.root, self.paths[index])


def write(features: FeatureSet, path: str, *, overwrite: bool = False) -> str:
  """Writes `features` to `path` (.npz) atomically; refuses to replace a file unless
  `overwrite`."""
  if not path.endswith(".npz"):
    raise ValueError(f"{path}: a features file is a .npz file")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
  about = {"format": FORMAT, "version": VERSION, "root": features.root, "model": features.model}
  arrays = {"feats": features.feats, "paths": np.asarray(features.paths, dtype=np.str_),
            "about": np.asarray(json.dumps(about)),
            **{name: getattr(features, name) for name in _LABELS}}
  report.write_atomically(path, lambda f: np.savez(f, **arrays))
  return path


def read(path: str) -> FeatureSet:
  """The FeatureSet of a file `write` wrote; ValueError naming the file if it is not one."""
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {name: data[name] for name in data.files}
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: not a readable features file ({error})") from error
  missing = sorted({"feats", "paths", "about", *_LABELS} - set(arrays))
  if missing:
    raise ValueError(f"{path}: not a uad-jax features file (missing {', '.join(missing)})")
  about = json.loads(str(arrays["about"]))
  if about.get("format") != FORMAT or about.get("version") != VERSION:
    raise ValueError(f"{path}: format {about.get('format')!r} version {about.get('version')}, "
                     f"expected {FORMAT!r} version {VERSION}")
  return FeatureSet(arrays["feats"], *(arrays[name] for name in _LABELS),
                    paths=tuple(arrays["paths"].tolist()), root=about["root"],
                    model=about["model"])
