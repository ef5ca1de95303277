"""Wall time of the jitted exact evaluator against a reference-style NumPy evaluator and the bare
fp32 distance product, all in one run, and a check that both evaluators agree.

  python bench/evaluator.py [--queries 10000] [--gallery 50000] [--dim 768] [--ids 1000]
  python bench/evaluator.py --protocols --queries 150 --gallery 1410 --dim 64 --ids 50

`--protocols` times the whole WHU-MARS protocol report (`protocols.evaluate_protocols`, 52 cells)
instead of one evaluation: first call (compilations included) and second call, next to the bare
distance products. Modalities are drawn uniformly from 3; cameras 5 and 6 are the aerial ones.

Data: identity centres plus noise, with a small per-camera shift; about gallery/ids · 6/7 true
matches per query under the SYSU rule. The features are integer-valued and not normalised, so the
fp32 distances are exact, identical in NumPy and XLA, and the metrics must agree to 1e-6 (CMC
included). Such features tie often; the evaluator breaks ties by gallery index at no extra cost,
and the reference-style path uses a stable argsort for the same order. `--float-features` runs
L2-normalised Gaussian features instead (then rounding may swap a few near-tied ranks).

The reference style (the authors' code path): distance rows in chunks of 4,000 queries, a full
argsort of every row, then a Python loop over the queries with cumulative sums.
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402  (bench/machine.py: this folder is the script's sys.path[0])
from uad_jax.evaluation import metrics, protocols  # noqa: E402

REFERENCE_CHUNK = 4000


def make_data(args):
  rng = np.random.default_rng(args.seed)
  centres = args.spread * rng.standard_normal((args.ids, args.dim))
  cam_shift = 0.3 * rng.standard_normal((args.cams, args.dim))

  def side(size):
    ids, cams = rng.integers(0, args.ids, size), rng.integers(0, args.cams, size)
    feats = centres[ids] + cam_shift[cams] + rng.standard_normal((size, args.dim))
    if not args.float_features:
      feats = np.round(args.int_scale * feats)   # |values| stay far below 2**24 / dim
    return feats.astype(np.float32), ids, cams

  (qf, qid, qcam), (gf, gid, gcam) = side(args.queries), side(args.gallery)
  return qf, gf, qid, gid, qcam, gcam


def reference_style(qf, gf, qid, gid, qcam, gcam, normalize, max_rank=50):
  """The authors' evaluation path (full sort per row, per-query loop), with a stable sort."""
  if normalize:
    qf = qf / np.maximum(np.linalg.norm(qf, axis=1, keepdims=True), 1e-12)
    gf = gf / np.maximum(np.linalg.norm(gf, axis=1, keepdims=True), 1e-12)
  g_sq = (gf * gf).sum(1)
  aps, inps, cmcs = [], [], []
  for start in range(0, len(qf), REFERENCE_CHUNK):
    q = qf[start:start + REFERENCE_CHUNK]
    dist = (q * q).sum(1)[:, None] + g_sq[None, :] - 2 * (q @ gf.T)
    orders = np.argsort(dist, axis=1, kind="stable")
    for row, order in enumerate(orders):
      i = start + row
      keep = gcam[order] != qcam[i]
      matches = (gid[order] == qid[i])[keep]
      if not matches.any():
        continue
      hits = matches.cumsum()
      cmcs.append(np.minimum(hits[:max_rank], 1))
      positions = np.flatnonzero(matches) + 1
      aps.append((hits[positions - 1] / positions).sum() / len(positions))
      inps.append(len(positions) / positions[-1])
  return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": np.mean(cmcs, axis=0),
          "num_valid_queries": len(aps)}


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def best_of(repeats, fn):
  runs = [timed(fn) for _ in range(repeats)]
  return min(t for t, _ in runs), runs[-1][1]


def time_protocols(args, data, normalize):
  """First and second wall time of the full protocol report on the data, with labels like
  WHU-MARS: 3 modalities, and the viewpoint given by the camera (the last two are aerial)."""
  rng = np.random.default_rng(args.seed + 1)
  qf, gf, qid, gid, qcam, gcam = data
  sides = [protocols.RetrievalSide(feats, ids, cams, rng.integers(0, 3, len(ids)),
                                   (cams >= args.cams - 2).astype(int))
           for feats, ids, cams in ((qf, qid, qcam), (gf, gid, gcam))]

  def run():
    return protocols.evaluate_protocols(*sides, normalize=normalize, chunk_size=args.chunk_size)

  first_seconds, _ = timed(run)
  second_seconds, report = best_of(args.repeats, run)
  whole = report["protocols"]["as_reid"]["all→all"]
  print(f"protocol report (52 cells): first call {first_seconds:.2f} s, second "
        f"{second_seconds:.2f} s; AS-ReID mAP {100 * whole['mAP']:.2f}%, R1 "
        f"{100 * whole['cmc'][0]:.2f}%; peak RSS so far {peak_rss_gib():.1f} GiB")
  return second_seconds


def bare_products(qf, gf, repeats):
  """Seconds of the plain [Q, D]·[D, G] fp32 product per library."""
  seconds = {"numpy": best_of(repeats, lambda: qf @ gf.T)[0]}
  try:
    import torch
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    seconds[f"torch {torch.__version__} ({torch.get_num_threads()} threads)"] = best_of(
        repeats, lambda: q @ g.T)[0]
  except ImportError:
    pass
  product = jax.jit(lambda a, b: jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST))
  q, g = jnp.asarray(qf), jnp.asarray(gf)
  product(q, g).block_until_ready()
  seconds["jax.jit"] = best_of(repeats, lambda: product(q, g).block_until_ready())[0]
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=10_000)
  parser.add_argument("--gallery", type=int, default=50_000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--ids", type=int, default=1000)
  parser.add_argument("--cams", type=int, default=7)
  parser.add_argument("--spread", type=float, default=0.33, help="identity centre scale vs noise")
  parser.add_argument("--int-scale", type=float, default=3.0, help="integer features: noise scale")
  parser.add_argument("--float-features", action="store_true")
  parser.add_argument("--chunk-size", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=1, help="timed runs; the fastest counts")
  parser.add_argument("--skip-reference", action="store_true")
  parser.add_argument("--protocols", action="store_true",
                      help="time the full protocol report instead of one evaluation")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  print(f"{args.queries} queries × {args.gallery} gallery × {args.dim} dims, {args.ids} ids, "
        f"{args.cams} cameras; {os.cpu_count()} CPUs, devices {jax.devices()}, load average "
        f"{os.getloadavg()[0]:.1f}; CPU {machine.cpu_model()}")
  data = make_data(args)
  normalize = args.float_features
  if args.protocols:
    report_seconds = time_protocols(args, data, normalize)
    for name, seconds in bare_products(data[0], data[1], args.repeats).items():
      print(f"bare fp32 distance product, {name}: {seconds:.3f} s → report / product = "
            f"{report_seconds / seconds:.1f}")
    return

  def run_evaluator():
    return metrics.evaluate(*data, normalize=normalize, chunk_size=args.chunk_size)

  first_seconds, _ = timed(run_evaluator)
  evaluator_seconds, ours = best_of(args.repeats, run_evaluator)
  print(f"jitted evaluator: {evaluator_seconds:.2f} s (first call {first_seconds:.2f} s, so "
        f"compilation ≈ {first_seconds - evaluator_seconds:.2f} s); mAP {100 * ours['mAP']:.2f}%, "
        f"R1 {100 * ours['cmc'][0]:.2f}%, mINP {100 * ours['mINP']:.2f}%, "
        f"{ours['num_valid_queries']} valid queries; peak RSS so far {peak_rss_gib():.1f} GiB")

  products = bare_products(data[0], data[1], args.repeats)
  for name, seconds in products.items():
    print(f"bare fp32 distance product, {name}: {seconds:.2f} s → evaluator / product = "
          f"{evaluator_seconds / seconds:.2f}")

  if args.skip_reference:
    return
  reference_seconds, reference = timed(lambda: reference_style(*data, normalize=normalize))
  print(f"reference-style NumPy loop: {reference_seconds:.2f} s → speed-up "
        f"{reference_seconds / evaluator_seconds:.1f}×")
  gaps = {key: float(np.max(np.abs(np.asarray(ours[key]) - reference[key])))
          for key in ("mAP", "mINP", "cmc")}
  agree = all(gap <= 1e-6 for gap in gaps.values()) and (
      ours["num_valid_queries"] == reference["num_valid_queries"])
  print("agreement with the reference style (≤ 1e-6): " + ("OK" if agree else "MISMATCH") +
        "; largest differences " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))


if __name__ == "__main__":
  main()
