"""Protocol cells (spec §7) on a small synthetic metadata set, and the report files."""
import json

import jax
import numpy as np
import pytest

from uad_jax.evaluation import metrics, protocols, report
from uad_jax.evaluation.protocols import ARROW, MODALITIES, SCENARIOS, VIEWPOINTS, RetrievalSide

GROUND_CAMS, AERIAL_CAMS = (0, 1, 2, 3, 4), (5, 6)


def synthetic_side(seed, size, num_ids=8, dim=8):
  """Identity clusters with a per-modality and per-camera shift; viewpoint from the camera."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, num_ids, size)
  cams = rng.randint(0, len(GROUND_CAMS) + len(AERIAL_CAMS), size)
  modalities = rng.randint(0, len(MODALITIES), size)
  shared = np.random.RandomState(0)  # the same centres and shifts for query and gallery
  centres, modality_shift = shared.randn(num_ids, dim), shared.randn(len(MODALITIES), dim)
  feats = centres[ids] + 0.6 * modality_shift[modalities] + 0.7 * rng.randn(size, dim)
  return RetrievalSide(feats.astype(np.float32), ids, cams, modalities,
                       np.isin(cams, AERIAL_CAMS).astype(int))


QUERY, GALLERY = synthetic_side(1, 90), synthetic_side(2, 300)


@pytest.fixture(scope="module")
def exact():
  return protocols.evaluate_protocols(QUERY, GALLERY, max_rank=20)


@pytest.fixture(scope="module")
def truncated():
  return protocols.evaluate_protocols(QUERY, GALLERY, max_rank=20, top_k=12)


def test_cells_of_every_protocol(exact):
  cells = exact["protocols"]
  assert list(cells) == ["as_reid", "modality", "viewpoint", "scenario", "cross_spectral"]
  assert [len(cells[p]) for p in cells] == [1, 9, 2, 36, 6]
  assert set(cells["viewpoint"]) == {f"aerial{ARROW}ground", f"ground{ARROW}aerial"}
  assert f"TIR{ARROW}RGB" in cells["cross_spectral"] and f"RGB{ARROW}RGB" not in cells[
      "cross_spectral"]
  assert cells["as_reid"][f"all{ARROW}all"]["num_queries"] == 90
  for q, g in [(0, 2), (1, 1)]:
    cell = cells["modality"][f"{MODALITIES[q]}{ARROW}{MODALITIES[g]}"]
    assert cell["num_queries"] == np.sum(QUERY.modalities == q)
    assert cell["num_gallery"] == np.sum(GALLERY.modalities == g)
  # Scenario cells named "<modality>-<viewpoint>→<modality>-<viewpoint>", each checked against
  # the subsets taken from the modality and viewpoint arrays directly.
  assert SCENARIOS == tuple(f"{m}-{v}" for m in MODALITIES for v in VIEWPOINTS)
  for name, cell in cells["scenario"].items():
    q, g = (_scenario_subset(side, scenario)
            for side, scenario in zip((QUERY, GALLERY), name.split(ARROW)))
    assert (cell["num_queries"], cell["num_gallery"]) == (len(q.feats), len(g.feats)), name
    direct = metrics.evaluate(q.feats, g.feats, q.ids, g.ids, q.cams, g.cams, max_rank=20)
    assert cell["num_valid_queries"] == direct["num_valid_queries"], name
    if direct["num_valid_queries"]:
      assert cell["mAP"] == direct["mAP"], name


def _scenario_subset(side, scenario):
  modality, viewpoint = scenario.split("-")
  return side.subset((side.modalities == MODALITIES.index(modality))
                     & (side.viewpoints == VIEWPOINTS.index(viewpoint)))


def test_a_cell_is_evaluate_on_its_subsets(exact):
  q = QUERY.subset(QUERY.modalities == 2)
  g = GALLERY.subset(GALLERY.modalities == 0)
  direct = metrics.evaluate(q.feats, g.feats, q.ids, g.ids, q.cams, g.cams, max_rank=20)
  cell = exact["protocols"]["cross_spectral"][f"TIR{ARROW}RGB"]
  assert cell["mAP"] == direct["mAP"] and cell["num_valid_queries"] == direct["num_valid_queries"]
  np.testing.assert_array_equal(cell["cmc"], direct["cmc"])


def test_every_cell_uses_the_camera_rule_it_is_given():
  market = protocols.evaluate_protocols(QUERY, GALLERY, camera_rule="market", max_rank=20)
  assert market["camera_rule"] == "market"
  # A cell whose query and gallery share cameras, where the two rules differ.
  q, g = QUERY.subset(QUERY.modalities == 0), GALLERY.subset(GALLERY.modalities == 0)
  for rule in ("market", "sysu"):
    direct = metrics.evaluate(q.feats, g.feats, q.ids, g.ids, q.cams, g.cams, max_rank=20,
                              camera_rule=rule)
    cell = market["protocols"]["modality"][f"RGB{ARROW}RGB"]
    assert (cell["mAP"] == direct["mAP"]) == (rule == "market"), rule


def test_truncated_cells_are_labelled_and_at_most_exact(exact, truncated):
  assert exact["truncated_top_k"] is None and truncated["truncated_top_k"] == 12
  for protocol, cells in exact["protocols"].items():
    for name, cell in cells.items():
      cut = truncated["protocols"][protocol][name]
      assert cut["truncated_top_k"] == 12
      assert cut["num_valid_queries"] == cell["num_valid_queries"]
      if cell["num_valid_queries"]:
        assert cut["mAP"] <= cell["mAP"] + 1e-7 and cut["mINP"] <= cell["mINP"] + 1e-7
  whole = exact["protocols"]["as_reid"][f"all{ARROW}all"]
  assert truncated["protocols"]["as_reid"][f"all{ARROW}all"]["mAP"] < whole["mAP"]


@pytest.mark.parametrize("results_name", ["exact", "truncated"])
def test_report_files(results_name, request, tmp_path):
  results = request.getfixturevalue(results_name)
  written = report.write_report(results, tmp_path, print_table=False)
  table = written["table"]
  assert ("TRUNCATED top-12" in table) == (results_name == "truncated")
  assert len(table.splitlines()) == 3 + 1 + 9 + 2 + 36 + 6
  assert f"TIR{ARROW}RGB" in table

  def no_nan(token):
    raise ValueError(f"{token} in strict JSON")

  with open(written["json"], encoding="utf-8") as f:
    loaded = json.load(f, parse_constant=no_nan)
  assert ("TRUNCATED" in loaded["mode"]) == (results_name == "truncated")
  as_reid = loaded["protocols"]["as_reid"][f"all{ARROW}all"]
  assert len(as_reid["cmc"]) == 20 and 0 <= as_reid["mAP"] <= 1
  for key in ("cmc", "modality", "scenario"):
    with open(written[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not list(tmp_path.glob(".*.tmp"))


def test_empty_cells_are_reported_as_missing(tmp_path):
  # No aerial query: aerial→ground has no query; its metrics are NaN, written as null / n/a.
  ground_only = QUERY.subset(QUERY.viewpoints == 0)
  results = protocols.evaluate_protocols(ground_only, GALLERY, max_rank=10)
  cell = results["protocols"]["viewpoint"][f"aerial{ARROW}ground"]
  assert cell["num_queries"] == 0 and np.isnan(cell["mAP"])
  assert "n/a" in report.format_table(results)
  path = report.write_json(results, tmp_path / "r.json")
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["protocols"]["viewpoint"][f"aerial{ARROW}ground"]["mAP"] is None


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "r.json"
  path.write_text("old")

  def fail(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    report.write_atomically(path, fail)
  assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("field,values,message", [
    ("modalities", np.full(90, 3), "modalities must hold ints in"),
    ("viewpoints", np.zeros(5, int), "viewpoints must have one entry per feature row"),
])
def test_bad_metadata_names_the_field(field, values, message):
  fields = {f: getattr(QUERY, f) for f in ("feats", "ids", "cams", "modalities", "viewpoints")}
  with pytest.raises(ValueError, match=message):
    RetrievalSide(**{**fields, field: values})


@pytest.mark.parametrize("camera_rule,top_k,num_devices", [
    ("sysu", None, 8), ("market", 7, 1), ("none", None, 1), ("sysu", 7, 8)])
def test_one_pass_cells_equal_evaluate_of_each_cell_with_exact_ties(camera_rule, top_k,
                                                                     num_devices):
  rng = np.random.default_rng(3)
  # Small integer features: exact fp32 distances, many of them equal.
  q_feats, g_feats = rng.integers(-2, 3, (60, 3)), rng.integers(-2, 3, (250, 3))
  q_ids, g_ids = rng.integers(0, 8, 60), rng.integers(0, 8, 250)
  q_cams, g_cams = rng.integers(0, 4, 60), rng.integers(0, 4, 250)
  q_groups, g_groups = rng.integers(0, 6, 60), rng.integers(0, 6, 250)
  cells = [(None, None), (q_groups < 3, g_groups >= 3), (q_groups == 1, g_groups == 1),
           (q_groups == 5, np.isin(g_groups, [0, 2, 4])),
           (rng.random(60) < 0.5, rng.random(250) < 0.3),     # masks that cut the groups
           (np.zeros(60, bool), None), (None, np.zeros(250, bool)),
           (None, np.arange(250) == 17)]                      # one gallery item: rarely valid
  options = {"camera_rule": camera_rule, "top_k": top_k, "max_rank": 10, "normalize": False,
             "devices": jax.devices()[:num_devices]}
  results = metrics.evaluate_cells(q_feats, g_feats, q_ids, g_ids, q_cams, g_cams, cells,
                                   **options)
  for number, (q_mask, g_mask) in enumerate(cells):
    q = slice(None) if q_mask is None else q_mask
    g = slice(None) if g_mask is None else g_mask
    want = metrics.evaluate(q_feats[q], g_feats[g], q_ids[q], g_ids[g], q_cams[q], g_cams[g],
                            **options)
    got = results[number]
    assert got.keys() == want.keys(), number
    for key in ("num_queries", "num_valid_queries", "truncated_top_k"):
      assert got[key] == want[key], (number, key)
    # Exactly: the same integer ranks and the same host arithmetic.
    np.testing.assert_array_equal([got["mAP"], got["mINP"]], [want["mAP"], want["mINP"]],
                                  err_msg=str(number))
    np.testing.assert_array_equal(got["cmc"], want["cmc"], err_msg=str(number))
  assert results[0]["num_valid_queries"] > 40 and results[5]["num_valid_queries"] == 0


def test_the_protocol_report_is_one_pass_of_the_whole_set(monkeypatch):
  calls, one_pass = [], metrics.evaluate_cells

  def counted(*args, **kwargs):
    calls.append(len(args[6]))
    return one_pass(*args, **kwargs)

  monkeypatch.setattr(metrics, "evaluate_cells", counted)
  monkeypatch.setattr(metrics, "evaluate", None)   # no per-cell evaluation left
  protocols.evaluate_protocols(QUERY, GALLERY, max_rank=5)
  assert calls == [1 + 9 + 2 + 36]


@pytest.mark.parametrize("cells,error,message", [
    ([], ValueError, "no cells"),
    ([(np.ones(90, bool),)], ValueError, "must be a .query mask, gallery mask. pair"),
    ([(np.ones(89, bool), None)], ValueError,
     r"the query mask must be a bool array of shape \(90,\)"),
    ([(None, np.ones(300, int))], ValueError, "the gallery mask must be a bool array"),
])
def test_bad_cells_are_refused(cells, error, message):
  with pytest.raises(error, match=message):
    metrics.evaluate_cells(QUERY.feats, GALLERY.feats, QUERY.ids, GALLERY.ids, QUERY.cams,
                           GALLERY.cams, cells)


def test_unknown_options_are_refused():
  with pytest.raises(TypeError, match="unexpected options .'topk'."):
    metrics.evaluate_cells(QUERY.feats, GALLERY.feats, QUERY.ids, GALLERY.ids, QUERY.cams,
                           GALLERY.cams, [(None, None)], topk=3)
