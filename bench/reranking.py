"""k-reciprocal re-ranking: ours (uad_jax.evaluation.reranking, sparse, bounded memory) against a
reference-style dense implementation at Market-1501 size, then ours alone at WHU-MARS size.

  python bench/reranking.py [--queries 3368] [--gallery 15913] [--ids 1501]
                            [--large-queries 20000] [--large-gallery 180000] [--large-ids 2337]
                            [--dim 768] [--k1 50] [--k2 15] [--lambda-value 0.3]
                            [--skip-reference] [--skip-large]

Data: identity centres plus Gaussian noise (--noise times the centres' scale), L2-normalised; at
the default noise the original distances give Market-like mAP ≈ 67%, R1 ≈ 94% (random cameras,
the Market rule). Each implementation runs in a fresh subprocess that reads the features from a
temporary folder, so its time (compilation included) and its peak RSS (ru_maxrss) are its own;
both keep their [Q, G] result in memory and write it back for the comparison.

The reference style is the algorithm as every ReID repository's `re_ranking` lays it out: a
dense (Q+G)² fp32 distance matrix (torch addmm when torch is importable, else NumPy), its full
argsort, dense float16 V and V_qe, Python loops over rows and a float16 Jaccard accumulator per
query. It differs from ours by its float16 rounding only: at the default sizes up to 4e-2, mean
2e-4, with the same mAP and R1; a float32 copy of it matches ours to 3e-7.

At WHU-MARS size it cannot run on this machine: the arrays alive at its peak (the argsort) are
the torch distances and their normalised copy (fp32), V (fp16), argsort's int64 output and its
int32 copy, 22 bytes per (Q+G)² pair; the bench prints that size instead.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import machine  # bench/machine.py: this folder is the script's sys.path[0]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GB = 1e9
# Bytes per (Q+G)² pair alive at the reference's peak (see the module docstring).
REFERENCE_PEAK_BYTES_PER_PAIR = 4 + 4 + 2 + 8 + 4


def make_data(folder, num_queries, num_gallery, num_ids, args):
  """Writes query.npy, gallery.npy (fp32, L2-normalised) and labels.npz into `folder`."""
  rng = np.random.default_rng(args.seed)
  total = num_queries + num_gallery
  ids, cams = rng.integers(0, num_ids, total), rng.integers(0, 6, total)
  centres = rng.standard_normal((num_ids, args.dim), dtype=np.float32)
  feats = np.empty((total, args.dim), np.float32)
  for start in range(0, total, 50_000):   # the noise in pieces: no second [N, D] float64 copy
    part = slice(start, start + 50_000)
    feats[part] = centres[ids[part]] + args.noise * rng.standard_normal(
        (len(feats[part]), args.dim), dtype=np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  np.save(os.path.join(folder, "query.npy"), feats[:num_queries])
  np.save(os.path.join(folder, "gallery.npy"), feats[num_queries:])
  np.savez(os.path.join(folder, "labels.npz"), ids=ids, cams=cams)


def reference_style_rerank(query, gallery, k1, k2, lambda_value):
  """The reference's algorithm on its dense layout (see the module docstring); [Q, G] fp32."""
  num_query = len(query)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    feats = torch.cat([torch.from_numpy(query), torch.from_numpy(gallery)])
    sq = feats.pow(2).sum(dim=1, keepdim=True)
    squared = sq + sq.t()
    squared.addmm_(feats, feats.t(), beta=1, alpha=-2)
    distances = squared.numpy()            # shares the tensor's memory, which stays alive
  except ImportError:
    feats = np.concatenate([query, gallery])
    sq = np.sum(feats * feats, axis=1, keepdims=True)
    distances = (sq + sq.T) - np.float32(2) * (feats @ feats.T)
  n = len(distances)
  original = np.transpose(distances / np.max(distances, axis=0))
  weights = np.zeros((n, n), np.float16)
  ranking = np.argsort(original).astype(np.int32)
  half = int(np.around(k1 / 2))

  def reciprocal(ranking, i, k):
    forward = ranking[i, :k + 1]
    return forward[np.any(ranking[forward, :k + 1] == i, axis=1)]

  for i in range(n):
    own = reciprocal(ranking, i, k1)
    members = [own]
    for candidate in own:
      theirs = reciprocal(ranking, candidate, half)
      if len(np.intersect1d(theirs, own)) > 2 / 3 * len(theirs):
        members.append(theirs)
    members = np.unique(np.concatenate(members))
    weight = np.exp(-original[i, members])
    weights[i, members] = weight / np.sum(weight)
  original = original[:num_query]
  if k2 != 1:
    expanded = np.zeros_like(weights)
    for i in range(n):
      expanded[i] = np.mean(weights[ranking[i, :k2]], axis=0)
    weights = expanded
    del expanded
  del ranking
  holders = [np.flatnonzero(weights[:, k]) for k in range(n)]
  jaccard = np.zeros((num_query, n), np.float16)
  for i in range(num_query):
    overlap = np.zeros(n, np.float16)
    for k in np.flatnonzero(weights[i]):
      rows = holders[k]
      overlap[rows] = overlap[rows] + np.minimum(weights[i, k], weights[rows, k])
    jaccard[i] = 1 - overlap / (2 - overlap)
  final = jaccard * (1 - lambda_value) + original * lambda_value
  return final[:, num_query:]


def run_child(args):
  """One implementation on the data in args.data; prints a RESULT line."""
  query = np.load(os.path.join(args.data, "query.npy"))
  gallery = np.load(os.path.join(args.data, "gallery.npy"))
  start = time.perf_counter()
  result = {"implementation": args.child, "queries": len(query), "gallery": len(gallery)}
  if args.child == "reference":
    distances = reference_style_rerank(query, gallery, args.k1, args.k2, args.lambda_value)
    result["seconds"] = time.perf_counter() - start
  else:
    import jax  # pylint: disable=g-import-not-at-top
    from uad_jax.evaluation import reranking  # pylint: disable=g-import-not-at-top
    reranker = reranking.Reranker(query, gallery, reranking.RerankSettings(
        args.k1, args.k2, args.lambda_value))
    result["stages"] = dict(reranker.seconds)
    blocks_start = time.perf_counter()
    keep = args.out is not None
    distances = np.empty((len(query), len(gallery)), np.float32) if keep else None
    nearest = np.empty(len(query), np.int64)
    for first, stop, block in reranker.blocks():
      nearest[first:stop] = np.argmin(block, axis=1)
      if keep:
        distances[first:stop] = block
    result["stages"]["jaccard_blocks"] = time.perf_counter() - blocks_start
    result["seconds"] = time.perf_counter() - start
    result["devices"] = str(jax.devices())
    np.save(os.path.join(args.data, "nearest.npy"), nearest)
  result["peak_rss"] = machine.peak_rss_bytes()
  if args.out is not None:
    np.save(args.out, distances)
  print("RESULT " + json.dumps(result))


def child(args, implementation, folder, out):
  argv = [sys.executable, os.path.abspath(__file__), f"--child={implementation}",
          f"--data={folder}", f"--k1={args.k1}", f"--k2={args.k2}",
          f"--lambda-value={args.lambda_value}"] + ([f"--out={out}"] if out else [])
  done = subprocess.run(argv, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
  raise RuntimeError(f"{implementation} failed: " + " | ".join(tail))


def map_and_rank1(distances, folder, num_queries):
  from uad_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  labels = np.load(os.path.join(folder, "labels.npz"))
  ids, cams = labels["ids"], labels["cams"]
  valid, ap, _, first_rank = metrics.per_query_metrics_of_distances(
      distances, ids[:num_queries], ids[num_queries:], cams[:num_queries], cams[num_queries:],
      camera_rule="market")
  return 100 * np.mean(ap[valid]), 100 * np.mean(first_rank[valid] == 1)


def row(name, size, result, extra=""):
  stages = result.get("stages")
  stage_text = ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) if stages else "-"
  print(f"| {name:<16} | {size:<22} | {result['seconds']:8.1f} | "
        f"{result['peak_rss'] / GB:7.2f} | {stage_text} {extra}|")


def header():
  print("| implementation   | Q × G                  |   time s | peak GB | stages (s) |")
  print("|---|---|---:|---:|---|")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=3368)
  parser.add_argument("--gallery", type=int, default=15913)
  parser.add_argument("--ids", type=int, default=1501)
  parser.add_argument("--large-queries", type=int, default=20_000)
  parser.add_argument("--large-gallery", type=int, default=180_000)
  parser.add_argument("--large-ids", type=int, default=2337)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--noise", type=float, default=2.5, help="noise scale vs identity centres")
  parser.add_argument("--k1", type=int, default=50)
  parser.add_argument("--k2", type=int, default=15)
  parser.add_argument("--lambda-value", type=float, default=0.3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-reference", action="store_true")
  parser.add_argument("--skip-large", action="store_true")
  parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    run_child(args)
    return

  print(f"CPU: {machine.cpu_model()}")
  print(f"settings k1={args.k1}, k2={args.k2}, λ={args.lambda_value}; D={args.dim}, "
        f"noise {args.noise}")
  reference_bytes_per_pair = compare_at_market_size(args)
  if not args.skip_large:
    ours_at_whu_mars_size(args, reference_bytes_per_pair)


def compare_at_market_size(args):
  """Both implementations on the same data; the reference's measured peak bytes per (Q+G)²."""
  with tempfile.TemporaryDirectory() as folder:
    q, g = args.queries, args.gallery
    make_data(folder, q, g, args.ids, args)
    outputs = {name: os.path.join(folder, f"{name}.npy") for name in ("ours", "reference")}
    results = {"ours": child(args, "ours", folder, outputs["ours"])}
    if not args.skip_reference:
      results["reference"] = child(args, "reference", folder, outputs["reference"])
    header()
    for name, result in results.items():
      row(name if name == "ours" else "reference-style", f"{q} × {g}", result)
    query, gallery = (np.load(os.path.join(folder, f"{s}.npy")) for s in ("query", "gallery"))
    compared = {"original distances": 2 - 2 * (query @ gallery.T),
                "ours re-ranked": np.load(outputs["ours"])}
    if "reference" in results:
      compared["reference-style re-ranked"] = np.load(outputs["reference"])
    for name, distances in compared.items():
      mean_ap, rank1 = map_and_rank1(distances, folder, q)
      print(f"{name + ':':<27} mAP {mean_ap:.2f}%, R1 {rank1:.2f}% (Market camera rule)")
    if "reference" in results:
      gap = np.abs(compared["ours re-ranked"] - compared["reference-style re-ranked"])
      ours, reference = results["ours"], results["reference"]
      print(f"ours vs reference-style distances: max |Δ| {gap.max():.2e}, mean |Δ| "
            f"{gap.mean():.2e} (its float16 rounding); ours "
            f"{reference['seconds'] / ours['seconds']:.1f}× faster; peak memory reference / ours "
            f"{reference['peak_rss'] / ours['peak_rss']:.1f}")
      return reference["peak_rss"] / (q + g)**2
  return None


def ours_at_whu_mars_size(args, reference_bytes_per_pair):
  with tempfile.TemporaryDirectory() as folder:
    q, g = args.large_queries, args.large_gallery
    make_data(folder, q, g, args.large_ids, args)
    result = child(args, "ours", folder, None)
    header()
    row("ours", f"{q} × {g}", result)
    labels = np.load(os.path.join(folder, "labels.npz"))["ids"]
    nearest = np.load(os.path.join(folder, "nearest.npy"))
    print(f"re-ranked nearest gallery item of the same identity (no camera rule): "
          f"{100 * np.mean(labels[q:][nearest] == labels[:q]):.2f}% of queries")
  n = q + g
  print(f"reference-style would hold {REFERENCE_PEAK_BYTES_PER_PAIR} B × (Q+G)² = "
        f"{REFERENCE_PEAK_BYTES_PER_PAIR * n * n / GB:,.0f} GB at its peak (this machine: "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.0f} GB)" + (
            f"; its measured peak above: {reference_bytes_per_pair:.1f} B × (Q+G)²"
            if reference_bytes_per_pair else ""))


if __name__ == "__main__":
  main()
