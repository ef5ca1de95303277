"""Dataset preparation: the TFDS WHU-MARS a config names, built once (after writing the synthetic
raw set for the synthetic presets). Run by process 0 only; the others wait for it.

A synthetic set lives in folders named by what it holds (identities, difficulty, split, train
frames, seed) under `dataset.manual_dir` and `dataset.data_dir`, with the generator's settings
recorded beside it, so a different request never silently reuses an older set: it gets folders of
its own, and a folder whose record disagrees with the request is refused.

`dataset.train_identities` does not change the set: the input pipeline reads the subset it names
(`data.identities`), and preparation logs which one.
"""
import dataclasses
import json
import os

from tfds_whumars import raw_layout  # the layout alone: no tfds, no generator
from uad_jax.data import identities

SYNTHETIC_RECORD = "synthetic.json"
DATASET_NAME = "whu_mars"                        # the TFDS builder prepare_dataset builds
DATASET_CONFIGS = tuple(raw_layout.RAW_FOLDERS)  # its builder configs, one per raw folder


def synthetic_choices() -> tuple[tuple[str, ...], tuple[int, int]]:
  """The generator's named difficulties and its (fewest, most) identities."""
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  return tuple(synthetic.DIFFICULTIES), synthetic.ID_RANGE


# Generator options of the scaling studies, recorded only when set: the records of sets made
# before they existed then still match the same request.
_RECORDED_WHEN_SET = ("test_ids", "train_frames_per_camera")


def _synthetic_options(dataset_config):
  # Imported here: the generator pulls in PIL and NumPy rendering only a synthetic job needs.
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  d = dataset_config
  # A fixed test set makes the train fraction unused: it is left at the difficulty's, so that
  # it can neither name nor change the set.
  split = ({"test_ids": d.synthetic_test_ids} if d.synthetic_test_ids else
           {"train_fraction": d.synthetic_train_fraction})
  return synthetic.options_for(d.synthetic_difficulty, **split,
                               train_frames_per_camera=d.synthetic_train_frames)


def _synthetic_tag(dataset_config, seed: int) -> str:
  """Every setting the set's content depends on, the dataset's seed included."""
  d = dataset_config
  split = (f"test{d.synthetic_test_ids}" if d.synthetic_test_ids else
           f"train{d.synthetic_train_fraction:g}")
  frames = f"-trainframes{d.synthetic_train_frames}" if d.synthetic_train_frames else ""
  return f"{d.synthetic_ids}ids-{d.synthetic_difficulty}-{split}{frames}-seed{seed}"


def synthetic_train_ids(config) -> int:
  """How many training identities the synthetic set `config` names holds."""
  from tfds_whumars import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.num_train_ids(config.dataset.synthetic_ids,
                                 _synthetic_options(config.dataset))


def dataset_dirs(config) -> tuple[str, str]:
  """(manual_dir, data_dir) of the dataset `config` names: the configured folders for real data,
  subfolders named by the set's content for a synthetic one."""
  d = config.dataset
  if d.synthetic_ids <= 0:
    return d.manual_dir, d.data_dir
  tag = _synthetic_tag(d, config.seed)
  return os.path.join(d.manual_dir, tag), os.path.join(d.data_dir, tag)


def raw_split_folder(config, split: str) -> str:
  """The raw archive folder of a split ("query" or "gallery") of the dataset `config` names:
  its images in the WHU-MARS layout, for the tools that read images from folders."""
  if split not in raw_layout.SPLIT_FOLDERS:
    raise ValueError(f"split {split!r}: expected one of {tuple(raw_layout.SPLIT_FOLDERS)}")
  manual_dir, _ = dataset_dirs(config)
  return os.path.join(manual_dir, raw_layout.RAW_FOLDERS[config.dataset.config],
                      raw_layout.SPLIT_FOLDERS[split])


def synthetic_request(config) -> dict:
  """The generator settings of the synthetic set `config` names (what its record holds)."""
  d = config.dataset
  options = json.loads(json.dumps(dataclasses.asdict(_synthetic_options(d))))
  for key in _RECORDED_WHEN_SET:
    if not options[key]:
      del options[key]
  return {"ids": d.synthetic_ids, "seed": config.seed, "difficulty": d.synthetic_difficulty,
          "options": options}


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
  synthetic.generate(manual_dir, request["ids"], request["seed"], root_name=raw_folder,
                     options=_synthetic_options(config.dataset))


def _chosen(builder, config) -> tuple[list[int], int]:
  available = builder.info.metadata["train_person_ids"]
  chosen = identities.choose(available, config.dataset.train_identities, config.seed)
  return chosen.tolist(), len(available)


def train_identities(config) -> tuple[list[int], int]:
  """(raw ids of the identities training uses, how many the train split has) of the prepared
  dataset `config` names, as `dataset.train_identities` chooses them."""
  from tfds_whumars import build  # pylint: disable=g-import-not-at-top
  manual_dir, data_dir = dataset_dirs(config)
  return _chosen(build.build(config.dataset.config, manual_dir, data_dir), config)


def prepare_dataset(config, log=print) -> None:
  """Builds the TFDS dataset if needed; for a synthetic config, writes the raw set first. Logs
  the subset of training identities `dataset.train_identities` chooses, and refuses one larger
  than the train split."""
  # Imported here: TFDS is slow to import and only needed when a job prepares data.
  from tfds_whumars import build  # pylint: disable=g-import-not-at-top
  from tfds_whumars.whu_mars import whu_mars_dataset_builder
  manual_dir, data_dir = dataset_dirs(config)
  raw_folder = whu_mars_dataset_builder.Builder.builder_configs[config.dataset.config].raw_folder
  if config.dataset.synthetic_ids > 0:
    _write_synthetic(config, manual_dir, raw_folder, log)
  builder = build.build(config.dataset.config, manual_dir, data_dir, log=log)
  log(build.summary(builder))
  chosen, available = _chosen(builder, config)
  if config.dataset.train_identities:
    log(identities.describe(chosen, available, config.seed))
