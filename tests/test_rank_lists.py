"""Rank-list figures: frames in the verdict's colour where the layout says they are, read back
from the PNG; the summary's cumulative fractions against a direct count; input checks; atomic
writes."""
import warnings

import numpy as np
import pytest
from PIL import Image

from uad_jax.evaluation import rank_lists
from uad_jax.evaluation.protocols import SCENARIOS
from uad_jax.evaluation.rank_lists import Crop, Hit, RankedQuery

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rgb(colour: str):
  return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def image_colour(row, position):
  """A dark colour of its own per thumbnail, far from every frame colour and the background, so
  that a thumbnail drawn in another's place, or a frame over an image, shows."""
  return (10 + 20 * position, 10 + 25 * row, 60)


def solid(shape, colour):
  return np.broadcast_to(np.array(colour, np.uint8), (*shape, 3)).copy()


def example_rows():
  """Three queries with 4, 2 and 3 hits of assorted sizes and every verdict."""
  verdicts = [(True, False, None, False), (None, True), (False, False, False)]
  sizes = [(256, 128), (90, 160), (300, 70), (64, 64), (128, 64)]
  rows = []
  for row, row_verdicts in enumerate(verdicts):
    query = Crop(solid(sizes[row], image_colour(row, 0)), identity=7, modality=row % 3,
                 viewpoint="aerial", camera=2, file_name=f"q{row}.jpg")
    hits = [Hit(Crop(solid(sizes[(row + rank) % len(sizes)], image_colour(row, rank)),
                     identity=None if match is None else (7 if match else 30 + rank),
                     modality="TIR", viewpoint=rank % 2, camera=rank,
                     file_name=f"{rank:04d}_c{rank}_0000{row}.jpg"), 0.1 * rank, match)
            for rank, match in enumerate(row_verdicts, 1)]
    rows.append(RankedQuery(query, hits, first_match_rank=37 if row == 2 else None,
                            average_precision=0.25 * row))
  return rows


def inside(box, margin):
  """Points `margin` pixels inside each edge of box, at the middle of the edge."""
  left, top, right, bottom = box
  x, y = (left + right) / 2, (top + bottom) / 2
  return [(left + margin, y), (right - margin, y), (x, top + margin), (x, bottom - margin)]


def at(pixels, point):
  x, y = point
  return tuple(int(v) for v in pixels[int(y), int(x)])


def test_frames_are_drawn_in_the_verdict_colour_around_each_image(tmp_path):
  rows = example_rows()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # matplotlib warns of a glyph (✓ ✗ ■ ·) its font lacks
    path = rank_lists.draw_rank_lists(rows, tmp_path / "ranks.png", title="two\nlines")
  layout = rank_lists.rank_list_layout(rows, title="two\nlines")
  with Image.open(path) as png:
    assert png.format == "PNG"
    pixels = np.asarray(png.convert("RGB"))
  assert pixels.shape == (layout.height, layout.width, 3)
  frame = layout.frame_width
  assert frame >= 6  # thick enough to see; the samples below sit 3 px inside the band

  thumbnails = []
  for row, (query, hits) in enumerate(zip(layout.query_boxes, layout.hit_boxes)):
    thumbnails.append((query, rank_lists.QUERY_COLOUR, image_colour(row, 0),
                       rank_lists.QUERY_BACKGROUND))
    thumbnails += [(box, rank_lists.VERDICT_COLOURS[hit.match], image_colour(row, rank),
                    "#ffffff") for rank, (box, hit) in enumerate(zip(hits, rows[row].hits), 1)]
  assert len(thumbnails) == 3 + 4 + 2 + 3
  for box, frame_colour, colour, background in thumbnails:
    left, top, right, bottom = box
    band = [(left - frame / 2, top - frame / 2, right + frame / 2, bottom + frame / 2)]
    assert [at(pixels, p) for p in inside(*band, 0)] == [rgb(frame_colour)] * 4, box
    # The image fills its box (its aspect ratio is the box's), and the frame ends where it says.
    for point in inside(box, 2):
      np.testing.assert_allclose(at(pixels, point), colour, atol=2, err_msg=str(box))
    outside = (left - frame - 3, (top + bottom) / 2)
    assert at(pixels, outside) == rgb(background), box


def test_the_greens_reds_and_greys_are_what_they_say():
  green, red, grey = (np.array(rgb(rank_lists.VERDICT_COLOURS[v])) for v in (True, False, None))
  assert green[1] > green[0] + 80 and green[1] > green[2] + 50
  assert red[0] > red[1] + 150 and red[0] > red[2] + 150
  assert np.ptp(grey) == 0 and 80 < grey[0] < 200


def test_thumbnails_keep_their_aspect_ratio_within_the_two_to_one_box():
  rows = example_rows()
  layout = rank_lists.rank_list_layout(rows)
  box_w, box_h = (rank_lists.DPI * v for v in rank_lists._IMAGE_BOX)
  pairs = [(layout.query_boxes[r], rows[r].query) for r in range(len(rows))]
  pairs += [(box, hit.crop) for r in range(len(rows))
            for box, hit in zip(layout.hit_boxes[r], rows[r].hits)]
  for (left, top, right, bottom), crop in pairs:
    h, w = crop.image.shape[:2]
    assert (right - left) / (bottom - top) == pytest.approx(w / h)
    assert max((right - left) / box_w, (bottom - top) / box_h) == pytest.approx(1)


def test_the_layout_grows_with_k_and_rows_and_stays_sane_at_twenty_by_twenty():
  def layout(num_rows, k):
    crop = Crop(np.zeros((8, 4, 3), np.uint8), identity=1)
    hit = Hit(Crop(np.zeros((8, 4, 3), np.uint8), identity=2), 1.0, False)
    return rank_lists.rank_list_layout([RankedQuery(crop, [hit] * k)] * num_rows)

  big = layout(20, 20)
  assert layout(20, 10).width < big.width < 3200 and layout(10, 20).height < big.height < 7000
  frames = [(l - big.frame_width, t - big.frame_width, r + big.frame_width, b + big.frame_width)
            for row, query in zip(big.hit_boxes, big.query_boxes) for l, t, r, b in (query, *row)]
  assert len(frames) == 20 * 21
  for left, top, right, bottom in frames:
    assert 0 <= left < right <= big.width and 0 <= top < bottom <= big.height
  # No two frames overlap: sorted by rows, then by columns, each starts after the last ends.
  for first, second in zip(frames, frames[1:]):
    same_row = first[1] == second[1]
    assert (second[0] > first[2]) if same_row else (second[1] > first[3])


def test_a_row_says_where_its_first_true_match_is_when_it_does_not_show_it():
  rows = example_rows()
  assert [row.note() for row in rows] == [None, None, "first true match\nat rank 37"]
  no_match = RankedQuery(rows[2].query, rows[2].hits)
  assert no_match.note() == "no true match\nin the top 3"


def test_crops_take_modality_and_viewpoint_names_or_indices():
  crop = Crop(np.zeros((4, 2, 3), np.uint8), identity=np.int64(3), modality=2, viewpoint=1)
  assert (crop.modality, crop.viewpoint, crop.identity) == ("TIR", "aerial", 3)
  assert type(crop.identity) is int


def random_pairs(seed=0, size=700):
  """Pairs in every scenario but the last, ranks up to 200 (so beyond max_rank too)."""
  rng = np.random.default_rng(seed)
  queries = rng.integers(0, len(SCENARIOS) - 1, size)
  matches = rng.integers(0, len(SCENARIOS), size)
  ranks = np.minimum(rng.geometric(0.05, size), 200)
  return queries, matches, ranks


def test_cumulative_fractions_are_the_share_of_pairs_within_each_rank():
  queries, matches, ranks = random_pairs()
  fractions, counts = rank_lists.cumulative_match_fractions(queries, matches, ranks, max_rank=30)
  assert fractions.shape == (len(SCENARIOS), len(SCENARIOS), 30)
  assert ranks.max() > 30 and counts.sum() == len(ranks)
  for q in range(len(SCENARIOS)):
    for g in range(len(SCENARIOS)):
      cell = ranks[(queries == q) & (matches == g)]
      assert counts[q, g] == len(cell)
      want = [np.mean(cell <= r) if len(cell) else np.nan for r in range(1, 31)]
      np.testing.assert_allclose(fractions[q, g], want, rtol=1e-12, err_msg=f"{q}, {g}")
  assert np.isnan(fractions[-1]).all() and (counts[-1] == 0).all()


def test_cumulative_fractions_of_a_small_case_by_hand():
  fractions, counts = rank_lists.cumulative_match_fractions([1, 1, 1, 1], [4, 4, 4, 0],
                                                            [3, 1, 60, 2], max_rank=4)
  np.testing.assert_allclose(fractions[1, 4], [1 / 3, 1 / 3, 2 / 3, 2 / 3])
  np.testing.assert_allclose(fractions[1, 0], [0, 1, 1, 1])
  assert counts[1, 4] == 3 and counts[1, 0] == 1 and counts.sum() == 4


def test_median_ranks_per_query_scenario():
  queries, _, ranks = random_pairs(1)
  medians = rank_lists.median_match_ranks(queries, ranks)
  want = [np.median(ranks[queries == q]) if np.any(queries == q) else np.nan
          for q in range(len(SCENARIOS))]
  np.testing.assert_array_equal(medians, want)
  assert np.isnan(medians[-1]) and not np.isnan(medians[:-1]).any()


def test_the_summary_is_a_png_of_plausible_size(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = rank_lists.draw_rank_summary(*random_pairs(), tmp_path / "summary.png", max_rank=50,
                                        title="epoch 3")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with Image.open(path) as png:
    png.verify()
  with Image.open(path) as png:
    assert 1000 <= png.width <= 2000 and 600 <= png.height <= 1400
    # Not blank: curves in several colours on white.
    assert len(png.convert("RGB").getcolors(maxcolors=1 << 20)) > 100
  # No pairs at all is six empty panels, not an error.
  rank_lists.draw_rank_summary([], [], [], tmp_path / "empty.png")
  assert (tmp_path / "empty.png").stat().st_size > 10_000


def a_crop(**kwargs):
  return Crop(np.zeros((4, 2, 3), np.uint8), **kwargs)


BAD_SUMMARIES = [
    (([0, 1], [0, 1], [1]), "same length"),
    (([0, 6], [0, 1], [1, 2]), "query_scenarios must hold scenario indices in \\[0, 6\\).*got 6"),
    (([0, 1], [-1, 1], [1, 2]), "match_scenarios must hold scenario indices.*got -1"),
    (([0, 1], [0, 1], [1, 0]), "match_ranks must be ≥ 1.*got 0 at position 1"),
    (([0, 1], [0, 1], [1, 2.5]), "match_ranks must hold integers"),
    (([[0, 1]], [0, 1], [1, 2]), "query_scenarios must be 1-D"),
]


@pytest.mark.parametrize("arrays, message", BAD_SUMMARIES)
def test_bad_summary_inputs_are_named(tmp_path, arrays, message):
  with pytest.raises(ValueError, match=message):
    rank_lists.draw_rank_summary(*arrays, tmp_path / "summary.png")
  with pytest.raises(ValueError, match=message):
    rank_lists.cumulative_match_fractions(*arrays)
  assert not (tmp_path / "summary.png").exists()


def test_bad_max_rank_and_median_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match="max_rank must be an int ≥ 1"):
    rank_lists.draw_rank_summary([0], [0], [1], tmp_path / "summary.png", max_rank=0)
  with pytest.raises(ValueError, match="query_scenarios, match_ranks must .* same length"):
    rank_lists.median_match_ranks([0, 1], [1])


BAD_RECORDS = [
    (lambda: Crop(np.zeros((4, 2, 3), np.float32)), "uint8 \\[h, w, 3\\]"),
    (lambda: Crop(np.zeros((4, 2), np.uint8)), "uint8 \\[h, w, 3\\].*\\(4, 2\\)"),
    (lambda: Crop(np.zeros((0, 2, 3), np.uint8)), "non-empty"),
    (lambda: a_crop(modality="IR"), "modality must be one of"),
    (lambda: a_crop(viewpoint=2), "viewpoint index must be in \\[0, 2\\)"),
    (lambda: Hit(a_crop(), 0.5, "yes"), "match must be True, False or None"),
    (lambda: Hit(a_crop(), float("nan"), True), "distance .* must be finite"),
    (lambda: RankedQuery(a_crop(), [a_crop()]), "hit at rank 1 must be a Hit"),
    (lambda: RankedQuery(a_crop(identity=1), [Hit(a_crop(identity=2), 0.1, True)]),
     "rank 1 has match=True but identity 2 against the query's 1"),
    (lambda: RankedQuery(a_crop(), [Hit(a_crop(), 0.1, False)], first_match_rank=0),
     "first_match_rank must be an int ≥ 1"),
    (lambda: RankedQuery(a_crop(), [Hit(a_crop(), 0.1, False)] * 3, first_match_rank=2),
     "first_match_rank 2 points inside the top 3"),
    (lambda: RankedQuery(a_crop(), [Hit(a_crop(), 0.1, False), Hit(a_crop(), 0.2, True)],
                         first_match_rank=5), "first_match_rank 5 disagrees .* rank 2"),
    (lambda: RankedQuery(a_crop(), [], average_precision=1.5), "average_precision"),
]


@pytest.mark.parametrize("make, message", BAD_RECORDS)
def test_bad_records_are_named(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_bad_rows_are_named(tmp_path):
  with pytest.raises(ValueError, match="rows is empty"):
    rank_lists.draw_rank_lists([], tmp_path / "ranks.png")
  with pytest.raises(ValueError, match="rows\\[1\\] must be a RankedQuery"):
    rank_lists.draw_rank_lists([RankedQuery(a_crop(), []), a_crop()], tmp_path / "ranks.png")
  assert list(tmp_path.iterdir()) == []


def test_a_failed_drawing_leaves_the_old_file_whole(tmp_path, monkeypatch):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  rows = example_rows()[:1]
  draws = {"ranks.png": lambda path: rank_lists.draw_rank_lists(rows, path),
           "summary.png": lambda path: rank_lists.draw_rank_summary([0], [1], [3], path)}
  for name in draws:
    (tmp_path / name).write_bytes(b"the previous figure")

  def broken(self, file, *args, **kwargs):
    file.write(PNG_MAGIC + b"half a figure")
    raise RuntimeError("disk full")

  with monkeypatch.context() as patch:
    patch.setattr(FigureCanvasAgg, "print_png", broken)
    for name, draw in draws.items():
      with pytest.raises(RuntimeError, match="disk full"):
        draw(tmp_path / name)
  for name in draws:
    assert (tmp_path / name).read_bytes() == b"the previous figure"
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(draws)  # no temporary left
  # Without the fault the same calls do replace the file.
  for name, draw in draws.items():
    assert draw(tmp_path / name) == tmp_path / name
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(draws)
