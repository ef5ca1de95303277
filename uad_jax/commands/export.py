"""Exports a training run's model for serving: StableHLO (``jax.export``) and optionally ONNX.

  python -m uad_jax.commands.export --workdir=workdir/synthetic --checkpoint=best \\
      --out=exports/uad [--onnx]

The export (``uad_jax/models/serving_export.py``) maps uint8 RGB images [batch, H, W, 3], resized
to the model's input size, to the evaluation's features; it runs with nothing but ``jax`` and
``numpy`` (the snippet is in that module's docstring, and ``export.json`` says the input, the
versions and the window in which JAX keeps loading it). The Orbax checkpoint stays the source of
truth: re-export after upgrading JAX past that window. ``--onnx`` also writes ``model.onnx``
(needs the ONNX extra: ``pip install --no-deps -r requirements-onnx.txt``).
"""
import os

from absl import app
from absl import flags

from uad_jax import console
from uad_jax.commands import common_flags, model_source
from uad_jax.models import onnx_export, serving_export
from uad_jax.training import checkpoint_eval

_OUT = flags.DEFINE_string("out", None, "Folder to write the export to (must not exist).")
_ONNX = flags.DEFINE_bool("onnx", False, "Also write model.onnx beside the StableHLO export.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export in --out.")


def main(argv):
  if not common_flags.WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir (a training run) and --out are required")
  model_source.check_new_output(argv, _OUT.value, _OVERWRITE.value)
  console.quiet_libraries_unless_asked()
  if _ONNX.value:
    onnx_export.require()  # a missing extra fails before the checkpoint is read

  def run():
    restored = checkpoint_eval.load_for_inference(common_flags.WORKDIR.value,
                                                  common_flags.CHECKPOINT.value)
    image_size = tuple(restored.config.model.image_size)
    serving_export.export(restored.model, restored.variables, image_size, _OUT.value,
                          metadata=restored.describe(), overwrite=_OVERWRITE.value)
    print(f"wrote {_OUT.value}: the step-{restored.step} model of {common_flags.WORKDIR.value}")
    if _ONNX.value:
      path = os.path.join(_OUT.value, "model.onnx")
      onnx_export.export_onnx(restored.model, restored.variables, image_size, path,
                              metadata=restored.describe())
      print(f"wrote {path}")
  model_source.exit_on_bad_input(run)


if __name__ == "__main__":
  app.run(main)
