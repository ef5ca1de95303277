"""The synthetic WHU-MARS generator: layout, determinism, identity learnable but not trivially."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfds_whumars import raw_layout
from tfds_whumars import synthetic
from tfds_whumars import synthetic_people
from tfds_whumars import synthetic_render

SMALL = synthetic.Options(frames_per_camera=1, crop_scale=0.3)
NAME = re.compile(r"^(\d{4})_c([1-7])_(\d{6})\.jpg$")


def _digest(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  return out / "WHU-MARS", synthetic.generate(out, 80, seed=5)


def _ids(images, split, modality=None):
  return {i.person_id for i in images if i.split == split and modality in (None, i.modality)}


def test_files_follow_the_raw_layout_and_match_the_scan(generated):
  root, images = generated
  scanned = [image for split_images in raw_layout.scan(root).values() for image in split_images]
  assert sorted(scanned, key=lambda i: i.rel_path) == images
  for image in images:
    match = NAME.match(Path(image.rel_path).name)
    assert match, image.rel_path
    assert (int(match.group(1)), int(match.group(2)) - 1) == (image.person_id, image.camera)


def test_train_and_test_identities_are_disjoint_and_queries_come_from_test(generated):
  _, images = generated
  train, query, gallery = (_ids(images, s) for s in ("train", "query", "gallery"))
  assert train and not train & (query | gallery)
  assert query == gallery
  assert len(train) + len(gallery) == 80
  assert sum(i.split == "query" for i in images) == 3 * len(query)  # one per modality
  for q in (i for i in images if i.split == "query"):
    assert any(g.person_id == q.person_id and g.camera != q.camera
               for g in images if g.split == "gallery"), q.rel_path


def test_every_train_identity_has_all_modalities_and_both_viewpoints(generated):
  _, images = generated
  train = _ids(images, "train")
  for modality in raw_layout.MODALITIES:
    assert _ids(images, "train", modality) == train
  for pid in train:
    cameras = {i.camera for i in images if i.person_id == pid}
    viewpoints = {raw_layout.DEFAULT_CAMERA_VIEWPOINTS[c] for c in cameras}
    assert viewpoints == {"ground", "aerial"}
  camera_counts = [len({i.camera for i in images if i.person_id == pid}) for pid in train]
  assert min(camera_counts) < 7  # some identities are absent from some cameras


def test_frames_are_synchronised_triplets(generated):
  _, images = generated
  names = {m: {Path(i.rel_path).name for i in images if i.split == "train" and i.modality == m}
           for m in raw_layout.MODALITIES}
  assert names["RGB"] == names["NIR"] == names["TIR"]


def test_modalities_have_their_channel_count_and_crops_their_size(generated):
  root, images = generated
  heights = {"ground": [], "aerial": []}
  for image in images[::7]:
    with Image.open(root / image.rel_path) as decoded:
      assert decoded.mode == ("RGB" if image.modality == "RGB" else "L")
      heights[raw_layout.DEFAULT_CAMERA_VIEWPOINTS[image.camera]].append(decoded.height)
  assert 80 <= min(heights["ground"]) and max(heights["ground"]) <= 300
  assert 32 <= min(heights["aerial"]) and max(heights["aerial"]) <= 130
  assert np.median(heights["aerial"]) < np.median(heights["ground"]) / 2


def _descriptor(path: Path) -> np.ndarray:
  """A deliberately weak appearance descriptor: mean colour on an 8 x 4 grid."""
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB").resize((16, 32), Image.BILINEAR), np.float32)
  cells = pixels.reshape(8, 4, 4, 4, 3).mean(axis=(1, 3)).ravel()
  cells -= cells.mean()
  return cells / (np.linalg.norm(cells) + 1e-6)


def _rank1(root, images, query_modality, gallery_modality) -> float:
  queries = [i for i in images if i.split == "query" and i.modality == query_modality]
  gallery = [i for i in images if i.split == "gallery" and i.modality == gallery_modality]
  similarity = (np.stack([_descriptor(root / i.rel_path) for i in queries])
                @ np.stack([_descriptor(root / i.rel_path) for i in gallery]).T)
  gallery_ids = np.array([g.person_id for g in gallery])
  gallery_cameras = np.array([g.camera for g in gallery])
  hits = [gallery_ids[np.where(gallery_cameras != q.camera, row, -np.inf).argmax()] == q.person_id
          for q, row in zip(queries, similarity)]
  return float(np.mean(hits))


def test_identity_is_learnable_but_not_trivial(generated):
  root, images = generated
  chance = 1.0 / len(_ids(images, "gallery"))
  rgb = _rank1(root, images, "RGB", "RGB")
  assert 4 * chance < rgb < 0.9  # colour layout finds some people across cameras, not most
  assert _rank1(root, images, "TIR", "RGB") < rgb  # clothing colour vanishes in thermal


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  first = synthetic.generate(tmp_path / "a", 5, seed=3, options=SMALL)
  second = synthetic.generate(tmp_path / "b", 5, seed=3, options=SMALL)
  assert first == second
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  synthetic.generate(tmp_path / "c", 5, seed=4, options=SMALL)
  assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_writes_the_2337_root_and_refuses_unknown_or_existing_roots(tmp_path):
  synthetic.generate(tmp_path, 3, seed=0, root_name="WHU-MARS_2337", options=SMALL)
  assert (tmp_path / "WHU-MARS_2337" / "test" / "Thermal").is_dir()
  with pytest.raises(FileExistsError, match="WHU-MARS_2337"):
    synthetic.generate(tmp_path, 3, seed=0, root_name="WHU-MARS_2337", options=SMALL)
  with pytest.raises(ValueError, match="root_name"):
    synthetic.generate(tmp_path, 3, seed=0, root_name="Market-1501", options=SMALL)


def test_interrupted_generation_leaves_no_root(tmp_path, monkeypatch):
  calls = []

  def failing_render(*args, **kwargs):
    calls.append(1)
    if len(calls) > 4:
      raise KeyboardInterrupt
    return original(*args, **kwargs)
  original = synthetic_render.render_capture
  monkeypatch.setattr(synthetic_render, "render_capture", failing_render)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(tmp_path, 4, seed=0, options=SMALL)
  assert not (tmp_path / "WHU-MARS").exists()
  monkeypatch.setattr(synthetic_render, "render_capture", original)
  assert synthetic.generate(tmp_path, 4, seed=0, options=SMALL)  # the leftovers are replaced
  assert not (tmp_path / ".WHU-MARS.incomplete").exists()


def test_train_identities_can_miss_a_modality(tmp_path):
  options = synthetic.Options(frames_per_camera=1, crop_scale=0.3, train_ids_missing_modality=2)
  images = synthetic.generate(tmp_path, 8, seed=1, options=options)
  train = _ids(images, "train")
  incomplete = [pid for pid in train
                if any(pid not in _ids(images, "train", m) for m in raw_layout.MODALITIES)]
  assert len(incomplete) == 2


def test_command_line(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path), "--ids", "3", "--seed", "2", "--crop_scale", "0.3"])
  assert "images/s" in capsys.readouterr().out
  assert list((tmp_path / "WHU-MARS" / "train" / "RGB").glob("0*_c*_*.jpg"))


def test_spectral_coupling_moves_only_the_garments_nir_and_heat_towards_their_colour():
  people = [synthetic_people.sample_appearance(np.random.default_rng([7, i])) for i in range(200)]
  coupled = [synthetic_people.sample_appearance(np.random.default_rng([7, i]), 1.0)
             for i in range(200)]
  top = synthetic_people.TOP
  for a, b in zip(people, coupled):   # the same people: every draw is made before the coupling
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert (a.top_pattern, a.bag, a.width, a.height) == (b.top_pattern, b.bag, b.width, b.height)
    for table in ("nir", "heat"):     # skin and hair keep their sensor-specific values
      for material in (synthetic_people.SKIN, synthetic_people.HAIR):
        assert getattr(a, table)[material] == getattr(b, table)[material]
  lum = np.array([p.rgb[top] @ [0.299, 0.587, 0.114] for p in people])
  nir = np.array([p.nir[top] for p in coupled])
  heat = np.array([p.heat[top] for p in coupled])
  np.testing.assert_allclose(nir, lum, atol=1e-12)
  np.testing.assert_allclose(heat, 0.75 - 0.55 * lum, atol=1e-12)  # dark dyes run warmer
  assert abs(np.corrcoef(lum, [p.nir[top] for p in people])[0, 1]) < 0.8   # default: loose
  bags = [p.heat[synthetic_people.BAG] for p in coupled]
  assert max(bags) <= 0.15                                                # a bag stays cold
  with pytest.raises(ValueError, match="coupling"):
    synthetic_people.couple_spectra(people[0].rgb, people[0].nir, people[0].heat, 1.5)


def test_named_difficulties():
  demo = synthetic.options_for("demo")
  assert (demo.night_fraction, demo.lookalike_fraction) == (0.0, 0.0)
  assert demo.spectral_coupling > 0 and synthetic.options_for("default") == synthetic.Options()
  assert synthetic.options_for("demo", train_fraction=0.9).train_fraction == 0.9
  with pytest.raises(ValueError, match="unknown synthetic difficulty 'hard'"):
    synthetic.options_for("hard")
