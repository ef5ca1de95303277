"""Configs for tests: a preset with some fields replaced, named by their dotted paths."""
from configs import uad


def with_fields(fields: dict, preset: str = "synthetic", config=None):
  """`config` (default: the preset's) copied, with {"optim.lr_per_replica": 0.5, …} set. Lists
  (from JSON) become tuples, as the config's own sequences are."""
  c = uad.get_config(preset) if config is None else config.copy_and_resolve_references()
  with c.unlocked():
    for dotted, value in fields.items():
      *parents, name = dotted.split(".")
      node = c
      for parent in parents:
        node = node[parent]
      node[name] = _tuples(value)
  return c


def _tuples(value):
  return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value
