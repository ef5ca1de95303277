"""The flags and code the retrieval tools share: which model (a training run's checkpoint or an
export) and how a folder's images are read and labelled."""
import os
import sys
import time

from absl import app
from absl import flags

from uad_jax import console
from uad_jax.commands import common_flags
from uad_jax.data import image_folder
from uad_jax.evaluation import features_file, inference
from uad_jax.models import serving_export
from uad_jax.training import checkpoint_eval

EXPORT = flags.DEFINE_string("export", None, "An exported model's folder, instead of --workdir "
                             "(python -m uad_jax.commands.export).")
MODALITY = flags.DEFINE_enum("modality", None, list(image_folder.MODALITIES),
                             "The modality of images whose folders do not name one (RGB, "
                             "IR/NIR, Thermal/TIR folders say it themselves).")
CAMERA_VIEWS = flags.DEFINE_list(
    "camera_viewpoints", list(image_folder.raw_layout.DEFAULT_CAMERA_VIEWPOINTS),
    "Viewpoint (ground/aerial) of each 0-based camera of WHU-MARS file names.")
BATCH = flags.DEFINE_integer(
    "batch_size", None, "Images per inference step; default: the run's eval_batch_size (whose "
    "features are then bit for bit the evaluation's: bf16 sums depend on the batch), 64 for an "
    "export.", lower_bound=1)
THREADS = flags.DEFINE_integer("threads", 4, "Image decoding threads.", lower_bound=1)


class Embedder:
  """The model the flags name, as a function of a folder of images."""

  def __init__(self):
    if EXPORT.value and common_flags.WORKDIR.value:
      raise app.UsageError("give --workdir (a training run) or --export, not both")
    if EXPORT.value:
      self._forward = serving_export.load(EXPORT.value)
      manifest = self._forward.manifest
      self.image_size = tuple(manifest["image_size"])
      self.about = {"export": os.path.abspath(EXPORT.value), **manifest.get("metadata", {})}
      self._batch = BATCH.value or 64
    elif common_flags.WORKDIR.value:
      restored = checkpoint_eval.load_for_inference(common_flags.WORKDIR.value,
                                                    common_flags.CHECKPOINT.value)
      self._forward = restored.forward(BATCH.value or restored.config.eval_batch_size)
      self.image_size = tuple(restored.config.model.image_size)
      self.about = restored.describe()
      self._batch = self._forward.batch_size
    else:
      raise app.UsageError("give the model: --workdir=<training run> or --export=<folder>")

  def embed(self, images: image_folder.FolderImages, log=print) -> features_file.FeatureSet:
    start = time.perf_counter()
    with console.progress(len(images), f"embedding {images.root}",
                          enabled=console.bars_enabled(log)) as bar:
      feats = inference.embed_folder(images, self._forward, self.image_size, self._batch,
                                     threads=THREADS.value, bar=bar)
    seconds = time.perf_counter() - start
    log(f"{len(images)} images of {images.root}: {feats.shape[1]}-d features in {seconds:.1f} s "
        f"({len(images) / seconds:.0f} img/s); {_labelled(images)}")
    return features_file.FeatureSet(feats, images.person_ids, images.cameras, images.modalities,
                                    images.viewpoints, images.paths, images.root,
                                    {**self.about, "image_size": list(self.image_size)})


def _labelled(images: image_folder.FolderImages) -> str:
  return ", ".join(f"{(values >= 0).sum()} with {what}" for what, values in (
      ("identity and camera", images.person_ids), ("modality", images.modalities),
      ("viewpoint", images.viewpoints)))


def scan(folder: str) -> image_folder.FolderImages:
  """The folder's images and labels; a usage error naming the folder if it has none."""
  try:
    return image_folder.scan(folder, modality=MODALITY.value,
                             camera_viewpoints=tuple(CAMERA_VIEWS.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def check_new_output(argv, path: str, overwrite: bool, suffix: str = "") -> None:
  """Usage errors, before any work, for stray arguments and an output `path` that exists
  (unless `overwrite`) or lacks `suffix`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if suffix and not path.endswith(suffix):
    raise app.UsageError(f"{path}: expected a {suffix} file")
  if os.path.exists(path) and not overwrite:
    raise app.UsageError(f"{path} exists; pass --overwrite to replace it")


def exit_on_bad_input(run):
  """Runs `run()`; bad input met on the way (an unreadable image, a damaged checkpoint or
  export, a missing file) ends the command with its message, not a traceback."""
  try:
    return run()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
