"""Dataset preparation: the TFDS WHU-MARS a config names, built once (after writing the synthetic
raw set for the synthetic preset). Run by process 0 only; the others wait for it."""
import os


def prepare_dataset(config, log=print) -> None:
  """Builds the TFDS dataset if needed; for the synthetic preset, writes the raw set first."""
  # Imported here: TFDS is slow to import and only needed when a job prepares data.
  from tfds_whumars import build, synthetic  # pylint: disable=g-import-not-at-top
  from tfds_whumars.whu_mars import whu_mars_dataset_builder
  raw_folder = whu_mars_dataset_builder.Builder.builder_configs[config.dataset.config].raw_folder
  raw_root = os.path.join(config.dataset.manual_dir, raw_folder)
  if config.dataset.synthetic_ids > 0 and not os.path.isdir(raw_root):
    log(f"writing a synthetic WHU-MARS of {config.dataset.synthetic_ids} identities to {raw_root}")
    synthetic.generate(config.dataset.manual_dir, config.dataset.synthetic_ids, config.seed,
                       root_name=raw_folder)
  builder = build.build(config.dataset.config, config.dataset.manual_dir,
                        config.dataset.data_dir, log=log)
  log(build.summary(builder))
