"""Builds the whu_mars TFDS dataset (ArrayRecord) from the extracted archive, without TensorFlow.

  python -m tfds_whumars.build --config=whumars2337 --manual_dir=DIR --data_dir=DIR \
      [--num_workers=2] [--skip_corrupt]

`tfds build` would import TensorFlow; this calls the same builder through TFDS's Python API. The
dataset is written into a temporary folder renamed into place at the end, so an interrupted build
never leaves anything that reads as a prepared dataset; the folder a killed build leaves behind is
removed by the next build. An existing build is reused, not rebuilt.
"""
import argparse
import contextlib
import glob
import io
import os
import shutil
import sys
import time

from absl import logging
import tensorflow_datasets as tfds

from tfds_whumars import raw_layout
from tfds_whumars import statistics
from tfds_whumars.whu_mars import whu_mars_dataset_builder


def build(config: str | whu_mars_dataset_builder.WhuMarsConfig, manual_dir, data_dir, *,
          skip_corrupt: bool = False, num_workers: int = 1, verbose: bool | None = None,
          log=None) -> tfds.core.DatasetBuilder:
  """Prepares whu_mars/`config` in `data_dir` (if not there yet) and returns its builder.

  verbose: show TFDS's own output (its progress bars and the lines it prints); default: when
  absl logging shows INFO (`-v 0` in an absl app). `log`, if given, hears that a build starts,
  which otherwise would be silent for as long as it takes.
  """
  builder = whu_mars_dataset_builder.Builder(
      config=config, data_dir=data_dir, skip_corrupt=skip_corrupt, num_workers=num_workers)
  # The check download_and_prepare makes (is_prepared() logs a warning when it fails).
  if not os.path.exists(builder.data_dir):
    _remove_killed_builds(builder, log)
    if log:
      log(f"building {builder.info.full_name} in {data_dir} (once; this can take a while)")
  with _tfds_output(logging.level_info() if verbose is None else verbose):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _remove_killed_builds(builder: tfds.core.DatasetBuilder, log) -> None:
  """Removes the temporary folders that killed builds of this dataset version left.

  TFDS builds in `incomplete.<6 random characters>_<version>` beside the version folder and
  removes it when the build raises, but a killed process leaves it, full size, for good. Two
  builds of one dataset into one data dir at once are not supported anyway: the second rename
  onto the version folder would fail.
  """
  parent, version = os.path.split(os.path.normpath(os.fspath(builder.data_dir)))
  pattern = os.path.join(glob.escape(parent), f"incomplete.??????_{glob.escape(version)}")
  stale = sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
  for path in stale:
    shutil.rmtree(path)
  if stale:
    (log or logging.warning)(f"removed {len(stale)} folder(s) left by an interrupted build of "
                             f"{builder.info.full_name}: {', '.join(stale)}")


@contextlib.contextmanager
def _tfds_output(verbose: bool):
  """Unless verbose: no TFDS progress bars, and what TFDS prints is kept back (and shown only if
  the build fails, where it may help)."""
  if verbose:
    yield
    return
  printed = io.StringIO()
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(printed):
      yield
  except BaseException:
    sys.stdout.write(printed.getvalue())
    raise
  finally:
    tfds.enable_progress_bar()


def summary(builder: tfds.core.DatasetBuilder) -> str:
  """The statistics table and the problems recorded in a built dataset's metadata."""
  metadata = builder.info.metadata
  lines = [f"{builder.info.full_name} in {builder.data_dir}",
           statistics.format_table(metadata["statistics"]),
           f"training classes: {metadata['num_train_classes']}",
           f"camera -> viewpoint: {metadata['camera_viewpoints']}"]
  for modality, ids in metadata["train_ids_missing_modality"].items():
    lines.append(f"WARNING: {len(ids)} train identities have no {modality} image: "
                 f"{ids[:raw_layout.MAX_LISTED]}")
  if metadata["skipped_corrupt_files"]:
    lines.append(f"skipped {len(metadata['skipped_corrupt_files'])} unreadable JPEG(s):")
    lines += [f"  {path}: {why}" for path, why in metadata["skipped_corrupt_files"].items()]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      choices=list(whu_mars_dataset_builder.Builder.builder_configs))
  parser.add_argument("--manual_dir", required=True,
                      help="folder holding the extracted WHU-MARS/ or WHU-MARS_2337/")
  parser.add_argument("--data_dir", required=True, help="TFDS data folder to write to")
  parser.add_argument("--num_workers", type=int, default=1,
                      help="processes that decode-check the JPEGs")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="leave unreadable JPEGs out (listed in the metadata) instead of failing")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  builder = build(args.config, args.manual_dir, args.data_dir, skip_corrupt=args.skip_corrupt,
                  num_workers=args.num_workers, verbose=True)
  print(summary(builder))
  print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
