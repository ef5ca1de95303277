"""A run's record in its workdir, beside the checkpoints: the per-epoch means of the step metrics
(train_history.json), the evaluation reports (eval_epochNNN/), and train_curves.png drawn from
both; and the one console line of an epoch.

Files are rewritten whole and atomically after each epoch, so a resumed run (which keeps the
epochs up to its checkpoint) plots its whole history, and a reader never sees half a file.
"""
import json
import os

from uad_jax.evaluation import report
from uad_jax.training import optim

HISTORY_FILE = "train_history.json"
CURVES_FILE = "train_curves.png"


def report_dir(workdir: str, epoch: int) -> str:
  return os.path.join(workdir, f"eval_epoch{epoch:03d}")


def load(workdir: str, completed_epochs: int) -> list[dict]:
  """The recorded epochs up to `completed_epochs` (a resumed run's checkpoint); [] if none."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not completed_epochs or not os.path.exists(path):
    return []
  with open(path) as f:
    return [h for h in json.load(f) if h["epoch"] <= completed_epochs]


def save(workdir: str, history: list[dict]) -> None:
  text = json.dumps(history, indent=1).encode()
  report.write_atomically(os.path.join(workdir, HISTORY_FILE), lambda f: f.write(text))


def epoch_means(steps: list[dict]) -> dict:
  """The epoch's means of the step metrics over its finite steps (skipped ones changed nothing
  and their losses are non-finite), and how many steps it skipped."""
  kept = [m for m in steps if not m["nonfinite"]]
  means = {k: (sum(m[k] for m in kept) / len(kept) if kept else float("nan"))
           for k in steps[0] if k != "nonfinite"}
  return {**means, "skipped_steps": len(steps) - len(kept)}


def evaluations(workdir: str, history: list[dict]) -> dict[int, dict]:
  """{epoch: report} of the evaluations completed so far for the epochs of `history`."""
  found = {}
  for epoch in (h["epoch"] for h in history):
    if report.report_complete(report_dir(workdir, epoch)):
      found[epoch] = report.read_json(report_dir(workdir, epoch))
  return found


def draw_curves(workdir: str, history: list[dict]) -> None:
  report.plot_train_curves(history, evaluations(workdir, history),
                           os.path.join(workdir, CURVES_FILE))


def epoch_line(epoch: int, epochs: int, means: dict, steps: int, images_per_s: float) -> str:
  """The epoch's console line from its means of the step metrics, e.g.
  epoch 3/120: loss 7.49 (ce 3.4, wrt 0.68, proca 0.00038, gpd 3.43), id acc 6.8%, grad norm 2.66,
  lr 0.00118; 35 steps, 1610 img/s
  """
  terms = [k for k in report.LOSS_ORDER if k in means and k != "loss/total"]
  terms += sorted(k for k in means if k.startswith("loss/") and k not in report.LOSS_ORDER)
  parts = [f"loss {means['loss/total']:.4g} ("
           + ", ".join(f"{k.removeprefix('loss/')} {means[k]:.4g}" for k in terms) + ")"]
  if "id_accuracy" in means:
    parts.append(f"id acc {100 * means['id_accuracy']:.1f}%")
  if "grad_norm" in means:
    parts.append(f"grad norm {means['grad_norm']:.3g}")
  if f"lr/{optim.WEIGHT}" in means:  # the bias LR is a fixed multiple of it
    parts.append(f"lr {means[f'lr/{optim.WEIGHT}']:.3g}")
  return (f"epoch {epoch}/{epochs}: " + ", ".join(parts)
          + f"; {steps} steps, {images_per_s:.0f} img/s")
