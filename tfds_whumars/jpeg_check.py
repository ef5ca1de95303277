"""Finds unreadable JPEGs before they are written into the dataset, optionally in worker processes.

A JPEG is accepted when PIL identifies it as a JPEG in mode L (NIR/TIR) or RGB and decodes it to
the last pixel: a truncated file fails the full decode ("image file is truncated"), which header
checks such as `Image.verify()` do not notice. Damage inside the compressed data of a complete
file decodes to wrong pixels without an error and cannot be found without a checksum.

Workers are plain subprocesses (`python -m tfds_whumars.jpeg_check ROOT LISTING`) rather than a
multiprocessing pool: fork could copy a lock held by another thread of the parent (JAX runs
many), and spawn re-imports the parent's main script, which breaks scripts without a
`__main__` guard and costs a TensorFlow-Datasets import per worker.
"""
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from PIL import ImageFile

_ACCEPTED_MODES = ("L", "RGB")
# Below this many files per worker, starting processes costs more than it saves.
_MIN_FILES_PER_WORKER = 500


def problem_with(data: bytes) -> str | None:
  """Why `data` is not a usable JPEG, or None if it is."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # Someone in this process told PIL to accept truncated files; the check would be blind.
    raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated JPEGs would pass")
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != "JPEG":
        return f"not a JPEG but {image.format}"
      if image.mode not in _ACCEPTED_MODES:
        return f"JPEG mode {image.mode}, expected one of {_ACCEPTED_MODES}"
      image.load()
  except Image.UnidentifiedImageError:
    return "not an image PIL can identify"
  except Exception as error:  # pylint: disable=broad-except  # PIL raises many kinds
    return f"{type(error).__name__}: {error}"
  return None


def _check_files(root: Path, rel_paths: list[str]) -> dict[str, str]:
  problems = {}
  for rel_path in rel_paths:
    try:
      problem = problem_with((root / rel_path).read_bytes())
    except OSError as error:
      problem = f"unreadable: {error}"
    if problem:
      problems[rel_path] = problem
  return problems


def _run_workers(root: Path, parts: list[list[str]]) -> dict[str, str]:
  package_parent = str(Path(__file__).resolve().parent.parent)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  with tempfile.TemporaryDirectory(prefix="whumars_jpeg_check_") as tmp:
    workers = []
    try:
      for index, part in enumerate(parts):
        listing = Path(tmp) / f"part{index}.txt"
        listing.write_text("\n".join(part))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tfds_whumars.jpeg_check", str(root), str(listing)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
      outputs = [worker.communicate() for worker in workers]
    finally:
      for worker in workers:  # only left running if we are being interrupted
        if worker.poll() is None:
          worker.kill()
          worker.wait()
  problems = {}
  for worker, (stdout, stderr) in zip(workers, outputs):
    if worker.returncode != 0:
      raise RuntimeError(f"JPEG check worker {worker.args} failed:\n{stderr}")
    problems.update(json.loads(stdout))
  return problems


def find_corrupt(root: Path, rel_paths: list[str], num_workers: int = 1) -> dict[str, str]:
  """{relative path: problem} of the files under `root` that are not usable JPEGs, in the
  order of `rel_paths`; decoded by `num_workers` processes (1: in this process)."""
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  root = Path(root)
  num_workers = min(num_workers, max(1, len(rel_paths) // _MIN_FILES_PER_WORKER))
  if num_workers == 1:
    return _check_files(root, rel_paths)
  # Interleaved parts: splits and modalities differ in image size, so contiguous ones would not
  # take equally long.
  problems = _run_workers(root, [rel_paths[i::num_workers] for i in range(num_workers)])
  return {rel_path: problems[rel_path] for rel_path in rel_paths if rel_path in problems}


def main(argv: list[str]) -> None:
  """Worker entry point: checks the files listed in argv[2] under argv[1], prints JSON."""
  root, listing = Path(argv[1]), Path(argv[2])
  rel_paths = [line for line in listing.read_text().split("\n") if line]
  json.dump(_check_files(root, rel_paths), sys.stdout)


if __name__ == "__main__":
  main(sys.argv)
