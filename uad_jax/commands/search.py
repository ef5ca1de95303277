"""Searches a gallery for query images: top-k lists with distances, and rank-list figures.

  python -m uad_jax.commands.search --workdir=workdir/synthetic --query=test --gallery=test \\
      --out=workdir/synthetic/search --worst=6 --sample=6
  python -m uad_jax.commands.search --export=exports/uad --query=probe/ --gallery=gallery.npz \\
      --out=search/ --top_k=10 --rerank=reference

``--query`` and ``--gallery`` each take a features file (``python -m uad_jax.commands.embed``), a
folder of images (embedded with the model of ``--workdir``/``--checkpoint`` or ``--export``), or
``test``: the dataset's own query split (for ``--query``) or gallery (``--gallery``), read from the
raw WHU-MARS folders of the run's config. Distances are the evaluation's, or with ``--rerank``
the exact k-reciprocal re-ranked ones (reference: k1=50, k2=15, λ=0.3; paper: 20, 6, 0.3).

Writes to ``--out``: ``ranks.csv`` (every query's top-k: gallery file, distance, true match
yes/no/unknown), ``queries.csv`` (per query: labels, AP and first true match where identities are
known) and figures: ``rank_lists_chosen.png`` (``--show``), ``rank_lists_sample.png``
(``--sample`` random queries), ``rank_lists_worst.png`` (``--worst``: lowest AP first) and
``rank_summary.png`` (where true matches rank, per query and gallery scenario). Prints the top-k
of the queries in the figures.
"""
import csv
import functools
import io
import os

from absl import app
from absl import flags
import numpy as np

from uad_jax import console
from uad_jax.commands import common_flags, model_source
from uad_jax.data import augment, prepare
from uad_jax.evaluation import features_file, metrics, protocols, rank_lists, reranking, report
from uad_jax.evaluation import search
from uad_jax.training import workdir as workdirs

TEST = "test"
RERANK = {"none": None, "reference": reranking.REFERENCE_SETTINGS,
          "paper": reranking.PAPER_SETTINGS}

_QUERY = flags.DEFINE_string("query", None, "Features file (.npz), image folder, or 'test'.")
_GALLERY = flags.DEFINE_string("gallery", None, "Features file (.npz), image folder, or 'test'.")
_OUT = flags.DEFINE_string("out", None, "Folder for ranks.csv, queries.csv and the figures.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Gallery items listed per query.", lower_bound=1)
_RERANK = flags.DEFINE_enum("rerank", "none", list(RERANK), "k-reciprocal re-ranking settings.")
_CAMERA_RULE = flags.DEFINE_enum("camera_rule", "sysu", list(metrics.CAMERA_RULES),
                                 "Gallery items removed per query where cameras are known, as "
                                 "in the evaluation.")
_SHOW = flags.DEFINE_list("show", [], "Queries to draw: paths relative to the query folder, or "
                          "file names.")
_SAMPLE = flags.DEFINE_integer("sample", 6, "Random queries to draw.", lower_bound=0)
_WORST = flags.DEFINE_integer("worst", 6, "Lowest-AP queries to draw (needs identities).",
                              lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random sample.")
_FIGURE_K = flags.DEFINE_integer("figure_k", 10, "Hits per query drawn in the rank lists.",
                                 lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _QUERY.value or not _GALLERY.value or not _OUT.value:
    raise app.UsageError("--query, --gallery and --out are required")
  console.quiet_libraries_unless_asked()
  model_source.exit_on_bad_input(_run)


def _run(log=print):
  query, gallery = _features(_QUERY.value, "query", log), _features(_GALLERY.value, "gallery", log)
  shown = _chosen_rows(query, _SHOW.value)  # a wrong name fails before the search
  settings = RERANK[_RERANK.value]
  ranking = search.rank(query, gallery, top_k=_TOP_K.value, camera_rule=_CAMERA_RULE.value,
                        rerank=settings)
  os.makedirs(_OUT.value, exist_ok=True)
  _write_csvs(query, gallery, ranking, _OUT.value)
  how = "re-ranked " + _RERANK.value if settings else "feature distances"
  summary = (f"{len(query)} queries x {len(gallery)} gallery ({how}, camera rule "
             f"{ranking.camera_rule})")
  if ranking.labelled:
    valid = ~np.isnan(ranking.ap)
    first = ranking.first_match[valid]
    summary += (f": mAP {100 * np.mean(ranking.ap[valid]):.2f} %, R1 "
                f"{100 * np.mean(first == 1):.2f} % over {valid.sum()} queries with a true match")
  log(summary)
  groups = {"chosen": shown}
  if _SAMPLE.value:
    rng = np.random.default_rng(_SEED.value)
    groups["sample"] = np.sort(rng.choice(len(query), min(_SAMPLE.value, len(query)),
                                          replace=False))
  if _WORST.value and ranking.labelled:
    order = np.argsort(np.where(np.isnan(ranking.ap), np.inf, ranking.ap), kind="stable")
    valid = int((~np.isnan(ranking.ap)).sum())
    groups["worst"] = order[:min(_WORST.value, valid)]
  elif _WORST.value:
    log("--worst needs identities and cameras on both sides (WHU-MARS file names); skipped")
  for name, rows in groups.items():
    if len(rows):
      path = rank_lists.draw_rank_lists(
          [_rank_row(query, gallery, ranking, int(q)) for q in rows],
          os.path.join(_OUT.value, f"rank_lists_{name}.png"),
          title=f"{name} queries: top {_FIGURE_K.value} of {len(gallery)} ({how})")
      log(f"\n{name} queries ({path}):\n" + _format_lists(query, gallery, ranking, rows))
  if ranking.labelled and _scenarios_known(query, gallery):
    path = _draw_summary(query, gallery, ranking, os.path.join(_OUT.value, "rank_summary.png"))
    log(f"where true matches rank: {path}")
  log(f"all top-{ranking.top_index.shape[1]} lists: {os.path.join(_OUT.value, 'ranks.csv')}")


def _features(source: str, split: str, log) -> features_file.FeatureSet:
  if source.endswith(".npz"):
    return features_file.read(source)
  folder = source
  if source == TEST:
    config = (workdirs.read_config(common_flags.WORKDIR.value) if common_flags.WORKDIR.value
              else common_flags.CONFIG.value)
    folder = prepare.raw_split_folder(config, split)
  images = model_source.scan(folder)
  return _embedder().embed(images, log)


@functools.cache
def _embedder() -> model_source.Embedder:
  """The model, loaded once, and only if a side is a folder."""
  return model_source.Embedder()


def _chosen_rows(query: features_file.FeatureSet, names) -> np.ndarray:
  rows = []
  for name in names:
    hits = [i for i, p in enumerate(query.paths) if p == name or os.path.basename(p) == name]
    if not hits:
      raise ValueError(f"--show: no query image {name!r} under {query.root}")
    rows.extend(hits)
  return np.array(rows, np.int64)


def _scenarios_known(*sides) -> bool:
  return all((s.modalities >= 0).all() and (s.viewpoints >= 0).all() for s in sides)


def _label(side: features_file.FeatureSet, row: int) -> dict:
  def name(values, names):
    return names[values[row]] if values[row] >= 0 else None
  return {"identity": int(side.person_ids[row]) if side.person_ids[row] >= 0 else None,
          "modality": name(side.modalities, protocols.MODALITIES),
          "viewpoint": name(side.viewpoints, protocols.VIEWPOINTS),
          "camera": int(side.cameras[row]) + 1 if side.cameras[row] >= 0 else None,
          "file": side.paths[row]}


def _verdict(query, gallery, ranking, q, g):
  if not ranking.labelled:
    return None
  return bool(query.person_ids[q] == gallery.person_ids[g])


def _rank_row(query, gallery, ranking, q: int) -> rank_lists.RankedQuery:
  hits = []
  for g, d in zip(ranking.top_index[q, :_FIGURE_K.value], ranking.top_dist[q, :_FIGURE_K.value]):
    if g < 0:
      break
    hits.append(rank_lists.Hit(_crop(gallery, g), float(d),
                               _verdict(query, gallery, ranking, q, g)))
  first = int(ranking.first_match[q]) if ranking.labelled else 0
  return rank_lists.RankedQuery(_crop(query, q), hits, first_match_rank=first or None,
                                average_precision=None if np.isnan(ranking.ap[q])
                                else float(ranking.ap[q]))


def _crop(side: features_file.FeatureSet, row: int) -> rank_lists.Crop:
  """The image at its own size (the figure fits it), with its labels."""
  label = _label(side, row)
  with open(side.file(row), "rb") as f:
    image = np.asarray(augment.to_rgb_image(f.read()))
  return rank_lists.Crop(image, identity=label["identity"], modality=label["modality"],
                         viewpoint=label["viewpoint"], camera=label["camera"],
                         file_name=os.path.basename(label["file"]))


def _format_lists(query, gallery, ranking, rows) -> str:
  lines = []
  for q in rows:
    label = _label(query, q)
    head = f"{query.paths[q]} ({_scenario_text(label)}, id {_text(label['identity'])})"
    if ranking.labelled:
      ap = ranking.ap[q]
      head += (f": AP {100 * ap:.1f} %, first true match at rank {ranking.first_match[q]}"
               if not np.isnan(ap) else ": no true match in the gallery")
    lines.append(head)
    for r, (g, d) in enumerate(zip(ranking.top_index[q], ranking.top_dist[q]), 1):
      if g < 0:
        break
      mark = {True: "✓", False: "✗", None: " "}[_verdict(query, gallery, ranking, q, g)]
      g_label = _label(gallery, g)
      lines.append(f"  {r:3d} {mark} {d:8.4f}  {gallery.paths[g]} ({_scenario_text(g_label)})")
  return "\n".join(lines)


def _scenario_text(label: dict) -> str:
  return f"{_text(label['modality'])}·{_text(label['viewpoint'])}"


def _text(value) -> str:
  return "?" if value is None else str(value)


def _write_csvs(query, gallery, ranking, out_dir: str) -> None:
  ranks = io.StringIO()
  writer = csv.writer(ranks)
  writer.writerow(["query", "rank", "gallery", "distance", "true_match"])
  for q in range(len(query)):
    for r, (g, d) in enumerate(zip(ranking.top_index[q], ranking.top_dist[q]), 1):
      if g < 0:
        break
      verdict = _verdict(query, gallery, ranking, q, g)
      writer.writerow([query.paths[q], r, gallery.paths[g], f"{d:.6g}",
                       {True: "yes", False: "no", None: "unknown"}[verdict]])
  queries = io.StringIO()
  writer = csv.writer(queries)
  writer.writerow(["query", "identity", "camera", "modality", "viewpoint", "ap",
                   "first_true_match", "true_matches"])
  for q in range(len(query)):
    label = _label(query, q)
    ap = ranking.ap[q]
    writer.writerow([query.paths[q], *(_text(label[k]) if label[k] is not None else ""
                                       for k in ("identity", "camera", "modality", "viewpoint")),
                     "" if np.isnan(ap) else f"{ap:.6f}",
                     ranking.first_match[q] if ranking.labelled else "",
                     len(ranking.match_ranks[q]) if ranking.labelled else ""])
  for name, text in (("ranks.csv", ranks), ("queries.csv", queries)):
    report.write_atomically(os.path.join(out_dir, name),
                            lambda f, t=text: f.write(t.getvalue().encode("utf-8")))


def _draw_summary(query, gallery, ranking, path):
  q_scen, g_scen, ranks = [], [], []
  query_scenarios = query.modalities * len(protocols.VIEWPOINTS) + query.viewpoints
  gallery_scenarios = gallery.modalities * len(protocols.VIEWPOINTS) + gallery.viewpoints
  for q in range(len(query)):
    if not len(ranking.match_ranks[q]):
      continue
    matches = ranking.match_rows[q]
    q_scen.append(np.full(len(matches), query_scenarios[q]))
    g_scen.append(gallery_scenarios[matches])
    ranks.append(ranking.match_ranks[q])
  return rank_lists.draw_rank_summary(np.concatenate(q_scen), np.concatenate(g_scen),
                                      np.concatenate(ranks), path)


if __name__ == "__main__":
  app.run(main)
