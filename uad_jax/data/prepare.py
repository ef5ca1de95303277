"""Dataset preparation: the TFDS WHU-MARS a config names, built once (after writing the synthetic
raw set for the synthetic presets). Run by process 0 only; the others wait for it.

A synthetic set lives in folders named by what it holds (identities, difficulty, split, seed)
under `dataset.manual_dir` and `dataset.data_dir`, with the generator's settings recorded beside
it, so a different request never silently reuses an older set: it gets folders of its own, and a
folder whose record disagrees with the request is refused.
"""
import dataclasses
import json
import os

from tfds_whumars import raw_layout  # the layout alone: no tfds, no generator

SYNTHETIC_RECORD = "synthetic.json"
DATASET_NAME = "whu_mars"                        # the TFDS builder prepare_dataset builds
DATASET_CONFIGS = tuple(raw_layout.RAW_FOLDERS)  # its builder configs, one per raw folder


def synthetic_choices() -> tuple[tuple[str, ...], tuple[int, int]]:
  """The generator's named difficulties and its (fewest, most) identities."""
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  return tuple(synthetic.DIFFICULTIES), synthetic.ID_RANGE


def _synthetic_tag(dataset_config, seed: int) -> str:
  d = dataset_config
  return (f"{d.synthetic_ids}ids-{d.synthetic_difficulty}-train{d.synthetic_train_fraction:g}"
          f"-seed{seed}")


def dataset_dirs(config) -> tuple[str, str]:
  """(manual_dir, data_dir) of the dataset `config` names: the configured folders for real data,
  subfolders named by the set's content for a synthetic one."""
  d = config.dataset
  if d.synthetic_ids <= 0:
    return d.manual_dir, d.data_dir
  tag = _synthetic_tag(d, config.seed)
  return os.path.join(d.manual_dir, tag), os.path.join(d.data_dir, tag)


def synthetic_request(config) -> dict:
  """The generator settings of the synthetic set `config` names (what its record holds)."""
  # Imported here: the generator pulls in PIL and NumPy rendering only a synthetic job needs.
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  d = config.dataset
  options = synthetic.options_for(d.synthetic_difficulty,
                                  train_fraction=d.synthetic_train_fraction)
  return {"ids": d.synthetic_ids, "seed": config.seed, "difficulty": d.synthetic_difficulty,
          "options": json.loads(json.dumps(dataclasses.asdict(options)))}


def _write_synthetic(config, manual_dir: str, raw_folder: str, log) -> None:
  """Generates the synthetic raw set unless it is there; refuses one made with other settings."""
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  request = synthetic_request(config)
  record_path = os.path.join(manual_dir, SYNTHETIC_RECORD)
  raw_root = os.path.join(manual_dir, raw_folder)
  if os.path.isdir(raw_root):
    recorded = None
    if os.path.exists(record_path):
      with open(record_path) as f:
        recorded = json.load(f)
    if recorded != request:
      raise ValueError(
          f"{raw_root} holds a synthetic set made with other settings ({record_path}: "
          f"{recorded}); this config asks for {request}. Remove the folder or choose another "
          f"config.dataset.manual_dir.")
    return
  log(f"writing a synthetic WHU-MARS of {request['ids']} identities ({request['difficulty']} "
      f"difficulty) to {raw_root}")
  # The record first: generate() renames the set into place only once it is complete, so a set
  # that exists always has its record, and an interrupted one is simply made again.
  os.makedirs(manual_dir, exist_ok=True)
  with open(record_path, "w") as f:
    json.dump(request, f, indent=1)
  options = synthetic.options_for(request["difficulty"],
                                  train_fraction=config.dataset.synthetic_train_fraction)
  synthetic.generate(manual_dir, request["ids"], request["seed"], root_name=raw_folder,
                     options=options)


def prepare_dataset(config, log=print) -> None:
  """Builds the TFDS dataset if needed; for a synthetic config, writes the raw set first."""
  # Imported here: TFDS is slow to import and only needed when a job prepares data.
  from tfds_whumars import build  # pylint: disable=g-import-not-at-top
  from tfds_whumars.whu_mars import whu_mars_dataset_builder
  manual_dir, data_dir = dataset_dirs(config)
  raw_folder = whu_mars_dataset_builder.Builder.builder_configs[config.dataset.config].raw_folder
  if config.dataset.synthetic_ids > 0:
    _write_synthetic(config, manual_dir, raw_folder, log)
  builder = build.build(config.dataset.config, manual_dir, data_dir, log=log)
  log(build.summary(builder))
