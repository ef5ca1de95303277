"""The job survives what happens to long runs: kills at any point, preemption's SIGTERM, skipped
steps, a damaged checkpoint, a busy workdir and a changed config. Each interrupted run is rerun
with the same command and must end bit-identical to an unbroken one, every report present."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from uad_jax.testing import configs
from uad_jax.testing.faults import nan_images
from uad_jax.training import checkpoint_eval, checkpointing, loop, train_step
from uad_jax.training import workdir as workdirs

DRIVER = pathlib.Path(__file__).with_name("loop_driver.py")
STEPS_PER_EPOCH = 3            # 8 training ids, P=4, K=4: test_the_plan_is_what_the_faults_assume
EPOCHS = 3
NAN_STEP = 2                   # an isolated skipped step, in every run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """One synthetic set for every run here, and one compilation cache for the runs' processes."""
  return tmp_path_factory.mktemp("data")


def _overrides(data):
  return {"dataset.manual_dir": str(data / "raw"), "dataset.data_dir": str(data / "tfds"),
          "dataset.synthetic_ids": 16, "sampler.identities": 4, "sampler.instances": 4,
          "model.image_size": [32, 16], "model.dtype": "float32", "optim.epochs": EPOCHS,
          "eval_every_epochs": 2, "eval_batch_size": 64, "log_every_steps": 2,
          "mesh": [["data", 4], ["model", 2]]}


def _launch(data, workdir, **faults):
  spec = {"workdir": str(workdir), "config": _overrides(data),
          "cache_dir": str(data / "jax_cache"), "dump": str(workdir) + ".npz",
          "nan_steps": [NAN_STEP], **faults}
  path = data / "spec.json"
  path.write_text(json.dumps(spec))
  done = subprocess.run([sys.executable, str(DRIVER), str(path)], capture_output=True,
                        text=True, timeout=600)
  return done.returncode, done.stdout + done.stderr


def _reports(workdir):
  return {name: json.loads((workdir / name / "retrieval.json").read_text())
          for name in sorted(os.listdir(workdir)) if name.startswith("eval_epoch")}


def test_the_plan_is_what_the_faults_assume(data):
  config = configs.with_fields(_overrides(data))
  plan, _, _ = loop.prepared_plan(config, log=lambda *_: None)
  assert list(plan.steps_per_epoch) == [STEPS_PER_EPOCH] * EPOCHS


def test_kills_and_sigterm_at_every_point_then_reruns_end_as_an_unbroken_run(data, tmp_path):
  rc, out = _launch(data, tmp_path / "unbroken")
  assert rc == 0, out
  assert f"step {NAN_STEP}: non-finite loss or gradient" in out
  chain = tmp_path / "chain"
  end1 = STEPS_PER_EPOCH
  faults = [
      ({"sigterm_after_step": 1}, 128 + signal.SIGTERM),         # stops itself, checkpointed
      ({"sigkill_after_step": 2}, -signal.SIGKILL),              # mid-step (the skipped one)
      ({"sigkill_in_save": end1}, -signal.SIGKILL),              # the epoch-1 save in flight
      ({"sigkill_after_epoch": 1}, -signal.SIGKILL),             # between epochs 1 and 2
      ({"sigkill_in_eval": 2}, -signal.SIGKILL),                 # epoch 2's evaluation
      ({"sigkill_in_eval": 3}, -signal.SIGKILL),                 # the final evaluation
  ]
  for fault, status in faults:
    rc, out = _launch(data, chain, **fault)
    assert rc == status, (fault, out)
    if "sigterm_after_step" in fault:
      assert "stopped by SIGTERM in epoch 1 at step 1" in out
      assert "Run the same command again to resume" in out
  rc, out = _launch(data, chain)
  assert rc == 0, out
  assert "epoch 3: its evaluation was interrupted; running it again" in out
  unbroken, resumed = (np.load(str(w) + ".npz") for w in (tmp_path / "unbroken", chain))
  assert sorted(unbroken) == sorted(resumed)
  for name in unbroken:
    np.testing.assert_array_equal(resumed[name], unbroken[name], err_msg=name)
  assert _reports(chain).keys() == _reports(tmp_path / "unbroken").keys() == {
      "eval_epoch002", "eval_epoch003"}
  for name, want in _reports(tmp_path / "unbroken").items():
    got = _reports(chain)[name]
    assert got["protocols"] == want["protocols"], name
  hist = [json.loads((w / "train_history.json").read_text())
          for w in (tmp_path / "unbroken", chain)]
  assert hist[1] == hist[0]
  assert hist[0][0]["skipped_steps"] == 1 and np.isfinite(hist[0][0]["loss/total"])
  lines = [json.loads(l) for l in (chain / "metrics.jsonl").read_text().splitlines()]
  want = [json.loads(l) for l in (tmp_path / "unbroken" / "metrics.jsonl").read_text().splitlines()]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
  assert strip(lines) == strip(want)

  # The latest checkpoint damaged: the run falls back to the one before, with a warning naming
  # it, trains the last epoch again and ends in the same state.
  latest = max(int(p.name) for p in (chain / "checkpoints").iterdir() if p.name.isdigit())
  for f in sorted((chain / "checkpoints" / str(latest)).rglob("*")):
    if f.is_file() and f.stat().st_size > 4096:
      body = bytearray(f.read_bytes())
      middle = len(body) // 2
      body[middle:middle + 64] = bytes(b ^ 0xFF for b in body[middle:middle + 64])
      f.write_bytes(bytes(body))
  os.remove(str(chain) + ".npz")
  rc, out = _launch(data, chain)
  assert rc == 0, out
  assert str(chain / "checkpoints" / str(latest)) in out and "WARNING" in out
  resumed = np.load(str(chain) + ".npz")
  for name in unbroken:
    np.testing.assert_array_equal(resumed[name], unbroken[name], err_msg=name)

  # --mode=eval on the best checkpoint writes the report its epoch's evaluation wrote.
  config = configs.with_fields(_overrides(data))
  best_epoch = max((2, 3), key=lambda e: _reports(chain)[f"eval_epoch{e:03d}"]["protocols"]
                   ["as_reid"]["all→all"]["mAP"])
  checkpoint_eval.evaluate_checkpoint(config, str(chain), "best", log=lambda *_: None)
  got = json.loads((chain / f"eval_step{best_epoch * STEPS_PER_EPOCH:06d}" / "retrieval.json")
                   .read_text())
  assert got["protocols"] == _reports(chain)[f"eval_epoch{best_epoch:03d}"]["protocols"]

  # One run per workdir; a config that changes the trajectory is refused with its fields.
  with workdirs.lock(str(chain), 0):
    with pytest.raises(workdirs.WorkdirBusy, match=str(os.getpid())):
      loop.train_and_evaluate(config, str(chain), log=lambda *_: None)
  with config.unlocked():
    config.optim.lr_per_replica = 0.5
    config.sampler.identities = 3
  with pytest.raises(workdirs.ConfigChanged) as error:
    loop.train_and_evaluate(config, str(chain), log=lambda *_: None)
  assert "optim.lr_per_replica" in str(error.value) and "sampler.identities" in str(error.value)


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    data, tmp_path, monkeypatch):
  config = configs.with_fields({**_overrides(data), "max_nonfinite_steps": 3})
  poisoned = [STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH + 2, STEPS_PER_EPOCH + 3]  # all of epoch 2
  jit_step = train_step.jit_train_step

  def poisoning_jit_step(*args, **kwargs):
    step_fn = jit_step(*args, **kwargs)

    def run(state, batch):
      if int(state.step) + 1 in poisoned:
        batch = nan_images(batch)
      return step_fn(state, batch)
    return run
  monkeypatch.setattr(train_step, "jit_train_step", poisoning_jit_step)
  with pytest.raises(loop.NonFiniteTraining) as error:
    loop.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *_: None)
  message = str(error.value)
  assert f"steps {poisoned[0]}–{poisoned[-1]}: 3 consecutive non-finite steps" in message
  assert f"last good checkpoint is step {STEPS_PER_EPOCH}" in message
  checkpoints = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  try:
    assert checkpoints.all_steps() == [STEPS_PER_EPOCH]
  finally:
    checkpoints.close()
