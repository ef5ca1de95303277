"""Orbax checkpoints of the sharded TrainState and the data iterator's position: checksums, the
fallback past damaged steps, failed saves that end the run, and retention of the last k + best."""
import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import uad
from uad_jax import sharding
from uad_jax.training import checkpointing, checksums, train_state


def _mesh():
  return sharding.make_mesh((("data", 4), ("model", 2)))


def _state(seed: int = 0):
  """A small sharded state: incompressible random bits (so their bytes appear verbatim in the
  step's data files), a bf16 array, an int8 scalar, a bool and a typed PRNG key."""
  mesh = _mesh()
  noise = jax.random.bits(jax.random.key(seed), (64, 64), jnp.uint32)
  return {
      "noise": jax.device_put(jax.lax.bitcast_convert_type(noise, jnp.float32),
                              NamedSharding(mesh, P("data", "model"))),
      "half": jax.device_put(jnp.arange(24, dtype=jnp.bfloat16) * seed,
                             NamedSharding(mesh, P("model"))),
      "count": jnp.int8(seed),
      "flag": jnp.array(seed % 2 == 0),
      "rng": jax.random.key(seed + 1),
  }


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _bits(x):
  x = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return np.atleast_1d(np.asarray(x)).view(np.uint8)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_bits(x), _bits(y))


@contextlib.contextmanager
def _closing(checkpoints):
  try:
    yield checkpoints
  finally:
    checkpoints.close()


def _saved(directory, steps=(1, 2), keep=5):
  with _closing(checkpointing.Checkpointer(str(directory), keep=keep)) as checkpoints:
    for step in steps:
      checkpoints.save(step, _state(step), {"position": step}, {"epoch_steps": [step]})
  return {step: _state(step) for step in steps}


def test_round_trip_with_a_relative_directory_keeps_values_shardings_and_extra(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = uad.get_config("synthetic")
  with config.unlocked():
    config.model.image_size = (32, 16)
    config.mesh = (("data", 4), ("model", 2))
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_state.create_train_state(config, 8, 5, mesh, log=None)
  state = state.replace(prototypes=state.prototypes + 0.5)
  extra = {"epoch_steps": [{"loss/total": 1.5, "nonfinite": 0.0}], "nonfinite_run": [3]}
  with _closing(checkpointing.Checkpointer("workdir/checkpoints")) as checkpoints:
    checkpoints.save(7, state, {"position": [3, 1]}, extra)
  with _closing(checkpointing.Checkpointer("workdir/checkpoints")) as checkpoints:
    restored = checkpoints.restore(checkpointing.abstract_state(state, shardings))
  assert (restored.step, restored.data_state, restored.extra) == (7, {"position": [3, 1]}, extra)
  assert restored.state.prototypes.sharding == state.prototypes.sharding
  np.testing.assert_array_equal(restored.state.prototypes, state.prototypes)
  for a, b in zip(jax.tree.leaves(restored.state.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(restored.state.rng),
                                jax.random.key_data(state.rng))
  assert (tmp_path / "workdir" / "checkpoints" / "7").is_dir()


def test_restore_without_a_checkpoint_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
    checkpointing.Checkpointer(str(tmp_path / "empty")).restore(None)


def test_data_state_and_extra_are_optional(tmp_path):
  state = _state(3)
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    checkpoints.save(4, state)
    checkpoints.check()   # a healthy save in flight is no error
    checkpoints.wait()
    checkpoints.check()
    restored = checkpoints.restore(_target(state))
  assert (restored.data_state, restored.extra, restored.step) == (None, None, 4)
  _assert_same(restored.state, state)


# --- checksums -----------------------------------------------------------------------------------

def test_checksums_are_the_same_on_one_device_and_on_a_sharded_mesh():
  sharded = _state(5)
  on_one = jax.device_put(jax.device_get(sharded), jax.devices()[0])
  assert sharded["noise"].sharding.num_devices == 8
  assert checksums.tree_checksums(sharded) == checksums.tree_checksums(on_one)
  mesh = _mesh()
  other_layout = {**sharded, "noise": jax.device_put(sharded["noise"],
                                                     NamedSharding(mesh, P("model", "data")))}
  assert checksums.tree_checksums(other_layout) == checksums.tree_checksums(on_one)
  assert set(checksums.tree_checksums(on_one)) == {"noise", "half", "count", "flag", "rng"}


def test_checksums_change_with_any_one_bit_and_with_swapped_elements():
  x = np.asarray(_state(1)["noise"])
  base = checksums.tree_checksums({"x": x})["x"]
  for index, bit in ((0, 0), (777, 31), (4095, 17)):
    flipped = x.copy()
    flipped.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
    assert checksums.tree_checksums({"x": flipped})["x"] != base
  swapped = x.copy()
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
  assert checksums.tree_checksums({"x": swapped})["x"] != base
  # Widening 16- and 8-bit types must not lose bits: -0.0 and 0.0 differ in the sign bit only.
  assert (checksums.tree_checksums({"h": jnp.array([0.0], jnp.bfloat16)})
          != checksums.tree_checksums({"h": jnp.array([-0.0], jnp.bfloat16)}))


# --- damaged checkpoints -------------------------------------------------------------------------

def _flip_a_bit_of_noise(step_dir, state):
  """Flips one bit inside the array data of ``noise`` in the step's data files."""
  shard = state["noise"].addressable_shards[0]
  needle = np.asarray(shard.data).tobytes()[256:320]
  hits = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        blob = f.read()
      if needle in blob:
        hits.append((path, blob.index(needle)))
  assert len(hits) == 1, hits
  path, at = hits[0]
  with open(path, "r+b") as f:
    f.seek(at + 5)
    byte = f.read(1)[0]
    f.seek(at + 5)
    f.write(bytes([byte ^ 0x10]))


def test_a_flipped_bit_is_caught_and_the_run_falls_back_to_the_step_before(tmp_path):
  states = _saved(tmp_path)
  _flip_a_bit_of_noise(tmp_path / "2", states[2])
  target = _target(states[2])
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    # Unchecked, the flip reads back silently as another value: what the checksums are for.
    unchecked = checkpoints.restore(target, verify=False).state
    differ = np.asarray(unchecked["noise"]).view(np.uint32) != np.asarray(
        states[2]["noise"]).view(np.uint32)
    assert differ.sum() == 1
    with pytest.raises(checkpointing.DamagedCheckpoint,
                       match=f"{tmp_path / '2'} is damaged: checksum mismatch in noise$"):
      checkpoints.restore(target)
    lines = []
    restored = checkpoints.restore_latest_intact(target, lines.append)
    assert (restored.step, restored.data_state, restored.extra) == (
        1, {"position": 1}, {"epoch_steps": [1]})
    _assert_same(restored.state, states[1])
    assert lines[0] == (f"WARNING: checkpoint {tmp_path / '2'} is damaged (checksum mismatch in "
                        "noise); falling back to step 1")
    assert len(lines) == 2 and "2.damaged" in lines[1]
    assert checkpoints.all_steps() == [1] and checkpoints.latest_step() == 1
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"]
    # The retrained step 2 is saved where the damaged one was.
    checkpoints.save(2, states[2])
    checkpoints.wait()
    _assert_same(checkpoints.restore(target).state, states[2])


def _truncate_the_largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def _delete_the_contents(step_dir):
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _delete_the_array_data(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state", "ocdbt.process_0", "d"))


def _delete_the_checksums(step_dir):
  shutil.rmtree(os.path.join(step_dir, "checksums"))


def _garble_the_array_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
    f.truncate(100)


@pytest.mark.parametrize("damage", [_truncate_the_largest_file, _delete_the_contents,
                                    _delete_the_array_data, _delete_the_checksums,
                                    _garble_the_array_metadata])
def test_unreadable_steps_fall_back_with_one_warning_line_each(tmp_path, damage, capfd):
  states = _saved(tmp_path, steps=(1, 2, 3))
  damage(str(tmp_path / "3"))
  damage(str(tmp_path / "2"))
  lines = []
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    restored = checkpoints.restore_latest_intact(_target(states[1]), lines.append)
  assert restored.step == 1
  _assert_same(restored.state, states[1])
  assert [line.split(" is damaged (")[0] for line in lines[:2]] == [
      f"WARNING: checkpoint {tmp_path / '3'}", f"WARNING: checkpoint {tmp_path / '2'}"]
  assert lines[0].endswith("; falling back to step 2") and "\n" not in "".join(lines)
  assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged", "3.damaged"]
  # Orbax's own tracebacks and TensorStore's dropped callbacks stay quiet.
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err


def test_every_step_damaged_is_an_error_listing_them_and_nothing_is_moved(tmp_path):
  states = _saved(tmp_path)
  _delete_the_array_data(str(tmp_path / "1"))
  _flip_a_bit_of_noise(tmp_path / "2", states[2])
  lines = []
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    with pytest.raises(checkpointing.AllCheckpointsDamaged) as error:
      checkpoints.restore_latest_intact(_target(states[1]), lines.append)
  message = str(error.value)
  assert f"every checkpoint under {tmp_path} is damaged" in message
  assert "2: checksum mismatch in noise" in message and "1: " in message
  assert lines[1].endswith("; no earlier checkpoint")
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_another_state_than_the_target_is_refused_not_taken_for_damage(tmp_path):
  states = _saved(tmp_path)
  target = {**_target(states[1]), "half": jax.ShapeDtypeStruct((48,), jnp.bfloat16)}
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match=r"half: \(24,\) bfloat16 saved"):
      checkpoints.restore_latest_intact(target, print)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_without_checkpoints_there_is_nothing_to_resume(tmp_path):
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    assert checkpoints.restore_latest_intact(_target(_state()), print) is None


# --- failed saves --------------------------------------------------------------------------------

@contextlib.contextmanager
def _read_only(path):
  """chmod does not stop root; the immutable attribute does (where the filesystem has it)."""
  if os.geteuid() == 0:
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
      pytest.skip("running as root on a filesystem without chattr +i")
    undo = ["chattr", "-i", str(path)]
  else:
    os.chmod(path, 0o555)
    undo = None
  try:
    yield
  finally:
    subprocess.run(undo, check=True) if undo else os.chmod(path, 0o755)


def test_a_read_only_directory_fails_the_preflight_and_the_save_at_once(tmp_path):
  states = _saved(tmp_path, steps=(1,))
  checkpoints = checkpointing.Checkpointer(str(tmp_path))
  checkpoints.check_writable()
  with _read_only(tmp_path):
    with pytest.raises(checkpointing.CheckpointSaveError, match="is not writable"):
      checkpoints.check_writable()
    start = time.monotonic()
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=f"could not write checkpoint {tmp_path / '2'}: PermissionError"):
      checkpoints.save(2, states[1])
    checkpoints.wait()   # the failure was raised once; the loop's cleanup must not raise again
    checkpoints.close()
    assert time.monotonic() - start < 60  # catches a hang on Orbax's deadline, nothing finer
    with pytest.raises(checkpointing.CheckpointSaveError, match="an earlier checkpoint save"):
      checkpoints.save(3, states[1])
  assert os.listdir(tmp_path) == ["1"]


def test_a_directory_that_cannot_be_created_is_a_save_error(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(checkpointing.CheckpointSaveError, match="cannot create"):
    checkpointing.Checkpointer(str(tmp_path / "file" / "checkpoints"))


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, threading, time
    from uad_jax.training import checkpointing
    sys.path.insert(0, {tests!r})
    from test_checkpointing import _state
    checkpointing.EXIT_GRACE_S = 1.0
    checkpoints = checkpointing.Checkpointer({directory!r})
    checkpoints.save(1, _state(1))
    checkpoints.wait()
    # A full disk: every write past 4 KiB now fails (EFBIG instead of ENOSPC, same path).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    if {stuck_thread!r}:  # like an Orbax thread that waits 20 minutes for the failed write
      threading.Thread(target=threading.Event().wait).start()
    try:
      checkpoints.save(2, _state(2))
      for _ in range(600):             # the training steps after the save, each checking it
        checkpoints.check()
        time.sleep(0.1)
      print("check() never raised", file=sys.stderr)
      checkpoints.save(3, _state(3))   # ... or the next save raises
    finally:
      checkpoints.wait()               # the loop's cleanup then returns at once
      checkpoints.close()
""")


@pytest.mark.parametrize("stuck_thread", [False, True])
def test_a_full_disk_ends_the_process_with_an_error_within_seconds(tmp_path, stuck_thread):
  script = _FULL_DISK.format(tests=os.path.dirname(__file__), directory=str(tmp_path / "ckpt"),
                             stuck_thread=stuck_thread)
  start = time.monotonic()
  # Pipes, not files, for the output: the file size limit would cut a log file short.
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert time.monotonic() - start < 120, "a failed save hung"  # generous: imports and compiles
  assert done.returncode == 1, done.stderr[-3000:]
  assert (f"CheckpointSaveError: could not write checkpoint {tmp_path / 'ckpt' / '2'}: "
          in done.stderr), done.stderr[-3000:]
  assert "check() never raised" not in done.stderr
  if stuck_thread:
    assert "left Orbax threads waiting; exiting with status 1" in done.stderr
  assert os.listdir(tmp_path / "ckpt").count("1") == 1


# --- retention -----------------------------------------------------------------------------------

def test_retention_keeps_the_last_k_and_the_best_by_a_metric_reported_after_the_save(tmp_path):
  state = _state()
  maps = {1: 0.2, 2: 0.6, 3: 0.3, 4: 0.1, 5: 0.4}
  with _closing(checkpointing.Checkpointer(str(tmp_path), keep=2)) as checkpoints:
    for step, value in maps.items():
      checkpoints.save(step, state)
      checkpoints.record_metric(step, value)   # the evaluation follows the save
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4, 5] and checkpoints.best_step() == 2
    checkpoints.save(6, state)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 5, 6]
    assert checkpoints.best_step() == 2       # step 6 is not evaluated yet
    checkpoints.record_metric(6, 0.9)
    checkpoints.save(7, state)
    checkpoints.wait()
    assert checkpoints.all_steps() == [6, 7] and checkpoints.best_step() == 6
    with pytest.raises(ValueError, match="no checkpoint of step 3"):
      checkpoints.record_metric(3, 1.0)
  assert sorted(os.listdir(tmp_path)) == ["6", "7", "metrics.json"]
  # A reader (``--mode=eval``) sees the same best and deletes nothing, whatever its ``keep``.
  with _closing(checkpointing.Checkpointer(str(tmp_path), keep=1)) as reader:
    assert (reader.best_step(), reader.all_steps(), reader.latest_step()) == (6, [6, 7], 7)
    assert reader.restore(_target(state), reader.best_step()).step == 6
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [6, 7]


def test_best_step_is_none_before_any_metric(tmp_path):
  with _closing(checkpointing.Checkpointer(str(tmp_path))) as checkpoints:
    checkpoints.save(1, _state())
    checkpoints.wait()
    assert checkpoints.best_step() is None and checkpoints.all_steps() == [1]
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 9"):
      checkpoints.restore(_target(_state()), 9)


def test_keep_must_leave_the_latest(tmp_path):
  with pytest.raises(ValueError, match="keep=0"):
    checkpointing.Checkpointer(str(tmp_path), keep=0)
