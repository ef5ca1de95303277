"""Outputs of `protocols.evaluate_protocols`: a text table, a JSON file, PNG figures.

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
CMC_CURVES = (("as_reid", f"all{ARROW}all"), ("viewpoint", f"aerial{ARROW}ground"),
              ("viewpoint", f"ground{ARROW}aerial"))


def mode_label(results: dict) -> str:
  top_k = results["truncated_top_k"]
  mode = "exact" if top_k is None else f"TRUNCATED top-{top_k} (AP ≤ exact)"
  return f"{mode}, camera rule {results['camera_rule']}"


def format_table(results: dict) -> str:
  """mAP, R1, R5, R10 and mINP as percentages, one row per protocol cell."""
  header = (f"{'protocol':<15}{'cell':<27}{'mAP':>7}" +
            "".join(f"{f'R{r}':>7}" for r in REPORTED_RANKS) + f"{'mINP':>7}{'queries':>15}")
  lines = [f"Retrieval metrics ({mode_label(results)})", header, "-" * len(header)]
  for protocol, cells in results["protocols"].items():
    for cell, m in cells.items():
      ranks = [m["cmc"][r - 1] if r <= len(m["cmc"]) else math.nan for r in REPORTED_RANKS]
      values = "".join(_percent(v) for v in [m["mAP"], *ranks, m["mINP"]])
      counts = f"{m['num_valid_queries']}/{m['num_queries']}"
      lines.append(f"{protocol:<15}{cell:<27}{values}{counts:>15}")
  return "\n".join(lines)


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


def write_report(results: dict, out_dir, prefix: str = "retrieval",
                 print_table: bool = True) -> dict:
  """Prints the table; writes the figures, then the JSON, to out_dir. → {"table", "json", …}."""
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
  # The JSON goes last: its presence says the whole report was written.
  written["json"] = write_json(results, out_dir / f"{prefix}.json")
  return written
