"""Config helpers shared by the config files (big_vision style)."""
import ml_collections


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses ``"preset,key=value,flag"`` against a typed spec of defaults.

  The first spec entry may be given positionally (``uad.py:whumars2337``); every value is converted
  to the type of its default, and unknown keys fail with the list of known ones.
  """
  result = ml_collections.ConfigDict(spec)
  if not arg:
    return result
  first_key = next(iter(spec))
  for i, item in enumerate(a for a in arg.split(",") if a):
    key, sep, value = item.partition("=")
    if not sep:
      if i == 0:
        key, value = first_key, item
      elif isinstance(spec.get(key), bool):
        value = "True"
      else:
        raise ValueError(f"config arg {item!r} needs key=value; known keys: {list(spec)}")
    if key not in spec:
      raise ValueError(f"unknown config arg {key!r}; known keys: {list(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      if value not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a boolean")
      result[key] = value in ("True", "true", "1")
    else:
      result[key] = type(default)(value)
  return result


def replaced(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  """A locked copy of `config` with {"loss.name": "base", …} set (dotted paths; lists, as JSON
  gives them, become the tuples the config holds)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for dotted, value in fields.items():
      *parents, name = dotted.split(".")
      node = c
      for parent in parents:
        node = node[parent]
      node[name] = _tuples(value)
  c.lock()
  return c


def _tuples(value):
  return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value
