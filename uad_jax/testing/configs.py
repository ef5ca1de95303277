"""Configs for tests: a preset with some fields replaced, named by their dotted paths."""
from configs import common, uad


def with_fields(fields: dict, preset: str = "synthetic", config=None):
  """`config` (default: the preset's) copied, with {"optim.lr_per_replica": 0.5, …} set."""
  return common.replaced(uad.get_config(preset) if config is None else config, fields)
