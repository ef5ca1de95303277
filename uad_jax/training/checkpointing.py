"""Orbax checkpoints of the train state together with the data iterator's position.

One checkpoint step holds the whole TrainState (parameters, BN statistics, optimizer state, the
prototype memory, the RNG), the input pipeline's state, an optional small JSON of the loop's own
(``extra``: e.g. the metrics of an epoch stopped midway) and a checksum of every array. Orbax
writes each step to a temporary directory and renames it when complete, so an interrupted save
never reads as a checkpoint, the checksums are part of the same atomic step, and earlier steps stay
intact. This is the only module that imports orbax.

What a run relies on:
- Integrity: a restore recomputes every array's checksum (``training.checksums``) and refuses a
  step whose bits differ from the saved ones; ``restore_latest_intact`` then falls back to the step
  before, moving the damaged one aside as ``<step>.damaged`` (renamed, never deleted: a wrong
  verdict costs a rename back, and a later save of the same step number does not collide).
- Failure is loud and prompt: a save that cannot write (read-only directory, full disk) raises
  ``CheckpointSaveError`` in ``save`` itself, or once the background write failed in ``check``
  (cheap, every step) or the next ``save``/``wait``; nothing waits on Orbax's 20-minute deadline,
  and a process whose save failed never lingers at exit. ``check_writable`` finds a read-only
  directory before any training.
- Retention: the last ``keep`` steps and the best one by a metric reported after its save
  (``record_metric``: the evaluation follows the checkpoint), kept in ``metrics.json`` beside the
  steps. Orbax's own ``best_fn`` wants the metric at save time, so pruning is done here.
"""
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from uad_jax.training import checksums

METRICS_FILE = "metrics.json"
DAMAGED_SUFFIX = ".damaged"
# How long a process whose save failed may linger at exit on Orbax threads that still wait for
# the failed write, before it ends itself with status 1.
EXIT_GRACE_S = 10.0


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the run must stop (its progress would be lost)."""


class DamagedCheckpoint(RuntimeError):
  """A checkpoint step cannot be read back, or reads back other bits than were saved."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"checkpoint {path} is damaged: {reason}")
    self.path, self.reason = path, reason


class AllCheckpointsDamaged(RuntimeError):
  """Every checkpoint of the directory is damaged: no position to resume from."""


class IncompatibleCheckpoint(ValueError):
  """The checkpoint holds another state than the restore target (another config), not damage."""


@dataclasses.dataclass(frozen=True)
class Restored:
  state: object
  data_state: dict | None   # the input pipeline's position
  extra: dict | None        # the loop's own JSON, as given to ``save``
  step: int


class Checkpointer:
  """The checkpoints of one run directory. Every process calls every method (they synchronise)."""

  def __init__(self, directory: str, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept")
    _silence_noise_of_failed_io()
    self._keep = keep
    self._failure: CheckpointSaveError | None = None
    self._saving: int | None = None  # the step of the latest save
    self._background: tuple[int, BaseException] | None = None  # what ``check`` reports
    # Only a writer prunes: evaluating a run's checkpoints with another ``keep`` deletes none.
    self._saved = False
    # Orbax refuses relative paths; a workdir given relative to the current folder is fine here.
    self._directory = os.path.abspath(directory)
    try:
      with _quiet_orbax():  # it reads every step's metadata; a damaged one is reported at restore
        self._manager = self._open_manager()
    except OSError as error:
      raise CheckpointSaveError(f"cannot create the checkpoint directory {self._directory}: "
                                f"{error}") from error
    self._metrics = self._read_metrics()

  def _open_manager(self):
    return ocp.CheckpointManager(
        self._directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "extra": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: Orbax would delete the best
            create=True,
            # A directory that cannot be created fails inside ``save``: created in the
            # background, the failure leaves Orbax threads waiting 20 minutes for it.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))

  @property
  def directory(self) -> str:
    return self._directory

  def step_path(self, step: int) -> str:
    return os.path.join(self._directory, str(step))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the highest recorded metric; None before any is recorded."""
    steps = set(self.all_steps())
    scored = [(value, step) for step, value in self._metrics.items()
              if step in steps and np.isfinite(value)]
    return max(scored)[1] if scored else None

  def check_writable(self) -> None:
    """Raises ``CheckpointSaveError`` now if the directory cannot take a file, before training."""
    probe = os.path.join(self._directory,
                         f".write_probe.{jax.process_index()}.{os.getpid()}")
    try:
      with open(probe, "wb") as f:
        f.write(b"probe")
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
    except OSError as error:
      raise CheckpointSaveError(
          f"the checkpoint directory {self._directory} is not writable: {error}") from error

  # --- saving -----------------------------------------------------------------------------------

  def save(self, step: int, state, data_state: dict | None = None,
           extra: dict | None = None) -> None:
    """Starts writing ``step``; returns once the arrays are copied off the devices.

    ``data_state`` and ``extra`` are JSON-serialisable dicts. Raises ``CheckpointSaveError`` if
    this or the previous (still finishing) save failed, and refuses every save after that.
    """
    if self._failure is not None:
      raise CheckpointSaveError(f"an earlier checkpoint save failed: {self._failure}")
    self._finish_previous()
    tree = _with_key_data(state)
    items = {"state": ocp.args.StandardSave(tree),
             "checksums": ocp.args.JsonSave(checksums.tree_checksums(tree))}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(extra)
    self._saved = True
    try:
      # ``force``: Orbax would otherwise skip a step at or before its latest one in silence.
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # noqa: BLE001 - any failure to write ends the run the same way
      raise self._failed(step, error) from error
    self._saving = step
    threading.Thread(target=self._watch, daemon=True).start()

  def check(self) -> None:
    """Raises ``CheckpointSaveError`` if the save in flight has failed already; never blocks.

    A full disk fails the write seconds after ``save`` returned; called every step, this stops
    the run then rather than at the next save, an epoch of training later.
    """
    if self._failure is None and self._background is not None:
      step, error = self._background
      raise self._failed(step, error) from error

  def _watch(self) -> None:
    # A watch may wait for a later save than its own; the one that fails is always the latest,
    # since ``save`` first waits for the previous one and refuses to go on after a failure.
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - reported by ``check`` or the next wait
      self._background = (self._saving, error)

  def wait(self) -> None:
    """Blocks until the last save is complete, then prunes old steps. Raises
    ``CheckpointSaveError`` if it failed, unless a failure was raised already (``save``'s)."""
    if self._failure is None:
      self._finish_previous()

  def close(self) -> None:
    """Completes the last save and releases Orbax. After a failed save it returns at once: what
    Orbax still runs may wait for a write that will never come."""
    if self._failure is None:
      self._finish_previous()
      self._manager.close()

  def record_metric(self, step: int, value: float) -> None:
    """Records ``step``'s metric (higher is better) for choosing the best step to keep.

    It counts from the next ``save``, ``wait`` or ``close``, where every process prunes alike.
    """
    if step not in self.all_steps():
      raise ValueError(f"no checkpoint of step {step} in {self._directory} "
                       f"(steps {self.all_steps()})")
    if jax.process_count() > 1:  # one value everywhere, or the hosts would prune differently
      from jax.experimental import multihost_utils
      value = multihost_utils.broadcast_one_to_all(np.float32(value))
    self._metrics[step] = float(value)
    self._write_metrics()

  def _finish_previous(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise self._failed(self._saving, error) from error
    self._prune()

  def _failed(self, step, error) -> CheckpointSaveError:
    self._failure = CheckpointSaveError(
        f"could not write checkpoint {self.step_path(step)}: {_short(error)}")
    _exit_if_stuck_at_shutdown()
    return self._failure

  def _prune(self) -> None:
    """Deletes every finished step but the last ``keep`` and the best (no save is in flight)."""
    if not self._saved:
      return
    steps = self.all_steps()
    kept = set(steps[-self._keep:]) | {self.best_step()}
    for step in steps:
      if step not in kept:
        self._manager.delete(step)
    stale = [s for s in self._metrics if s not in self.all_steps()]
    if stale:
      for step in stale:
        del self._metrics[step]
      self._write_metrics()

  def _read_metrics(self) -> dict[int, float]:
    path = os.path.join(self._directory, METRICS_FILE)
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return {int(step): float(value) for step, value in json.load(f).items()}

  def _write_metrics(self) -> None:
    if jax.process_index() != 0:
      return
    path = os.path.join(self._directory, METRICS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:  # atomic: a crash leaves the old file or the new one
      json.dump({str(step): value for step, value in sorted(self._metrics.items())}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def array_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """``{dotted leaf name: shape}`` of the state saved at ``step``, read from its metadata
    alone (e.g. the classifier's width, to build a restore target without the dataset)."""
    path = self.step_path(step)
    with _quiet_orbax():
      try:
        metadata = self._manager.item_metadata(step)["state"]
      except Exception as error:  # noqa: BLE001 - whatever Orbax meets in a damaged step
        raise DamagedCheckpoint(path, _short(error)) from error
    if metadata is None:
      raise DamagedCheckpoint(path, "missing state")
    return {name: tuple(leaf.shape) for name, leaf in checksums.leaf_names(metadata).items()}

  # --- restoring --------------------------------------------------------------------------------

  def restore(self, abstract_state, step: int | None = None, *, verify: bool = True) -> Restored:
    """Restores ``step`` (default: the latest) into ``abstract_state``'s shapes and shardings.

    Raises ``DamagedCheckpoint`` if the step cannot be read or (``verify``) its arrays differ
    from the saved ones, ``IncompatibleCheckpoint`` if it holds another state than the target.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self._directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self._directory} "
                              f"(steps {self.all_steps()})")
    with _quiet_orbax():
      return self._restore(abstract_state, step, verify)

  def restore_latest_intact(self, abstract_state, log=print) -> Restored | None:
    """The latest checkpoint that restores and verifies, or None if there is none at all.

    Each damaged step is reported in one warning line (path and reason) and the one before is
    tried; once an intact one restores, the damaged ones are moved aside as ``<step>.damaged``.
    If every step is damaged nothing is moved (a rerun meets the same error instead of silently
    starting afresh) and ``AllCheckpointsDamaged`` lists them.
    """
    steps = self.all_steps()
    if not steps:
      return None
    damaged = []
    with _quiet_orbax():
      for index in range(len(steps) - 1, -1, -1):
        try:
          restored = self._restore(abstract_state, steps[index], verify=True)
        except DamagedCheckpoint as error:
          damaged.append(error)
          then = f"falling back to step {steps[index - 1]}" if index else "no earlier checkpoint"
          log(f"WARNING: checkpoint {error.path} is damaged ({error.reason}); {then}")
          continue
        if damaged:
          moved = [self._move_aside(error.path) for error in damaged]
          log(f"moved the damaged checkpoint(s) aside: {', '.join(moved)}")
        return restored
    listing = "; ".join(f"{os.path.basename(e.path)}: {e.reason}" for e in damaged)
    raise AllCheckpointsDamaged(
        f"every checkpoint under {self._directory} is damaged ({listing}). Nothing was moved; "
        "delete or move them to start afresh.")

  def _restore(self, abstract_state, step: int, verify: bool) -> Restored:
    path = self.step_path(step)
    target = _with_key_data(abstract_state)
    restored, damage = None, None
    try:
      restored = self._read(step, path, target, verify)
    except DamagedCheckpoint as error:
      damage = error
    # One verdict on every host: a host that read its shards goes on to the checksums, a
    # collective that a host which failed would never join.
    if not _on_every_host(damage is None):
      raise damage or DamagedCheckpoint(path, "unreadable on another host")
    tree = restored["state"]
    if verify:  # the checksums are global arrays: one result, the same on every host
      _verify(path, restored["checksums"], checksums.tree_checksums(tree))
    return Restored(_with_keys(tree, abstract_state), restored.get("data"),
                    restored.get("extra"), step)

  def _read(self, step: int, path: str, target, verify: bool):
    try:
      metadata = self._manager.item_metadata(step)
      present = set(metadata.keys())  # JSON items list with no metadata of their own
      if "state" in present and metadata["state"] is None:
        present.remove("state")
      missing = {"state", "checksums"} - present if verify else {"state"} - present
      if missing:
        raise DamagedCheckpoint(path, f"missing {' and '.join(sorted(missing))}")
      _check_same_arrays(path, metadata["state"], target)
      items = {"state": ocp.args.StandardRestore(target)}
      items.update({k: ocp.args.JsonRestore() for k in ("checksums", "data", "extra")
                    if k in present})
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except (DamagedCheckpoint, IncompatibleCheckpoint):
      raise
    except Exception as error:  # noqa: BLE001 - whatever Orbax meets in a damaged step
      raise DamagedCheckpoint(path, _short(error)) from error

  def _move_aside(self, path: str) -> str:
    aside, n = path + DAMAGED_SUFFIX, 1
    while os.path.exists(aside):
      n += 1
      aside = f"{path}{DAMAGED_SUFFIX}-{n}"
    if jax.process_index() == 0:
      os.rename(path, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint moved aside: {aside}")
    with _quiet_orbax():
      self._manager.reload()
    return aside


def abstract_state(state, shardings):
  """The restore target for ``state``: its shapes and dtypes with these shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _on_every_host(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _with_key_data(tree):
  """Typed PRNG keys are stored as their raw uint32 data."""

  def convert(leaf):
    if not _is_key(leaf):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, leaf)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
    return jax.random.key_data(leaf)
  return jax.tree.map(convert, tree)


def _with_keys(tree, abstract):
  """Wraps the key data of ``tree`` back into keys where ``abstract`` has keys."""

  def convert(leaf, like):
    if not _is_key(like):
      return leaf
    key = jax.random.wrap_key_data(leaf)
    if key.dtype != like.dtype:
      raise ValueError(f"keys of type {like.dtype} are not supported (only the default)")
    return key
  return jax.tree.map(convert, tree, abstract)


def _check_same_arrays(path: str, saved, target) -> None:
  """The checkpoint's arrays must be the target's, name for name, shape for shape."""
  want = {n: (tuple(a.shape), np.dtype(a.dtype)) for n, a in checksums.leaf_names(target).items()}
  have = {n: (tuple(a.shape), np.dtype(a.dtype)) for n, a in checksums.leaf_names(saved).items()}
  if want == have:
    return
  only_here, only_there = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  changed = [f"{n}: {have[n][0]} {have[n][1]} saved, {want[n][0]} {want[n][1]} expected"
             for n in sorted(set(want) & set(have)) if want[n] != have[n]]
  details = changed[:3] + [f"not saved: {', '.join(only_here[:3])}"] * bool(only_here) + [
      f"not expected: {', '.join(only_there[:3])}"] * bool(only_there)
  raise IncompatibleCheckpoint(
      f"checkpoint {path} holds another train state than this config builds "
      f"({'; '.join(details)}); was it written with another model or number of classes?")


def _verify(path: str, saved: dict, computed: dict) -> None:
  if saved == computed:
    return
  differ = [n for n in computed if saved.get(n) != computed[n]] + [
      n for n in saved if n not in computed]
  more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
  raise DamagedCheckpoint(path, f"checksum mismatch in {', '.join(differ[:3])}{more}")


def _short(error: BaseException) -> str:
  """One line for an exception: its root cause (Orbax wraps TensorStore's errors in messages
  that only point at the cause), cut before TensorStore's page of JSON spec."""
  while True:  # down the chain that a traceback would show
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if cause is None:
      break
    error = cause
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
  if len(text) > 200:
    text = text[:197] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs every failed read with a traceback; a damaged step is reported in one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


_previous_unraisablehook = None


def _silence_noise_of_failed_io() -> None:
  """After a failed read or write, Orbax drops its other coroutines and TensorStore's callbacks
  land on closed event loops: each prints a traceback (dozens per damaged step) through
  ``sys.unraisablehook``, saying nothing the failed call does not already say."""
  global _previous_unraisablehook
  if _previous_unraisablehook is not None:
    return
  _previous_unraisablehook = sys.unraisablehook

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    code = getattr(source, "cr_code", None)
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
        code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
      return
    _previous_unraisablehook(unraisable)
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DroppedTensorStoreFutures())


class _DroppedTensorStoreFutures(logging.Filter):
  """The same after a failed read, for the futures of the other reads: asyncio logs each one."""

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith("Future exception was never retrieved")
                and ("OCDBT" in message or "TensorStore" in message))


_exit_watch_started = False


def _exit_if_stuck_at_shutdown() -> None:
  """After a failed save, Orbax's non-daemon threads may wait up to 20 minutes for the write
  that failed, holding the interpreter at exit; a daemon watch ends the process with status 1
  if it still lingers ``EXIT_GRACE_S`` after the main thread finished."""
  global _exit_watch_started
  if _exit_watch_started:
    return
  _exit_watch_started = True

  def watch():
    threading.main_thread().join()
    time.sleep(EXIT_GRACE_S)
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    os.write(2, b"checkpointing: a failed save left Orbax threads waiting; exiting with status 1\n")
    os._exit(1)
  threading.Thread(target=watch, name="checkpoint_failure_exit", daemon=True).start()
