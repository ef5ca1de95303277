"""Outputs of `protocols.evaluate_protocols`: a headline, a text table, a JSON file, PNG figures;
and the training curves of a run.

Files are written atomically (a temporary file in the same folder, then a rename), so a reader
never sees half a file. matplotlib is imported only by the figure functions, through its
pyplot-free Figure API on the Agg canvas: no global backend switch, no display needed.
"""
import json
import math
import os
import pathlib
import tempfile
from typing import Callable

import numpy as np

from uad_jax.evaluation.protocols import ARROW, MODALITIES, SCENARIOS

REPORTED_RANKS = (1, 5, 10)
# Loss metrics of a train step in the order the recipe adds them; any other "loss/…" follows.
LOSS_ORDER = ("loss/total", "loss/ce", "loss/wrt", "loss/proca", "loss/gpd")
CMC_CURVES = (("as_reid", f"all{ARROW}all"), ("viewpoint", f"aerial{ARROW}ground"),
              ("viewpoint", f"ground{ARROW}aerial"))
# Read once at import: os.umask can only be read by setting it, which other threads would see.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def mode_label(results: dict) -> str:
  top_k = results["truncated_top_k"]
  mode = "exact" if top_k is None else f"TRUNCATED top-{top_k} (AP ≤ exact)"
  return f"{mode}, camera rule {results['camera_rule']}"


def format_table(results: dict) -> str:
  """mAP, R1, R5, R10 and mINP as percentages, one row per protocol cell, then the baselines."""
  header = (f"{'protocol':<15}{'cell':<27}{'mAP':>7}" +
            "".join(f"{f'R{r}':>7}" for r in REPORTED_RANKS) + f"{'mINP':>7}{'queries':>15}")
  lines = [f"Retrieval metrics ({mode_label(results)})", header, "-" * len(header)]
  rows = [(protocol, cell, m) for protocol, cells in results["protocols"].items()
          for cell, m in cells.items()]
  rows += [("baseline", name, m) for name, m in _baseline_rows(results)]
  for protocol, cell, m in rows:
    ranks = [m["cmc"][r - 1] if r <= len(m["cmc"]) else math.nan for r in REPORTED_RANKS]
    values = "".join(_percent(v) for v in [m["mAP"], *ranks, m["mINP"]])
    counts = f"{m['num_valid_queries']}/{m['num_queries']}"
    lines.append(f"{protocol:<15}{cell:<27}{values}{counts:>15}")
  return "\n".join(lines)


def _baseline_rows(results: dict) -> list:
  """[(row name, AS-ReID metrics)] of the baselines the results hold (inference adds them)."""
  found = results.get("baselines") or {}
  rows = []
  if "chance" in found:
    rows.append(("chance", found["chance"]))
  if "raw_pixels" in found:
    height, width = found["raw_pixels"]["grid"]
    rows.append((f"raw pixels {height}×{width}", found["raw_pixels"]))
  return rows


def as_reid(results: dict) -> dict:
  """The headline cell: any-scenario queries against the whole gallery."""
  return results["protocols"]["as_reid"][f"all{ARROW}all"]


def format_headline(results: dict) -> str:
  """AS-ReID mAP / R1 / mINP (%), beside the same numbers for chance and raw pixels if known."""
  def three(m):
    return "/".join(_percent(v).strip() for v in (m["mAP"], m["cmc"][0], m["mINP"]))

  line = f"AS-ReID mAP/R1/mINP {three(as_reid(results))} %"
  rows = _baseline_rows(results)
  if rows:
    line += " (" + ", ".join(f"{name} {three(m)}" for name, m in rows) + ")"
  return line


def _percent(value) -> str:
  return f"{'n/a':>7}" if math.isnan(value) else f"{100 * value:7.2f}"


def to_json_ready(value):
  """NumPy values as Python ones; NaN as None (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {key: to_json_ready(v) for key, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [to_json_ready(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return None if math.isnan(value) else float(value)
  return value


def write_json(results: dict, path) -> pathlib.Path:
  payload = {"mode": mode_label(results), **to_json_ready(results)}
  text = json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False)
  return write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_atomically(path, write: Callable) -> pathlib.Path:
  """write(binary file) into a temporary file next to `path`, then rename it to `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False) as tmp:
    try:
      write(tmp)
      tmp.flush()
      # mkstemp makes the file 0600; a report is as readable as any file the user writes.
      os.fchmod(tmp.fileno(), 0o666 & ~_UMASK)
      os.fsync(tmp.fileno())
    except BaseException:
      tmp.close()
      os.unlink(tmp.name)
      raise
  os.replace(tmp.name, path)
  return path


def _new_figure(size):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _save_png(figure, path) -> pathlib.Path:
  return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=120))


def plot_cmc(results: dict, path) -> pathlib.Path:
  """CMC curves of AS-ReID, the AG-ReID directions and the cross-spectral pairs."""
  figure = _new_figure((7, 4.5))
  axes = figure.add_subplot()
  cross_spectral = results["protocols"]["cross_spectral"]
  curves = list(CMC_CURVES) + [("cross_spectral", cell) for cell in cross_spectral]
  for protocol, cell in curves:
    cmc = np.asarray(results["protocols"][protocol][cell]["cmc"], float)
    axes.plot(np.arange(1, len(cmc) + 1), 100 * cmc, label=cell,
              linewidth=2.5 if protocol == "as_reid" else 1.2,
              linestyle=":" if protocol == "cross_spectral" else "-")
  axes.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100),
           title=f"CMC ({mode_label(results)})")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7, ncol=2)
  return _save_png(figure, path)


def plot_matrix(results: dict, protocol: str, names, path) -> pathlib.Path:
  """Heat map of a query × gallery protocol matrix: mAP, annotated with mAP / R1 (%)."""
  cells = results["protocols"][protocol]
  mean_ap = np.array([[cells[f"{q}{ARROW}{g}"]["mAP"] for g in names] for q in names], float)
  rank1 = np.array([[cells[f"{q}{ARROW}{g}"]["cmc"][0] for g in names] for q in names], float)
  figure = _new_figure((1.2 * len(names) + 2.5, 1.0 * len(names) + 1.5))
  axes = figure.add_subplot()
  image = axes.imshow(100 * mean_ap, cmap="viridis", vmin=0,
                      vmax=max(1.0, 100 * np.nanmax(mean_ap, initial=0.01)))
  bright = 0.6 * image.norm.vmax
  for (i, j), value in np.ndenumerate(mean_ap):
    label = "n/a" if math.isnan(value) else f"{100 * value:.1f}\n{100 * rank1[i, j]:.1f}"
    axes.text(j, i, label, ha="center", va="center", fontsize=7,
              color="black" if 100 * value > bright else "white")
  axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
  axes.set_yticks(range(len(names)), names)
  axes.set(xlabel="gallery", ylabel="query",
           title=f"{protocol}: mAP / R1 (%)\n{mode_label(results)}")
  figure.colorbar(image, ax=axes, label="mAP (%)")
  return _save_png(figure, path)


def report_complete(out_dir, prefix: str = "retrieval") -> bool:
  """Whether `write_report` finished in out_dir: its JSON is written last."""
  return (pathlib.Path(out_dir) / f"{prefix}.json").exists()


def read_json(out_dir, prefix: str = "retrieval") -> dict:
  """The results `write_report` wrote to out_dir (NaN written as None)."""
  with open(pathlib.Path(out_dir) / f"{prefix}.json", encoding="utf-8") as f:
    return json.load(f)


def write_report(results: dict, out_dir, prefix: str = "retrieval",
                 print_table: bool = True) -> dict:
  """Prints the table; writes the figures and the table, then the JSON, to out_dir.

  → {"table": the table's text, "table_file", "cmc", "modality", "scenario", "json": paths}.
  """
  out_dir = pathlib.Path(out_dir)
  if results["truncated_top_k"] is not None:
    prefix = f"{prefix}_truncated_top{results['truncated_top_k']}"
  table = format_table(results)
  if print_table:
    print(table)
  written = {
      "table": table,
      "cmc": plot_cmc(results, out_dir / f"{prefix}_cmc.png"),
      "modality": plot_matrix(results, "modality", MODALITIES, out_dir / f"{prefix}_modality.png"),
      "scenario": plot_matrix(results, "scenario", SCENARIOS, out_dir / f"{prefix}_scenario.png"),
  }
  written["table_file"] = write_atomically(out_dir / f"{prefix}.txt",
                                           lambda f: f.write((table + "\n").encode("utf-8")))
  # The JSON goes last: its presence says the whole report was written.
  written["json"] = write_json(results, out_dir / f"{prefix}.json")
  return written


def plot_train_curves(history: list, evaluations: dict, path) -> pathlib.Path:
  """Every loss term, ID accuracy and the gradient norm per epoch, and the evaluated AS-ReID
  mAP / R1 beside the chance and raw-pixel levels.

  history: [{"epoch", metric: epoch mean}] (train_history.json); evaluations: {epoch: results}
  of the evaluations done so far (`write_report`'s JSON, or `evaluate_protocols` results).
  """
  from matplotlib.ticker import MaxNLocator
  losses = {k for h in history for k in h if k.startswith("loss/")}
  names = [k for k in LOSS_ORDER if k in losses] + sorted(losses - set(LOSS_ORDER))
  names += [k for k in ("id_accuracy", "grad_norm") if any(k in h for h in history)]
  columns = 4
  rows = len(names) // columns + 1  # and one panel for retrieval
  figure = _new_figure((3.2 * columns, 2.6 * rows))
  panels = figure.subplots(rows, columns, squeeze=False, sharex=True).ravel()
  for axes, name in zip(panels, names):
    points = [(h["epoch"], h[name]) for h in history if h.get(name) is not None]
    axes.plot(*zip(*points), marker="o", markersize=3)
    axes.set(title=name)
  _plot_retrieval(panels[len(names)], evaluations)
  for axes in panels[:len(names) + 1]:
    axes.set(xlabel="epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.xaxis.set_tick_params(labelbottom=True)
    axes.grid(alpha=0.3)
  for axes in panels[len(names) + 1:]:
    axes.set_axis_off()
  return _save_png(figure, path)


def _plot_retrieval(axes, evaluations: dict):
  axes.set(title="AS-ReID (%)")
  if not evaluations:
    axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=axes.transAxes)
    return
  epochs = sorted(evaluations)
  cells = [evaluations[e]["protocols"]["as_reid"][f"all{ARROW}all"] for e in epochs]
  percent = lambda v: math.nan if v is None else 100 * v  # JSON writes NaN as null
  drawn = []
  for color, label, values in (("C0", "mAP", [c["mAP"] for c in cells]),
                               ("C1", "R1", [c["cmc"][0] for c in cells])):
    values = [percent(v) for v in values]
    axes.plot(epochs, values, color=color, marker="o", markersize=3, label=label)
    drawn += values
  # The latest evaluation's baselines, one flat line each: they do not depend on the model.
  for (name, m), style in zip(_baseline_rows(evaluations[epochs[-1]]), ("--", ":")):
    for color, value in (("C0", percent(m["mAP"])), ("C1", percent(m["cmc"][0]))):
      axes.axhline(value, color=color, linestyle=style, linewidth=1)
      drawn.append(value)
    axes.plot([], [], color="gray", linestyle=style, label=name)
  axes.set_ylim(0, min(100, 1.15 * np.nanmax(drawn, initial=1)))
  axes.legend(fontsize=7)
