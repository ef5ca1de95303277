"""``--mode=eval``: every evaluation protocol for one checkpoint of a run's workdir.

The checkpoint is chosen as ``latest``, ``best`` (by AS-ReID mAP among the evaluated ones) or a
step number; its reports (the same table, JSON and figures as in training) go to
``workdir/eval_stepNNNNNN/``. The run's own config is what trained it, so the workdir's recorded
config must agree with the given one on every field that shapes the model (``training.workdir``).
"""
import dataclasses
import os

import jax

from uad_jax import console, sharding
from uad_jax.data import input_pipeline
from uad_jax.evaluation import inference, report
from uad_jax.training import checkpointing, config_checks, loop, train_state
from uad_jax.training import workdir as workdirs

CHOICES = ("latest", "best")


def report_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, f"eval_step{step:06d}")


def choose_step(checkpoints: checkpointing.Checkpointer, which: str) -> int:
  """The step named by `which`: latest, best or a number among the checkpoints kept."""
  steps = checkpoints.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
  if which == "latest":
    return max(steps)
  if which == "best":
    best = checkpoints.best_step()
    if best is None:
      raise ValueError(f"no checkpoint in {checkpoints.directory} has been evaluated yet, so "
                       "none is best; use --checkpoint=latest or a step")
    return best
  if not which.isdigit() or int(which) not in steps:
    raise ValueError(f"--checkpoint={which!r}: expected latest, best or one of the steps "
                     f"kept in {checkpoints.directory}: {sorted(steps)}")
  return int(which)


def evaluate_checkpoint(config, workdir: str, which: str = "latest", log=print) -> dict:
  """Restores checkpoint `which` of `workdir`, evaluates it and writes its reports."""
  config_checks.check(config)
  bars = console.bars_enabled(log)
  log = console.for_this_process(log)
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           keep=config.keep_checkpoints)
  try:
    step = choose_step(checkpoints, which)
    workdirs.record_config(workdir, config, resuming=True)
    plan, num_classes, mesh = loop.prepared_plan(config, log)
    target, _ = train_state.create_train_state(config, num_classes, plan.steps_per_epoch, mesh,
                                               abstract_only=True)
    state = checkpoints.restore(target, step).state
  finally:
    checkpoints.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out_dir = report_dir(workdir, step)
  results = inference.evaluate_model(state.model, variables, config, mesh, out_dir,
                                     f"step {step}", log, progress=bars)
  return results


def evaluate_initial_state(config, out_dir: str, log=print) -> dict:
  """AS-ReID of the state a run of `config` starts from (its pretrained backbone, an untrained
  head): what the ablation's and the scaling sweep's runs must improve on. Read back when its
  report exists."""
  if report.report_complete(out_dir):
    return report.read_json(out_dir)
  plan = input_pipeline.train_plan_from_config(config, missing_modality=config.missing_modality)
  mesh = sharding.make_mesh(config.mesh)
  state, _ = train_state.create_train_state(config, config.num_classes or plan.num_classes,
                                            plan.steps_per_epoch, mesh, log=None)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return inference.evaluate_model(state.model, variables, config, mesh, out_dir,
                                  "starting backbone, before the UAD stage", log)


@dataclasses.dataclass(frozen=True)
class InferenceModel:
  """A trained model restored for inference: what the retrieval tools and the export need."""
  config: object      # the run's recorded config
  model: object       # the UADNet module
  variables: dict     # {"params", "batch_stats"}
  mesh: object        # a data-parallel mesh over this process's devices
  step: int
  workdir: str

  def forward(self, batch_size: int) -> inference.ImageForward:
    return inference.ImageForward(self.model, self.variables, self.mesh,
                                  self.config.sharding_rules, batch_size)

  def describe(self) -> dict:
    """Where the model came from, for features files and exports (JSON-ready)."""
    return {"workdir": os.path.abspath(self.workdir), "step": self.step,
            "preset": self.config.preset, "variant": self.config.model.variant,
            "stem": self.config.model.stem, "image_size": list(self.config.model.image_size),
            "features": "pre-BN global feature (the evaluation's)"}


def load_for_inference(workdir: str, which: str = "latest") -> InferenceModel:
  """Checkpoint `which` (latest, best or a step) of a training run's workdir, with the run's
  recorded config; the dataset is not needed (the classifier's width comes from the checkpoint).
  """
  config = workdirs.read_config(workdir)
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           keep=config.keep_checkpoints)
  try:
    step = choose_step(checkpoints, which)
    shapes = checkpoints.array_shapes(step)
    num_classes = shapes["params.classifier.kernel"][-1]
    # One process's devices, data parallel: inference needs no model axis, and a run trained on
    # a pod is used on a workstation.
    mesh = sharding.make_mesh((("data", -1), ("model", 1)), jax.local_devices())
    target, _ = train_state.create_train_state(config, num_classes, 1, mesh, abstract_only=True)
    state = checkpoints.restore(target, step).state
  finally:
    checkpoints.close()
  return InferenceModel(config, state.model, {"params": state.params,
                                              "batch_stats": state.batch_stats},
                        mesh, step, workdir)
