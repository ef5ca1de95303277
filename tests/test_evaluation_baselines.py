"""The raw-pixel baseline's pooling, the baselines in the report (headline, table, JSON), and the
training curves."""
import json

import jax
import numpy as np
import pytest

from uad_jax.evaluation import baselines, metrics, protocols, report
from uad_jax.evaluation.protocols import ARROW, RetrievalSide


def block_mean_of_repeated(images, grid):
  """Area pooling stated directly: repeat every pixel grid-many times, so that each output cell
  covers whole (repeated) pixels, and average the blocks."""
  b, h, w, c = images.shape
  fine = np.repeat(np.repeat(images, grid[0], axis=1), grid[1], axis=2)
  return fine.reshape(b, grid[0], h, grid[1], w, c).mean(axis=(2, 4)).reshape(b, -1)


@pytest.mark.parametrize("size", [(32, 16), (256, 128), (30, 13), (8, 5)])
def test_pixel_features_are_area_means_on_the_grid(size):
  images = np.random.default_rng(0).uniform(-1, 1, (3, *size, 3)).astype(np.float32)
  got = np.asarray(jax.jit(baselines.pixel_features)(images))
  assert got.shape == (3, 16 * 8 * 3)
  # fp32 sums of up to 16·16 pixels against a float64 statement.
  np.testing.assert_allclose(got, block_mean_of_repeated(images.astype(np.float64),
                                                         baselines.PIXEL_GRID), atol=3e-5)


def side(seed, size, num_ids=6, dim=16):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, num_ids, size)
  feats = np.random.RandomState(9).randn(num_ids, dim)[ids] + rng.randn(size, dim)
  return RetrievalSide(feats.astype(np.float32), ids, rng.randint(0, 7, size),
                       rng.randint(0, 3, size), rng.randint(0, 2, size))


QUERY, GALLERY = side(1, 30), side(2, 90)


@pytest.fixture(scope="module")
def results():
  results = protocols.evaluate_protocols(QUERY, GALLERY, camera_rule="market", max_rank=10)
  pixels = [RetrievalSide(np.random.RandomState(s).randn(len(x.ids), 48).astype(np.float32),
                          x.ids, x.cams, x.modalities, x.viewpoints)
            for s, x in ((3, QUERY), (4, GALLERY))]
  results["baselines"] = baselines.evaluate_baselines(*pixels, camera_rule="market", max_rank=10)
  return results


def test_baselines_are_chance_and_the_evaluation_of_the_pixels(results):
  chance = metrics.chance_level(QUERY.ids, GALLERY.ids, QUERY.cams, GALLERY.cams,
                                camera_rule="market", max_rank=10)
  assert results["baselines"]["chance"]["mAP"] == chance["mAP"]
  raw = results["baselines"]["raw_pixels"]
  assert raw["grid"] == [16, 8] and raw["num_valid_queries"] == chance["num_valid_queries"]


def test_headline_table_and_json_carry_the_baselines(results, tmp_path):
  as_reid = results["protocols"]["as_reid"][f"all{ARROW}all"]
  chance, raw = results["baselines"]["chance"], results["baselines"]["raw_pixels"]
  headline = report.format_headline(results)
  want = "AS-ReID mAP/R1/mINP {} % (chance {}, raw pixels 16×8 {})".format(*(
      f"{100 * m['mAP']:.2f}/{100 * m['cmc'][0]:.2f}/{100 * m['mINP']:.2f}"
      for m in (as_reid, chance, raw)))
  assert headline == want
  written = report.write_report(results, tmp_path, print_table=False)
  rows = [line for line in written["table"].splitlines() if line.startswith("baseline")]
  assert [row.split()[1] for row in rows] == ["chance", "raw"]
  assert f"{100 * chance['mAP']:.2f}" in rows[0]
  assert (tmp_path / "retrieval.txt").read_text(encoding="utf-8") == written["table"] + "\n"
  loaded = report.read_json(tmp_path)
  assert set(loaded["baselines"]) == {"chance", "raw_pixels"}
  np.testing.assert_allclose(loaded["baselines"]["chance"]["cmc"], chance["cmc"])
  # The report of evaluate_protocols alone (no baselines) keeps its plain headline.
  bare = {k: v for k, v in results.items() if k != "baselines"}
  assert report.format_headline(bare) == want.split(" (")[0]


def test_train_curves(results, tmp_path):
  history = [{"epoch": e, "loss/total": 7.0 - e, "loss/ce": 3.0, "loss/wrt": 0.7,
              "loss/proca": 1e-3, "loss/gpd": 3.0, "id_accuracy": 0.1 * e, "grad_norm": 2.0,
              "lr/weight": 1e-3, "nonfinite": 0.0} for e in (1, 2, 3)]
  path = report.write_json(results, tmp_path / "r.json")
  with open(path, encoding="utf-8") as f:
    from_json = json.load(f)   # as the loop reads them: NaN as None
  for evaluations in ({}, {2: results, 3: from_json}):
    written = report.plot_train_curves(history, evaluations, tmp_path / "train_curves.png")
    with open(written, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not list(tmp_path.glob(".*.tmp"))
