"""The retrieval tools: folders and features files, a run's model restored for inference, the
embed and search commands end to end, and the search's ranking against the metrics."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from uad_jax.data import image_folder, input_pipeline, prepare
from uad_jax.evaluation import features_file, inference, metrics, report, reranking, search
from uad_jax.testing import configs
from uad_jax.training import checkpoint_eval, checkpointing, loop, train_state
from uad_jax.training import workdir as workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jpeg(path, value, size=(20, 40)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_a_folder_scan_reads_whu_mars_paths_and_leaves_other_images_unknown(tmp_path):
  _write_jpeg(tmp_path / "query/Thermal/0007_c6_000123.jpg", 10)
  _write_jpeg(tmp_path / "query/IR/0003_c2_000001.JPG", 20)
  _write_jpeg(tmp_path / "RGB/holiday.jpg", 30)
  _write_jpeg(tmp_path / "misc/0012_c0_zero_camera.jpg", 40)
  (tmp_path / "notes.txt").write_text("not an image")
  images = image_folder.scan(tmp_path)
  assert images.paths == ("RGB/holiday.jpg", "misc/0012_c0_zero_camera.jpg",
                          "query/IR/0003_c2_000001.JPG", "query/Thermal/0007_c6_000123.jpg")
  np.testing.assert_array_equal(images.person_ids, [-1, -1, 3, 7])
  np.testing.assert_array_equal(images.cameras, [-1, -1, 1, 5])
  np.testing.assert_array_equal(images.modalities, [0, -1, 1, 2])   # RGB, ?, NIR, TIR
  np.testing.assert_array_equal(images.viewpoints, [-1, -1, 0, 1])  # camera 5: a UAV
  forced = image_folder.scan(tmp_path, modality="TIR",
                             camera_viewpoints=("aerial",) * 2 + ("ground",) * 5)
  np.testing.assert_array_equal(forced.modalities, [0, 2, 1, 2])  # folders still win
  np.testing.assert_array_equal(forced.viewpoints, [-1, -1, 1, 0])


def test_a_folder_scan_names_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="not a folder"):
    image_folder.scan(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty: no image files"):
    image_folder.scan(tmp_path / "empty")
  with pytest.raises(ValueError, match="modality 'thermal'"):
    image_folder.scan(tmp_path, modality="thermal")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 truncated")
  with pytest.raises(ValueError, match="bad.jpg: cannot read the image"):
    image_folder.load_image(str(bad), (32, 16))


def test_the_device_normalisation_is_the_hosts_bit_for_bit():
  from uad_jax.data import augment
  import jax
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  host = augment.normalize(np.repeat(values[..., None], 3, -1))
  np.testing.assert_array_equal(np.asarray(jax.jit(augment.normalize_batch)(values)),
                                host[..., 0])
  np.testing.assert_array_equal(augment.normalize_batch(values), host[..., 0])


def _feature_set(rng, n, dim=8, labelled=True, root="/nowhere"):
  ids = rng.integers(0, 5, n) if labelled else np.full(n, -1)
  cams = rng.integers(0, 3, n) if labelled else np.full(n, -1)
  return features_file.FeatureSet(rng.normal(size=(n, dim)).astype(np.float32), ids, cams,
                                  rng.integers(0, 3, n), rng.integers(0, 2, n),
                                  [f"img{i}.jpg" for i in range(n)], root, {"model": "test"})


def test_a_features_file_round_trips_and_refuses_to_overwrite_or_misread(tmp_path):
  rng = np.random.default_rng(0)
  original = _feature_set(rng, 7)
  path = str(tmp_path / "f.npz")
  features_file.write(original, path)
  back = features_file.read(path)
  for name in ("feats", "person_ids", "cameras", "modalities", "viewpoints"):
    np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
  assert (back.paths, back.root, back.model) == (original.paths, original.root, original.model)
  with pytest.raises(FileExistsError, match="f.npz exists"):
    features_file.write(original, path)
  np.savez(tmp_path / "other.npz", feats=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="other.npz: not a uad-jax features file"):
    features_file.read(str(tmp_path / "other.npz"))
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.npz: not a readable features file"):
    features_file.read(str(tmp_path / "junk.npz"))
  with pytest.raises(ValueError, match="one entry per feature row"):
    features_file.FeatureSet(np.zeros((3, 2)), [1, 2], [0, 0, 0], [0] * 3, [0] * 3,
                             ["a", "b", "c"], "/", {})


def _brute_force(query, gallery, camera_rule):
  """Per query: the kept gallery rows in rank order, and its AP, by the definitions."""
  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  q, g = unit(query.feats.astype(np.float64)), unit(gallery.feats.astype(np.float64))
  lists, aps = [], []
  for i in range(len(q)):
    dist = ((q[i] - g) ** 2).sum(1)
    same_id = gallery.person_ids == query.person_ids[i]
    same_cam = gallery.cameras == query.cameras[i]
    kept = metrics.kept_by_camera_rule(camera_rule, same_id, same_cam)
    order = [j for j in np.lexsort((np.arange(len(g)), dist)) if kept[j]]
    hits = np.flatnonzero(same_id[order]) + 1
    lists.append(np.array(order))
    aps.append(np.mean(np.arange(1, len(hits) + 1) / hits) if len(hits) else np.nan)
  return lists, np.array(aps)


@pytest.mark.parametrize("camera_rule", ["sysu", "market", "none"])
def test_the_search_ranks_as_the_definitions_and_agrees_with_the_metrics(camera_rule):
  rng = np.random.default_rng(1)
  query, gallery = _feature_set(rng, 23), _feature_set(rng, 61)
  ranking = search.rank(query, gallery, top_k=12, camera_rule=camera_rule,
                        memory_budget_bytes=32 * 61 * 5)  # blocks of 5 queries
  lists, aps = _brute_force(query, gallery, camera_rule)
  for i, order in enumerate(lists):
    k = min(12, len(order))
    np.testing.assert_array_equal(ranking.top_index[i, :k], order[:k])
    assert (ranking.top_index[i, k:] == -1).all()
    hits = [j for j in order if gallery.person_ids[j] == query.person_ids[i]]
    np.testing.assert_array_equal(ranking.match_rows[i], hits)
  np.testing.assert_allclose(ranking.ap, aps, rtol=1e-6)
  expected = metrics.evaluate(query.feats, gallery.feats, query.person_ids, gallery.person_ids,
                              query.cameras, gallery.cameras, camera_rule=camera_rule)
  valid = ~np.isnan(ranking.ap)
  assert valid.sum() == expected["num_valid_queries"]
  assert np.mean(ranking.ap[valid]) == pytest.approx(expected["mAP"], rel=1e-6)
  assert np.mean(ranking.first_match[valid] == 1) == pytest.approx(expected["cmc"][0])


def test_an_unlabelled_search_removes_nothing_and_knows_no_match():
  rng = np.random.default_rng(2)
  query, gallery = _feature_set(rng, 4, labelled=False), _feature_set(rng, 9)
  ranking = search.rank(query, gallery, top_k=20)
  assert not ranking.labelled and ranking.top_index.shape == (4, 9)
  assert (np.sort(ranking.top_index, axis=1) == np.arange(9)).all()
  assert np.isnan(ranking.ap).all() and (ranking.first_match == 0).all()
  with pytest.raises(ValueError, match="not the same model"):
    search.rank(query, _feature_set(rng, 3, dim=5))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny synthetic dataset and a workdir holding one checkpoint of an initialised state."""
  tmp = tmp_path_factory.mktemp("tools")
  config = configs.with_fields({
      "dataset.manual_dir": str(tmp / "raw"), "dataset.data_dir": str(tmp / "tfds"),
      "dataset.synthetic_ids": 16, "sampler.identities": 2, "sampler.instances": 2,
      "model.image_size": (32, 16), "eval_batch_size": 24, "mesh": (("data", 4), ("model", 2))})
  workdir = str(tmp / "run")
  plan, num_classes, mesh = loop.prepared_plan(config, lambda *_: None)
  state, _ = train_state.create_train_state(config, num_classes, plan.steps_per_epoch, mesh,
                                            log=None)
  workdirs.record_config(workdir, config, resuming=False)
  checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  checkpoints.save(7, state)
  checkpoints.close()
  return config, workdir, state


def test_a_restored_run_embeds_a_folder_exactly_as_the_evaluation_does(run):
  config, workdir, state = run
  restored = checkpoint_eval.load_for_inference(workdir, "latest")
  assert restored.step == 7 and restored.describe()["image_size"] == [32, 16]
  images = image_folder.scan(prepare.raw_split_folder(config, "query"))
  forward = restored.forward(config.eval_batch_size)
  feats = inference.embed_folder(images, forward, config.model.image_size, forward.batch_size)
  source = input_pipeline.open_split_from_config(config, "query")
  expected = inference.extract_features(state.model, {"params": state.params,
                                                      "batch_stats": state.batch_stats},
                                        config, inference._eval_dataset(config, source),
                                        restored.mesh).model
  names = [source[i]["file_name"].decode().split("/", 1)[1] for i in range(len(source))]
  rows = [images.paths.index(name) for name in names]
  np.testing.assert_array_equal(feats[rows], expected.feats)  # bf16 model, bit for bit
  np.testing.assert_array_equal(images.person_ids[rows], expected.ids)
  np.testing.assert_array_equal(images.cameras[rows], expected.cams)
  np.testing.assert_array_equal(images.modalities[rows], expected.modalities)
  np.testing.assert_array_equal(images.viewpoints[rows], expected.viewpoints)


def _command(name, *args):
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)  # the commands run as a user runs them: one CPU device
  return subprocess.run([sys.executable, "-m", f"uad_jax.commands.{name}", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_embed_then_search_end_to_end(run, tmp_path):
  config, workdir, _ = run
  gallery = str(tmp_path / "gallery.npz")
  done = _command("embed", f"--workdir={workdir}", f"--images="
                  f"{prepare.raw_split_folder(config, 'gallery')}", f"--out={gallery}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "with identity and camera" in done.stdout
  refused = _command("embed", f"--workdir={workdir}", "--images=/", f"--out={gallery}")
  assert refused.returncode != 0 and "gallery.npz exists" in refused.stderr
  out = tmp_path / "search"
  done = _command("search", f"--workdir={workdir}", "--query=test", f"--gallery={gallery}",
                  f"--out={out}", "--top_k=5", "--sample=2", "--worst=3", "--figure_k=4",
                  "--rerank=paper")
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("ranks.csv", "queries.csv", "rank_lists_sample.png", "rank_lists_worst.png",
               "rank_summary.png"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "queries.csv") as f:
    queries = list(csv.DictReader(f))
  with open(out / "ranks.csv") as f:
    ranks = list(csv.DictReader(f))
  assert len(ranks) == 5 * len(queries)
  aps = [float(q["ap"]) for q in queries if q["ap"]]
  assert f"mAP {100 * np.mean(aps):.2f} %" in done.stdout
  worst = sorted(aps)[0]
  assert f"AP {100 * worst:.1f} %" in done.stdout.split("worst queries")[1]
  # Each listed true match really shares the query's identity (from the file names).
  for row in ranks:
    same = row["query"].split("/")[-1].split("_")[0] == row["gallery"].split("/")[-1].split("_")[0]
    assert row["true_match"] == ("yes" if same else "no")


def test_a_reranked_evaluation_is_reported_beside_the_plain_one_and_agrees_with_the_search(run):
  config, workdir, _ = run
  config = configs.with_fields({"rerank.enabled": True, "rerank.k1": 20, "rerank.k2": 6},
                               config=config)
  lines = []
  checkpoint_eval.evaluate_checkpoint(config, workdir, "latest", log=lines.append)
  out_dir = checkpoint_eval.report_dir(workdir, 7)
  plain, reranked = (report.read_json(out_dir, prefix)
                     for prefix in ("retrieval", inference.RERANKED_PREFIX))
  assert reranked["reranking"] == {"k1": 20, "k2": 6, "lambda_value": 0.3}
  assert "re-ranked (k1=20, k2=6, λ=0.3): AS-ReID mAP" in "\n".join(lines)
  restored = checkpoint_eval.load_for_inference(workdir, "latest")
  forward = restored.forward(config.eval_batch_size)
  sides = []
  for split in ("query", "gallery"):
    images = image_folder.scan(prepare.raw_split_folder(config, split))
    feats = inference.embed_folder(images, forward, config.model.image_size, forward.batch_size)
    sides.append(features_file.FeatureSet(feats, images.person_ids, images.cameras,
                                          images.modalities, images.viewpoints, images.paths,
                                          images.root, {}))
  for settings, expected in ((None, plain), (reranking.PAPER_SETTINGS, reranked)):
    ranking = search.rank(*sides, top_k=5, camera_rule=config.camera_rule, rerank=settings)
    cell = expected["protocols"]["as_reid"]["all→all"]
    assert np.nanmean(ranking.ap) == pytest.approx(cell["mAP"], abs=1e-6)
  assert reranked["protocols"]["as_reid"]["all→all"]["mAP"] != plain["protocols"]["as_reid"][
      "all→all"]["mAP"]
