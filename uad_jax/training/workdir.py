"""One run per workdir, and a resumed run keeps the config it started with.

`lock(workdir)` holds an exclusive lock on ``workdir/.lock`` for the run's life, so a second run
on the same workdir fails at once instead of training beside the first and crashing at a save.
`record_config(workdir, config, resuming)` writes the resolved config to ``workdir/config.json``
on a fresh run and, on resume, refuses a config that would continue the checkpoint on another
trajectory (another learning rate, another P, …).

The lock is `fcntl.flock`, which the kernel drops when the holder's last file descriptor closes:
a killed run leaves no stale lock to clean up. The file keeps the holder's pid, host and start
time only for the error message. Where flock is unsupported (it fails with something other than
"would block": some NFS, FUSE and Lustre mounts), the lock falls back to a pid file created
atomically with `os.link` (atomic on NFS too, unlike O_EXCL on old NFS); its staleness can be
judged only on the same host (is the pid still alive?), so a pid file left by a dead run on
another host must be removed by hand, and the message says so. A filesystem with neither flock
nor hard links (gcsfuse) cannot be locked: `lock` raises the OSError. NFS mounted with ``nolock``
makes flock succeed with host-local meaning only: two hosts sharing such a workdir are not kept
apart.
"""
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import socket
from typing import Any, Iterator

import ml_collections

from uad_jax.evaluation import report

LOCK_FILE = ".lock"
PID_FILE = ".lock.pid"      # the fallback where flock is unsupported
CONFIG_FILE = "config.json"

# Config fields a resumed run may change: none of them moves the training trajectory. A name
# covers its sub-fields too. Any other difference, including a field on one side only, is refused.
MAY_CHANGE_ON_RESUME = (
    "eval_batch_size",       # how evaluation batches inference; training never sees it
    "eval_every_epochs",     # when to evaluate; evaluation does not touch the train state
    "camera_rule",           # which gallery images an evaluation excludes
    "rerank",                # whether and how an evaluation also re-ranks
    "data_threads",          # decode threads: the stream is the same whatever their count, and
                             # the iterator's saved position does not depend on it
    "mesh",                  # the step is device-count invariant up to fp32 noise, and a
                             # checkpoint restores into another layout
    "sharding_rules",        # the same, for where parameters and activations live
    "dataset.data_dir",      # where the same dataset is stored
    "dataset.manual_dir",    # where the same raw files are
    "pretrain.dir",          # where pretrained backbones are cached
    "pretrained",            # initial weights, which the checkpoint replaces on resume
    "keep_checkpoints",      # how many old checkpoints to keep on disk
    "log_every_steps",       # how often to log
    "max_nonfinite_steps",   # when to give up on a diverged run; a finite run is not affected
)
# Not in the list although it does not change the stream either: data_workers. Grain keeps one
# position per worker process in the iterator state the checkpoint holds, and that state restores
# only into the same worker count (a KeyError or IndexError otherwise, grain 0.2.18).
_WHY_FIXED = {
    "data_workers": "the checkpointed input-pipeline state has one position per worker process "
                    "and restores only into the same number of workers",
}


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir."""


class ConfigChanged(ValueError):
  """A resumed run's config differs from the recorded one in a field that changes training."""

  def __init__(self, message: str, changes: list["Change"]):
    super().__init__(message)
    self.changes = changes


class _Absent:
  """A field on one side of a comparison only."""

  def __repr__(self):
    return "(absent)"


ABSENT = _Absent()


@dataclasses.dataclass(frozen=True)
class Change:
  field: str       # dotted path, e.g. "optim.lr_per_replica"
  recorded: Any    # the value in config.json, or ABSENT
  now: Any         # the value in the current config, or ABSENT

  def __str__(self):
    return f"{self.field}: {_show(self.recorded)} → {_show(self.now)}"


@contextlib.contextmanager
def lock(workdir: str, process_index: int = 0) -> Iterator[None]:
  """Holds the workdir for the duration of the `with` block; raises WorkdirBusy if taken.

  Only process 0 of a multi-process run locks (the others are the same run); pass
  ``jax.process_index()``. Creates the workdir if needed.
  """
  if process_index != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # O_RDWR without O_TRUNC: a contender must not erase the holder's record before failing.
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(fd)
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirBusy(_busy_message(workdir, holder, path)) from None
    # Not a conflict but no flock here (ENOLCK, EOPNOTSUPP, ENOSYS, …).
    with _pid_file_lock(workdir):
      yield
    return
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record(), 0)
    yield
  finally:
    os.ftruncate(fd, 0)  # a finished run leaves no holder to misreport
    os.close(fd)  # releases the lock


@contextlib.contextmanager
def _pid_file_lock(workdir: str) -> Iterator[None]:
  """The lock where flock is unsupported: a pid file that exists only while a run holds it."""
  path = os.path.join(workdir, PID_FILE)
  mine = _holder_record()
  # Written whole under a private name, then linked: the pid file never exists half-written.
  private = f"{path}.{socket.gethostname()}.{os.getpid()}"
  with open(private, "wb") as f:
    f.write(mine)
  try:
    for _ in range(3):  # a stale file removed lets the next attempt take it
      try:
        os.link(private, path)
        break
      except FileExistsError:
        _remove_if_stale(workdir, path)
    else:
      raise WorkdirBusy(_busy_message(workdir, _read_file(path), path))
  finally:
    os.unlink(private)
  try:
    yield
  finally:
    if _read_file(path) == mine:
      os.unlink(path)


def _remove_if_stale(workdir: str, path: str) -> None:
  """Removes the pid file of a dead process on this host; raises WorkdirBusy otherwise."""
  text = _read_file(path)
  holder = _parse(text)
  if holder is None or holder.get("host") != socket.gethostname() or _alive(holder["pid"]):
    raise WorkdirBusy(_busy_message(workdir, text, path))
  # Rename first, then check it is the file judged stale: two runs clearing the same stale file
  # must not remove the one the other has just linked in its place.
  aside = f"{path}.stale.{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # another run cleared it; try again
  if _read_file(aside) != text:
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)  # put the live holder back
    os.unlink(aside)
    raise WorkdirBusy(_busy_message(workdir, _read_file(path), path))
  os.unlink(aside)


def _holder_record() -> bytes:
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": started}).encode()


def _read_holder(fd: int) -> bytes:
  try:
    return os.pread(fd, 4096, 0)
  except OSError:
    return b""


def _read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return b""


def _parse(text: bytes) -> dict | None:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  return True


def _busy_message(workdir: str, text: bytes, path: str) -> str:
  holder = _parse(text)
  if holder is None:  # the holder is between taking the lock and writing its record
    who = "another run (it has not recorded its pid yet)"
  else:
    who = (f"another run: pid {holder['pid']} on host {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')}")
    if holder.get("host") == socket.gethostname() and not _alive(holder["pid"]):
      # flock: children that inherited the descriptor (forked data workers) hold it still.
      who += " (that pid is gone; a process it started may still hold the lock)"
  message = f"workdir {workdir} is in use by {who}. Wait for it to end or use another workdir."
  if os.path.basename(path) == PID_FILE:
    message += f" If that run is dead, remove {path}."
  return message


def record_config(workdir: str, config, resuming: bool) -> list[Change]:
  """Records ``config`` (an ml_collections ConfigDict) in ``workdir/config.json``.

  A fresh run (``resuming`` False) or a resume without a recorded config writes it and returns
  []. A resume compares it with the recorded one: a difference outside MAY_CHANGE_ON_RESUME
  raises ConfigChanged listing every differing field as ``field: recorded → now``; otherwise
  the file is updated and the changed fields are returned for the log.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  now = _json_ready(config.to_dict(), "config")
  if resuming and os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    changes = _differences(_flatten(recorded), _flatten(now))
    fixed = [c for c in changes if not _may_change(c.field)]
    if fixed:
      raise ConfigChanged(_changed_message(workdir, fixed, changes), changes)
    if not changes:
      return []
  else:
    changes = []
  text = json.dumps(now, indent=1, ensure_ascii=False, allow_nan=True) + "\n"
  report.write_atomically(path, lambda f: f.write(text.encode("utf-8")))
  return changes


def read_config(workdir: str):
  """The config a run of `workdir` recorded, as a locked ConfigDict (JSON lists back to tuples,
  as the config file writes them)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      recorded = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not the workdir of a training "
                            "run") from None
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from None

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  config = ml_collections.ConfigDict(tuples(recorded))
  config.lock()
  return config


def _changed_message(workdir: str, fixed: list[Change], changes: list[Change]) -> str:
  lines = [f"the config differs from the one {workdir} was trained with, in fields that change "
           f"training; resume with the recorded values or use another workdir:"]
  for change in fixed:
    why = _WHY_FIXED.get(change.field)
    lines.append(f"  {change}" + (f"  ({why})" if why else ""))
  allowed = [c for c in changes if c not in fixed]
  if allowed:
    lines.append("and in fields a resume may change:")
    lines.extend(f"  {c}" for c in allowed)
  return "\n".join(lines)


def _json_ready(value, where: str):
  """``value`` as JSON reads it back: tuples become lists, so both sides compare alike."""
  if isinstance(value, dict):
    return {str(k): _json_ready(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v, where) for v in value]
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  raise TypeError(f"{where} = {value!r} ({type(value).__name__}) cannot be recorded as JSON")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _differences(recorded: dict, now: dict) -> list[Change]:
  names = list(recorded) + [name for name in now if name not in recorded]
  return [Change(name, recorded.get(name, ABSENT), now.get(name, ABSENT))
          for name in names if not _same(recorded.get(name, ABSENT), now.get(name, ABSENT))]


def _same(a, b) -> bool:
  """Equality as JSON stores values: 2 and 2.0 agree, True and 1 do not, NaN equals NaN."""
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b or (math.isnan(a) and math.isnan(b))
  return type(a) is type(b) and a == b


def _may_change(field: str) -> bool:
  return any(field == name or field.startswith(name + ".") for name in MAY_CHANGE_ON_RESUME)


def _show(value) -> str:
  return repr(value) if value is ABSENT else json.dumps(value, ensure_ascii=False)
