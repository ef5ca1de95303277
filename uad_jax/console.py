"""What a job shows a person: its log lines from one process, and progress bars on a terminal.

The rule for bars: they are drawn, on stderr, only when the job talks to a person directly, that
is when its log function is the built-in `print` (what the command passes), stderr is a terminal,
and this is process 0. Tests and other callers that pass their own log function, or runs whose
stderr goes to a file, get no bars; the per-epoch and evaluation lines say everything a bar does.
This is the only module that imports tqdm.
"""
import sys

from absl import flags
from absl import logging
import jax
import tqdm


def _silent(*_):
  pass


def for_this_process(log):
  """`log` on process 0, a no-op on the others: a pod prints each line once."""
  return log if jax.process_index() == 0 else _silent


def bars_enabled(log) -> bool:
  """Whether progress bars are drawn for a job logging with `log` (the module's rule)."""
  return log is print and jax.process_index() == 0 and sys.stderr.isatty()


def progress(total: int, description: str, *, enabled: bool, unit: str = "img") -> tqdm.tqdm:
  """A bar over `total` units with their rate and the time left; a no-op unless `enabled`.

  The bar erases itself when closed: the log line that follows it keeps the result.
  """
  return tqdm.tqdm(total=total, desc=description, unit=unit, disable=not enabled,
                   file=sys.stderr, leave=False, dynamic_ncols=True)


def quiet_libraries_unless_asked() -> None:
  """Libraries log warnings and errors only, unless the command was given ``--verbosity``.

  absl.app turns an unset --verbosity into INFO, which buries a job's own lines under every
  checkpoint write Orbax logs; ``-v 0`` brings those INFO lines back, ``-v 1`` adds DEBUG.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def quiet_other_processes() -> None:
  """Processes other than 0 log warnings and errors only, whatever ``--verbosity`` says: a pod's
  hosts would repeat process 0's lines. Call it once ``jax.distributed`` is initialised (it asks
  JAX for the process index, which starts the backend)."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
