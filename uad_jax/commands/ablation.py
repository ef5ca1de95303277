"""The paper's loss ablation (Base, +ProCA, +GPD, UAD) on one dataset, as one command.

  python -m uad_jax.commands.ablation --config=configs/uad.py:synthetic --workdir=workdir/ablation

Trains the four loss variants of ``config`` one after another, each in ``workdir/<variant>`` (a
run that was interrupted resumes, a finished one is only read back), all from the same
initialisation (the pretrained backbone, made once when the config asks for the pretraining
stage), and writes ``workdir/ablation.md`` and ``ablation.json``: AS-ReID mAP, R1, R5, R10 and
mINP of each variant's final evaluation, beside the rows it must beat: chance, raw pixels, and
the starting backbone evaluated without the UAD stage.
"""
import json
import os

from absl import app
from absl import flags
import jax

from configs import common
from uad_jax.commands import common_flags
from uad_jax import console
from uad_jax.evaluation import baselines, report
from uad_jax.training import checkpoint_eval, config_checks, history, loop, pretrain

VARIANTS = (("base", "Base (CE + WRT)"), ("base+proca", "+ ProCA"), ("base+gpd", "+ GPD"),
            ("uad", "UAD (+ ProCA + GPD)"))
COLUMNS = ("mAP", "R1", "R5", "R10", "mINP")

_LOSSES = flags.DEFINE_list("losses", [loss for loss, _ in VARIANTS],
                            "The loss variants to train, of base, base+proca, base+gpd, uad.")


def _row(metrics: dict) -> dict:
  cmc = metrics["cmc"]
  return {"mAP": metrics["mAP"], "R1": cmc[0], "R5": cmc[4], "R10": cmc[9],
          "mINP": metrics["mINP"]}


def run_ablation(config, workdir: str, log=print, losses=tuple(loss for loss, _ in VARIANTS)
                 ) -> dict:
  """Trains (or reads back) the variants of `losses` (all four by default); returns and writes
  the table."""
  unknown = set(losses) - {loss for loss, _ in VARIANTS}
  if unknown or not losses:
    raise config_checks.ConfigError(f"ablation losses {list(losses)}: expected one or more of "
                     f"{[loss for loss, _ in VARIANTS]}")
  config_checks.check(config)
  config = pretrain.with_pretrained_backbone(config, log)
  rows, results = {}, None
  for loss, label in (v for v in VARIANTS if v[0] in losses):
    run_dir = os.path.join(workdir, loss.replace("+", "_"))
    log(f"ablation: {label} in {run_dir}")
    loop.train_and_evaluate(common.replaced(config, {"loss.name": loss}), run_dir, log)
    results = report.read_json(history.report_dir(run_dir, config.optim.epochs))
    rows[label] = _row(results["protocols"]["as_reid"]["all→all"])
  start = checkpoint_eval.evaluate_initial_state(
      config, os.path.join(workdir, "initial_backbone"), log)
  reference = {"starting backbone (no UAD stage)": _row(start["protocols"]["as_reid"]["all→all"]),
               "chance": _row(results["baselines"]["chance"]),
               baselines.PIXELS_LABEL: _row(results["baselines"]["raw_pixels"])}
  table = format_table(rows, reference, config)
  if jax.process_index() == 0:
    text = table.encode()
    report.write_atomically(os.path.join(workdir, "ablation.md"), lambda f: f.write(text))
    blob = json.dumps({"variants": rows, "reference_rows": reference}, indent=1).encode()
    report.write_atomically(os.path.join(workdir, "ablation.json"), lambda f: f.write(blob))
  log(table)
  return {"variants": rows, "reference_rows": reference}


def format_table(rows: dict, reference: dict, config) -> str:
  """A Markdown table in percent, the variants first, then the reference rows."""
  data = (f"synthetic {config.dataset.synthetic_ids} ids, {config.dataset.synthetic_difficulty}"
          if config.dataset.synthetic_ids else config.dataset.config)
  lines = [f"AS-ReID (%) on {data}, camera rule {config.camera_rule}, "
           f"{config.optim.epochs} epochs, {config.model.variant} {config.model.stem} stem",
           "", "| loss | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for label, row in list(rows.items()) + list(reference.items()):
    lines.append(f"| {label} | " + " | ".join(f"{100 * row[c]:.2f}" for c in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.quiet_libraries_unless_asked()
  try:
    run_ablation(common_flags.CONFIG.value, common_flags.workdir("workdir/ablation"),
                 losses=tuple(_LOSSES.value))
  except config_checks.ConfigError as e:  # the flags' fault: absl shows the usage, no traceback
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
