"""Embeds a folder of images into a features file (``uad_jax.evaluation.features_file``).

  python -m uad_jax.commands.embed --workdir=workdir/synthetic --checkpoint=best \\
      --images=photos/ --out=photos.npz
  python -m uad_jax.commands.embed --export=exports/uad --images=photos/ --out=photos.npz

The model is a training run's checkpoint (its recorded config says what it is; the dataset is
not needed) or an export (``python -m uad_jax.commands.export``). Any image folder works; paths in
the WHU-MARS layout (``<id>_c<camera>_….jpg`` under ``RGB/``, ``IR/``, ``Thermal/``) bring their
identity, camera, modality and viewpoint, other images are unlabelled (``--modality`` gives the
modality of images whose folders do not name one). Features are the evaluation's: pre-BN global
features of the images decoded and resized as the evaluation does.
"""
from absl import app
from absl import flags

from uad_jax import console
from uad_jax.commands import model_source
from uad_jax.evaluation import features_file

_IMAGES = flags.DEFINE_string("images", None, "Folder of images (searched recursively).")
_OUT = flags.DEFINE_string("out", None, "The features file to write (.npz).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
  if not _IMAGES.value or not _OUT.value:
    raise app.UsageError("--images and --out are required")
  model_source.check_new_output(argv, _OUT.value, _OVERWRITE.value, ".npz")
  console.quiet_libraries_unless_asked()
  images = model_source.scan(_IMAGES.value)  # before the model: a wrong folder fails at once

  def run():
    features = model_source.Embedder().embed(images)
    features_file.write(features, _OUT.value, overwrite=_OVERWRITE.value)
    print(f"wrote {_OUT.value}")
  model_source.exit_on_bad_input(run)


if __name__ == "__main__":
  app.run(main)
