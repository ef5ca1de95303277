"""The scaling command's files: where each point runs, what a finished point measured, and the
table (Markdown and JSON) and figure (log x) of all of them.

A point is finished when its final evaluation report exists. Its row holds AS-ReID mAP, R1 and
mINP of that report; the train images/s, the median of the loop's logged windows of
``log_every_steps`` steps in metrics.jsonl (the first window, which holds the compilation, left
out); and what the point's own process recorded in ``scaling_point.json`` (peak memory, steps,
wall time), or None where a run finished without it.
"""
import json
import os

import numpy as np

from configs import common
from uad_jax.evaluation import report
from uad_jax.evaluation.protocols import ARROW
from uad_jax.training import history, metric_writers
from uad_jax.training import workdir as workdirs

POINT_FILE = "scaling_point.json"          # what the point's process measured
IDENTITIES_FILE = "train_identities.json"  # the raw ids the point trained on
TABLE_FILE, JSON_FILE, FIGURE_FILE = "scaling.md", "scaling.json", "scaling.png"
METRICS = ("mAP", "R1", "mINP")
STARTING_BACKBONE = "starting backbone (no UAD stage)"
_MIB = 2 ** 20


def point_config(config, count: int):
  """The sweep's config for its run of `count` training identities."""
  return common.replaced(config, {"dataset.train_identities": count})


def start_dir(workdir: str) -> str:
  """Where the backbone every run starts from is evaluated."""
  return os.path.join(workdir, "initial_backbone")


def start_evaluated(workdir: str) -> bool:
  return report.report_complete(start_dir(workdir))


def run_dir(workdir: str, count: int) -> str:
  return os.path.join(workdir, f"ids_{count}")


def final_report_dir(config, workdir: str, count: int) -> str:
  return history.report_dir(run_dir(workdir, count), config.optim.epochs)


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _may_differ(name: str) -> bool:
  return any(name == field or name.startswith(field + ".")
             for field in workdirs.MAY_CHANGE_ON_RESUME)


def finished(config, workdir: str, count: int) -> bool:
  """Whether the run of `count` has its final report; refuses one trained with settings that
  differ from `config`'s (the point's) in a field that changes training, so that a sweep never
  reads back a point of another sweep (another set, seed, model or length) as one of its own."""
  out = run_dir(workdir, count)
  if not report.report_complete(final_report_dir(config, workdir, count)):
    return False
  with open(os.path.join(out, workdirs.CONFIG_FILE), encoding="utf-8") as f:
    recorded = _flat(json.load(f))
  expected = _flat(json.loads(json.dumps(config.to_dict())))
  differ = [f"{name}: {recorded.get(name, 'absent')!r} there, {value!r} here"
            for name, value in expected.items()
            if recorded.get(name, "absent") != value and not _may_differ(name)]
  if differ:
    raise ValueError(f"{out} holds a finished run of other settings, not a point of this sweep "
                     f"({'; '.join(differ)}); use another --workdir or remove it")
  return True


def write_json(path: str, payload) -> None:
  text = json.dumps(payload, indent=1).encode()
  report.write_atomically(path, lambda f: f.write(text))


def train_images_per_s(out_dir: str) -> float | None:
  """Median of the logged windows' train images/s, the first (compilation) left out."""
  path = os.path.join(out_dir, metric_writers.JSONL_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    rates = [line["images_per_s"] for line in map(json.loads, f)
             if line.get("images_per_s") is not None]
  rates = rates[1:] if len(rates) > 1 else rates
  return float(np.median(rates)) if rates else None


def _metrics(cell: dict) -> dict:
  return {"mAP": cell["mAP"], "R1": cell["cmc"][0], "mINP": cell["mINP"]}


def collect(config, workdir: str, identities) -> dict:
  """{"points": [row of each finished point, by count], "reference": chance and raw pixels on
  the (shared) test split, "missing": counts not finished}. `config` is the sweep's."""
  points, missing, reference = [], [], None
  for count in sorted(identities):
    if not finished(point_config(config, count), workdir, count):
      missing.append(count)
      continue
    results = report.read_json(final_report_dir(config, workdir, count))
    measured = {}
    point_path = os.path.join(run_dir(workdir, count), POINT_FILE)
    if os.path.exists(point_path):
      with open(point_path, encoding="utf-8") as f:
        measured = json.load(f)
    points.append({"identities": count,
                   **_metrics(results["protocols"]["as_reid"][f"all{ARROW}all"]),
                   "images_per_s": train_images_per_s(run_dir(workdir, count)),
                   "peak_bytes_per_device": measured.get("peak_bytes_per_device"),
                   "memory_source": measured.get("memory_source"),
                   "steps": measured.get("steps"), "run_s": measured.get("run_s")})
    reference = {"chance": _metrics(results["baselines"]["chance"]),
                 "raw pixels": _metrics(results["baselines"]["raw_pixels"])}
  if reference and start_evaluated(workdir):
    start = report.read_json(start_dir(workdir))["protocols"]["as_reid"][f"all{ARROW}all"]
    reference = {STARTING_BACKBONE: _metrics(start), **reference}
  return {"points": points, "reference": reference, "missing": missing}


def _cell(value, scale=1.0, digits=2) -> str:
  return "n/a" if value is None else f"{value * scale:.{digits}f}"


def format_table(collected: dict, title: str) -> str:
  """Markdown: one row per finished point, metrics in percent; the reference rows' metrics and
  the memory's source below."""
  lines = [title, "", "| train ids | mAP | R1 | mINP | train img/s | peak MiB/device | steps "
           "| run s |", "|---:" * 8 + "|"]
  for p in collected["points"]:
    lines.append(
        f"| {p['identities']} | " + " | ".join(_cell(p[m], 100) for m in METRICS)
        + f" | {_cell(p['images_per_s'], digits=0)} | "
        + f"{_cell(p['peak_bytes_per_device'], 1 / _MIB, 0)} | {_cell(p['steps'], digits=0)} | "
        + f"{_cell(p['run_s'], digits=0)} |")
  lines.append("")
  for label, row in (collected["reference"] or {}).items():
    lines.append(f"- {label}: " + ", ".join(f"{m} {100 * row[m]:.2f}" for m in METRICS))
  sources = sorted({p["memory_source"] for p in collected["points"] if p["memory_source"]})
  lines += [f"- peak memory: {source}" for source in sources]
  if collected["missing"]:
    lines.append(f"- not finished (no final report): {collected['missing']}")
  return "\n".join(lines) + "\n"


def plot(collected: dict, path: str, title: str) -> None:
  """AS-ReID metrics, train images/s and peak memory per device against the training
  identities, log x; the reference rows as dashed lines."""
  # Imported here, through the pyplot-free API: only the figure needs matplotlib.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(13, 4), layout="constrained")
  FigureCanvasAgg(figure)
  figure.suptitle(title, fontsize=9)
  axes = figure.subplots(1, 3)
  points = collected["points"]
  counts = [p["identities"] for p in points]
  reference = collected["reference"] or {}
  for metric, colour in zip(METRICS, ("C0", "C1", "C2")):
    axes[0].plot(counts, [100 * p[metric] for p in points], "o-", color=colour, label=metric)
    for label, style in (("chance", ":"), (STARTING_BACKBONE, "--")):
      if label in reference:
        axes[0].axhline(100 * reference[label][metric], color=colour, ls=style, lw=0.8)
  axes[0].set(ylabel="AS-ReID, %")
  axes[0].set_title("dashed: the starting backbone; dotted: chance", fontsize=8)
  axes[0].legend()
  panels = ((axes[1], "images_per_s", 1.0, "train images/s"),
            (axes[2], "peak_bytes_per_device", 1 / _MIB, "peak memory per device, MiB"))
  for ax, key, scale, label in panels:
    known = [(p["identities"], p[key] * scale) for p in points if p[key] is not None]
    if known:
      ax.plot(*zip(*known), "o-", color="C3")
    ax.set(ylabel=label)
    ax.set_ylim(bottom=0)     # from zero: a few percent of noise must not look like a trend
  for ax in axes:
    ax.set_xscale("log")
    ax.set(xlabel="training identities")
    ax.grid(True, which="both", alpha=0.3)
    if counts:
      ax.set_xlim(min(counts) / 1.5, max(counts) * 1.5)
  report.write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=110))


def write(collected: dict, workdir: str, title: str) -> str:
  """scaling.md, scaling.json and scaling.png in `workdir`; returns the table."""
  table = format_table(collected, title)
  report.write_atomically(os.path.join(workdir, TABLE_FILE), lambda f: f.write(table.encode()))
  write_json(os.path.join(workdir, JSON_FILE), {"title": title, **collected})
  plot(collected, os.path.join(workdir, FIGURE_FILE), title)
  return table
