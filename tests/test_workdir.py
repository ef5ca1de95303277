"""One run per workdir (the lock) and a resumed run keeps its config (config.json)."""
import errno
import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from uad_jax.testing import configs
from uad_jax.training import workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
# Takes the lock, says so, and holds it until stdin closes or the process is killed.
HOLDER = """
import sys
from uad_jax.training import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
  """Another process holding the lock on tmp_path / "run"."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], cwd=REPO, env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "locked\n", "the holder process did not take the lock"
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def test_a_second_run_is_refused_naming_the_holder(holder, tmp_path):
  with pytest.raises(workdir.WorkdirBusy) as e, workdir.lock(str(tmp_path / "run")):
    pytest.fail("took a lock another process holds")
  message = str(e.value)
  assert str(tmp_path / "run") in message
  assert f"pid {holder.pid}" in message and socket.gethostname() in message
  assert "started 20" in message  # its start time, ISO


def test_a_lock_left_by_a_killed_process_does_not_block(holder, tmp_path):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  record = json.loads((tmp_path / "run" / workdir.LOCK_FILE).read_text())
  assert record["pid"] == holder.pid  # the dead holder's record is still there, and ignored
  with workdir.lock(str(tmp_path / "run")):
    record = json.loads((tmp_path / "run" / workdir.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()


def test_the_same_process_cannot_lock_twice(tmp_path):
  with workdir.lock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirBusy, match=f"pid {os.getpid()} on host"):
      with workdir.lock(str(tmp_path)):
        pass


def test_the_lock_is_released_when_the_block_ends(tmp_path):
  with workdir.lock(str(tmp_path)):
    pass
  with pytest.raises(ZeroDivisionError), workdir.lock(str(tmp_path)):
    1 / 0  # pylint: disable=pointless-statement
  with workdir.lock(str(tmp_path)):
    pass
  assert (tmp_path / workdir.LOCK_FILE).read_text() == ""  # no holder left to misreport


def test_only_process_0_locks(tmp_path):
  with workdir.lock(str(tmp_path)), workdir.lock(str(tmp_path), process_index=1):
    pass


@pytest.fixture
def no_flock(monkeypatch):
  """A filesystem without flock, like some NFS mounts."""

  def unsupported(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", unsupported)


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _pid_file(tmp_path, pid, host):
  (tmp_path / workdir.PID_FILE).write_text(
      json.dumps({"pid": pid, "host": host, "started": "2024-01-01T00:00:00+00:00"}))


def test_without_flock_a_pid_file_refuses_a_second_holder_and_goes_at_the_end(no_flock, tmp_path):
  with workdir.lock(str(tmp_path)):
    assert json.loads((tmp_path / workdir.PID_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(workdir.WorkdirBusy, match=f"pid {os.getpid()} on host"):
      with workdir.lock(str(tmp_path)):
        pass
  assert not (tmp_path / workdir.PID_FILE).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.LOCK_FILE]


def test_without_flock_a_dead_holder_on_this_host_is_replaced(no_flock, tmp_path):
  _pid_file(tmp_path, _dead_pid(), socket.gethostname())
  with workdir.lock(str(tmp_path)):
    assert json.loads((tmp_path / workdir.PID_FILE).read_text())["pid"] == os.getpid()


def test_without_flock_a_holder_on_another_host_blocks_and_the_message_says_how_to_clear(
    no_flock, tmp_path):
  _pid_file(tmp_path, _dead_pid(), "another-host")
  with pytest.raises(workdir.WorkdirBusy, match="on host another-host") as e:
    with workdir.lock(str(tmp_path)):
      pass
  assert f"remove {tmp_path / workdir.PID_FILE}" in str(e.value)


def _config(**changes):
  return configs.with_fields(changes)


def _recorded(tmp_path) -> dict:
  return json.loads((tmp_path / workdir.CONFIG_FILE).read_text())


def test_a_fresh_run_records_its_config_which_reads_back_as_the_same(tmp_path):
  c = _config()
  assert workdir.record_config(str(tmp_path), c, resuming=False) == []
  recorded = _recorded(tmp_path)
  assert recorded["optim"]["lr_per_replica"] == 0.02
  assert recorded["mesh"] == [["data", -1], ["model", 1]]  # tuples as lists
  assert recorded["model"]["image_size"] == [64, 32]
  assert recorded == json.loads(json.dumps(c.to_dict()))


def test_resuming_with_the_same_config_passes_and_leaves_the_record(tmp_path):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  before = (tmp_path / workdir.CONFIG_FILE).stat().st_mtime_ns
  assert workdir.record_config(str(tmp_path), _config(), resuming=True) == []
  assert (tmp_path / workdir.CONFIG_FILE).stat().st_mtime_ns == before


def test_a_changed_learning_rate_and_p_are_refused_listing_both(tmp_path):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  before = (tmp_path / workdir.CONFIG_FILE).read_bytes()
  with pytest.raises(workdir.ConfigChanged) as e:
    workdir.record_config(str(tmp_path), _config(**{"optim.lr_per_replica": 0.05,
                                                    "sampler.identities": 8,
                                                    "eval_batch_size": 128}), resuming=True)
  message = str(e.value)
  assert "optim.lr_per_replica: 0.02 → 0.05" in message
  assert "sampler.identities: 4 → 8" in message
  assert "eval_batch_size: 256 → 128" in message  # reported among the allowed ones
  assert {c.field for c in e.value.changes} == {"optim.lr_per_replica", "sampler.identities",
                                                "eval_batch_size"}
  assert (tmp_path / workdir.CONFIG_FILE).read_bytes() == before


def test_fields_that_do_not_change_training_are_accepted_returned_and_recorded(tmp_path):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  new = _config(eval_batch_size=128, data_threads=4, mesh=(("data", 2), ("model", 4)),
                **{"dataset.data_dir": "/elsewhere/tfds"})
  changes = workdir.record_config(str(tmp_path), new, resuming=True)
  assert sorted(str(c) for c in changes) == [
      "data_threads: 2 → 4",
      'dataset.data_dir: "data/tfds" → "/elsewhere/tfds"',
      "eval_batch_size: 256 → 128",
      'mesh: [["data", -1], ["model", 1]] → [["data", 2], ["model", 4]]',
  ]
  recorded = _recorded(tmp_path)
  assert (recorded["eval_batch_size"], recorded["data_threads"]) == (128, 4)
  assert workdir.record_config(str(tmp_path), new, resuming=True) == []


def test_another_number_of_data_workers_is_refused_saying_why(tmp_path):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  with pytest.raises(workdir.ConfigChanged, match=r"data_workers: 0 → 2  \(.*per worker"):
    workdir.record_config(str(tmp_path), _config(data_workers=2), resuming=True)


def test_a_field_on_one_side_only_is_a_difference_unless_it_may_change(tmp_path, monkeypatch):
  # A retired field that was harmless to change; the list is data, so a test can extend it.
  monkeypatch.setattr(workdir, "MAY_CHANGE_ON_RESUME",
                      workdir.MAY_CHANGE_ON_RESUME + ("retired_knob",))
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  recorded = _recorded(tmp_path)
  recorded["old_knob"] = 1             # a field the current code no longer has
  recorded["retired_knob"] = 3         # one it may drop
  del recorded["seed"]                 # one the recording code did not have yet
  del recorded["eval_every_epochs"]    # one it may add
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(recorded))
  with pytest.raises(workdir.ConfigChanged) as e:
    workdir.record_config(str(tmp_path), _config(), resuming=True)
  assert "old_knob: 1 → (absent)" in str(e.value)
  assert "seed: (absent) → 1234" in str(e.value)
  assert sorted(c.field for c in e.value.changes) == [
      "eval_every_epochs", "old_knob", "retired_knob", "seed"]

  del recorded["old_knob"]
  recorded["seed"] = 1234
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(recorded))
  changes = workdir.record_config(str(tmp_path), _config(), resuming=True)
  assert sorted(str(c) for c in changes) == ["eval_every_epochs: (absent) → 10",
                                             "retired_knob: 3 → (absent)"]
  assert "retired_knob" not in _recorded(tmp_path)
  assert _recorded(tmp_path)["eval_every_epochs"] == 10


def test_the_comparison_sees_values_as_json_stores_them(tmp_path):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  recorded = _recorded(tmp_path)
  recorded["optim"]["epochs"] = 30.0   # a float written by hand or another JSON writer
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(recorded))
  assert workdir.record_config(str(tmp_path), _config(), resuming=True) == []
  with pytest.raises(workdir.ConfigChanged, match="optim.epochs: 30.0 → 31"):
    workdir.record_config(str(tmp_path), _config(**{"optim.epochs": 31}), resuming=True)


def test_a_resume_without_a_recorded_config_records_it(tmp_path):
  assert workdir.record_config(str(tmp_path), _config(), resuming=True) == []
  assert _recorded(tmp_path)["seed"] == 1234


@pytest.mark.parametrize("resuming", [False, True])
def test_a_write_interrupted_before_the_rename_leaves_the_previous_file_whole(
    tmp_path, monkeypatch, resuming):
  workdir.record_config(str(tmp_path), _config(), resuming=False)
  before = (tmp_path / workdir.CONFIG_FILE).read_bytes()

  def crash(fd):
    raise OSError(errno.EIO, "interrupted")

  monkeypatch.setattr(os, "fsync", crash)  # the new text is written, not yet renamed in place
  with pytest.raises(OSError, match="interrupted"):
    workdir.record_config(str(tmp_path), _config(eval_batch_size=128), resuming=resuming)
  assert (tmp_path / workdir.CONFIG_FILE).read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == [workdir.CONFIG_FILE]  # no temporary left
