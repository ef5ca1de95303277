"""Several processes make one job. Two CPU processes of 2 devices each, joined by jax.distributed
(tests/multiprocess_driver.py), train as one process of 4 devices does, per epoch within fp32
summation noise, on a data-parallel mesh and on one with a model axis; a 2-process run stopped by
SIGTERM on one host resumes; a mesh on which the processes' batches would not assemble is refused
before any work, naming the mesh to use; the evaluation, shared by the processes, gives the
single-process numbers; only process 0 prints. The mesh layout and its check are also tested
here, on fake process layouts of this process's 8 devices."""
import json
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from uad_jax import distributed, sharding

DRIVER = pathlib.Path(__file__).with_name("multiprocess_driver.py")
EPOCHS = 2
STEPS_PER_EPOCH = 3            # 8 training ids, P=4, K=4 (as in test_run_resilience)
DATA_PARALLEL = [["data", -1], ["model", 1]]
WITH_MODEL_AXIS = [["data", 2], ["model", 2]]
# The tail of Gloo's connection message, which process 1 may print (torn or whole).
_GLOO_CONNECTED = re.compile(
    r"\d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+")
# Relative agreement of per-epoch means between layouts: fp32 sums in another order (measured
# here: about 1e-6; the issue measured 5e-4 over a longer run).
RTOL = 1e-4


class _FakeDevice:
  """What the mesh utilities read of a device, with a process of the test's choosing."""

  def __init__(self, device, process_index):
    self.real, self.id, self.process_index = device, device.id, process_index
    self.platform, self.device_kind = device.platform, device.device_kind


def _mesh_for_layout(mesh_config, process_of):
  """sharding.make_mesh's layout of this process's devices as if `process_of` owned them."""
  fakes = [_FakeDevice(d, process_of(d)) for d in jax.devices()]
  grid = np.vectorize(lambda fake: fake.real, otypes=[object])(
      sharding.device_grid(mesh_config, fakes))
  return Mesh(grid, tuple(name for name, _ in mesh_config))


def _owners(mesh, process_of):
  return np.vectorize(process_of)(mesh.devices)


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
@pytest.mark.parametrize("mesh_config", [(("data", -1), ("model", 1)),
                                         (("data", -1), ("model", 2)),
                                         (("model", 2), ("data", -1)),
                                         (("data", 2), ("model", 4))])
def test_each_process_owns_a_block_of_the_data_axis_and_its_own_rows(layout, mesh_config):
  # 2 fake processes of 4 devices: ids 0-3 | 4-7, or alternating as TPU hosts may number them.
  process_of = (lambda d: d.id // 4) if layout == "blocks" else (lambda d: d.id % 2)
  mesh = _mesh_for_layout(mesh_config, process_of)
  owners = np.moveaxis(_owners(mesh, process_of), list(mesh.shape).index("data"), 0)
  assert (owners == np.repeat([0, 1], mesh.shape["data"] // 2)[:, None]).all(), owners
  for rows in (48, 64):
    sharding.check_process_batches(mesh, rows, "the batch", process_of=process_of)


def test_a_mesh_whose_processes_would_not_get_their_own_rows_is_refused_with_the_mesh_to_use():
  four_processes = lambda d: d.id // 2
  # The model axis spans processes, so the data axis cannot give each its rows.
  mesh = _mesh_for_layout((("data", 1), ("model", 8)), four_processes)
  with pytest.raises(ValueError, match=r"process 0 loads rows 0–11, but under this mesh its "
                                       r"devices hold rows 0–47") as error:
    sharding.check_process_batches(mesh, 48, "the batch", process_of=four_processes)
  assert "config.mesh=(('data', -1), ('model', 2))" in str(error.value)
  # jax.devices() in plain order on processes whose devices interleave.
  interleaved = lambda d: d.id % 2
  plain = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  with pytest.raises(ValueError, match="would not assemble"):
    sharding.check_process_batches(plain, 48, "the batch", process_of=interleaved)
  with pytest.raises(ValueError, match="does not split into 4 equal process slices"):
    sharding.check_process_batches(_mesh_for_layout((("data", 2), ("model", 4)), four_processes),
                                   6, "the batch", process_of=four_processes)
  # One process: any mesh assembles.
  sharding.check_process_batches(plain, 48, "the batch")


def test_distributed_starts_only_when_asked_or_in_a_cluster_of_several(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.detected_cluster() is None
  assert not distributed.initialize("auto") and not distributed.initialize("off") and not calls
  with pytest.raises(ValueError, match="contradicts --process_id"):
    distributed.initialize("off", process_id=1)
  with pytest.raises(ValueError, match="--local_device_ids applies to a distributed run"):
    distributed.initialize("auto", local_device_ids=[0])
  assert distributed.initialize("auto", coordinator_address="10.0.0.1:1234", num_processes=2,
                                process_id=1)
  assert calls[-1][0] == ("10.0.0.1:1234", 2, 1)
  # A one-task SLURM job stays a plain run; one of several tasks joins the others.
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == ("slurm", 1)
  calls.clear()
  assert not distributed.initialize("auto") and not calls
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.initialize("auto") and calls[-1][0] == (None, None, None)
  assert distributed.initialize("on")


# The runs: one built dataset and one compilation cache for all of them.

def _overrides(data, mesh):
  return {"dataset.manual_dir": str(data / "raw"), "dataset.data_dir": str(data / "tfds"),
          "dataset.synthetic_ids": 16, "sampler.identities": 4, "sampler.instances": 4,
          "model.image_size": [32, 16], "model.dtype": "float32", "optim.epochs": EPOCHS,
          "eval_every_epochs": EPOCHS, "eval_batch_size": 64, "log_every_steps": 2,
          "mesh": mesh}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(data, workdir, mesh, processes, devices, **extra):
  """Runs the driver as `processes` processes; [(exit status, stdout, stderr)] by process."""
  spec = {"workdir": str(workdir), "config": _overrides(data, mesh),
          "cache_dir": str(data / "jax_cache"), "devices": devices, "num_processes": processes,
          "coordinator": f"127.0.0.1:{_free_port()}", **extra}
  path = workdir.parent / f"{workdir.name}.spec.json"
  path.write_text(json.dumps(spec))
  logs = [(workdir.parent / f"{workdir.name}.{i}.out", workdir.parent / f"{workdir.name}.{i}.err")
          for i in range(processes)]
  children = []
  for i, (out, err) in enumerate(logs):
    with open(out, "w") as stdout, open(err, "w") as stderr:
      children.append(subprocess.Popen([sys.executable, str(DRIVER), str(path), str(i)],
                                       stdout=stdout, stderr=stderr))
  deadline = time.monotonic() + 400
  try:
    while any(c.poll() is None for c in children):
      # A process that failed leaves the others waiting in a collective: give them a moment.
      if time.monotonic() > deadline or any(c.poll() not in (None, 0) for c in children):
        deadline = min(deadline, time.monotonic() + 20)
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for c in children:
      if c.poll() is None:
        c.kill()
        c.wait()
  return [(c.returncode, out.read_text(), err.read_text()) for c, (out, err) in zip(children, logs)]


def _history(workdir):
  return json.loads((workdir / "train_history.json").read_text())


def _assert_agree(history, reference, rtol=RTOL):
  assert [r["epoch"] for r in history] == [r["epoch"] for r in reference] == [1, 2]
  for got, want in zip(history, reference):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7,
                                 err_msg=f"epoch {want['epoch']}: {key}")


def _as_reid(workdir):
  report = json.loads((workdir / f"eval_epoch{EPOCHS:03d}" / "retrieval.json").read_text())
  return report["protocols"]["as_reid"]["all→all"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(data):
  """1 process × 4 devices, data parallel; it builds the dataset the other runs read."""
  workdir = data.parent / "one_process"
  (rc, out, err), = _launch(data, workdir, DATA_PARALLEL, processes=1, devices=4)
  assert rc == 0, out + err
  return workdir


def _ok(runs):
  for i, (rc, out, err) in enumerate(runs):
    assert rc == 0, f"process {i}: exit {rc}\n{out}\n{err}"


def test_two_processes_train_as_one_and_share_the_evaluation(data, reference, tmp_path):
  probe = tmp_path / "probe.json"
  runs = _launch(data, tmp_path / "run", DATA_PARALLEL, processes=2, devices=2, probe=str(probe))
  _ok(runs)
  _assert_agree(_history(tmp_path / "run"), _history(reference))
  # Features that differ in their last bits may swap a near tie: at most a rank, here.
  got, want = _as_reid(tmp_path / "run"), _as_reid(reference)
  assert got["num_valid_queries"] == want["num_valid_queries"]
  for key in ("mAP", "mINP"):
    np.testing.assert_allclose(got[key], want[key], atol=5e-3, err_msg=key)
  # One voice: the job's lines come from process 0 alone.
  (_, out0, _), (_, out1, _) = runs
  assert "epoch 2/2: loss" in out0 and "AS-ReID mAP" in out0 and "mesh {'data': 4" in out0
  # Gloo's connection messages come from its own threads and can interleave mid-line ("[Gloo]
  # Rank [Gloo] Rank 2 is connected …", then "3 is connected …" alone): take their pieces out
  # first, then every line left must be Gloo's or empty.
  chatter = _GLOO_CONNECTED.sub("", out1)
  assert not [line for line in chatter.splitlines()
              if line.strip() and not line.startswith("[Gloo]")], out1
  # Metrics computed by both processes, each on its share of the queries, are the ones this
  # single process computes alone.
  sys.path.insert(0, str(DRIVER.parent))
  import multiprocess_driver  # noqa: E402 pylint: disable=g-import-not-at-top
  np.testing.assert_equal(json.loads(probe.read_text()), multiprocess_driver.probe_results())


def test_a_model_axis_across_two_processes_trains_as_one_and_resumes_after_sigterm(
    data, reference, tmp_path):
  workdir = tmp_path / "run"
  # Preempted: SIGTERM on process 1 in the middle of epoch 2; both stop at that step boundary.
  stop_step = STEPS_PER_EPOCH + 1
  runs = _launch(data, workdir, WITH_MODEL_AXIS, processes=2, devices=2,
                 sigterm={"process": 1, "after_step": stop_step})
  assert [rc for rc, _, _ in runs] == [143, 143], runs
  assert f"stopped by SIGTERM in epoch 2 at step {stop_step}" in runs[0][1]
  assert [r["epoch"] for r in _history(workdir)] == [1]
  runs = _launch(data, workdir, WITH_MODEL_AXIS, processes=2, devices=2)
  _ok(runs)
  assert f"resumed from step {stop_step}" in runs[0][1]
  assert "mesh {'data': 2, 'model': 2}" in runs[0][1]
  _assert_agree(_history(workdir), _history(reference))


def test_a_mesh_that_would_mix_up_the_processes_batches_is_refused_before_any_work(data, tmp_path):
  # The case: 2 processes × 2 devices with model=4 leaves data=1, the batch replicated,
  # while each process loads only its half.
  runs = _launch(data, tmp_path / "run", [["data", -1], ["model", 4]], processes=2, devices=2)
  for rc, out, err in runs:
    assert rc == 3, out + err
    assert "config.mesh=(('data', -1), ('model', 2))" in err
    assert "would not assemble into the global batch" in err
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())
