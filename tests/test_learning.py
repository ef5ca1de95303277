"""Learning, end to end, in CI: the synthetic demo's recipe at a small size (the pretraining
stage, then the four loss variants of the ablation command) must retrieve clearly better than
chance on its own test split. A run that learns nothing fails here, whatever the unit tests say.
"""
import json

import numpy as np

from configs import uad
from uad_jax.commands import ablation
from uad_jax.data import input_pipeline
from uad_jax.evaluation import metrics

TEST_IDS = 20


def _small_demo(tmp_path):
  c = uad.get_config("synthetic")
  with c.unlocked():
    c.dataset.manual_dir = str(tmp_path / "raw")
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.dataset.synthetic_ids = 2 * TEST_IDS
    c.pretrain.dir = str(tmp_path / "pretrained")
    c.pretrain.synthetic_ids = 160
    c.pretrain.epochs = 8
    c.optim.epochs = 4
    c.eval_every_epochs = 4
  return c


def _chance_map(config) -> float:
  """Expected mAP of a random ranking of this split, from its labels alone."""
  q, g = (input_pipeline.read_metadata(input_pipeline.open_split_from_config(config, split))
          for split in ("query", "gallery"))
  chance = metrics.chance_level(q.person_ids, g.person_ids, q.cameras, g.cameras,
                                camera_rule=config.camera_rule)
  return chance["mAP"]


def test_the_small_demo_learns_and_the_ablation_table_is_written(tmp_path):
  config = _small_demo(tmp_path)
  logs = []
  # Two of the four variants keep the test short; the command runs all four by default.
  table = ablation.run_ablation(config, str(tmp_path / "ablation"), logs.append,
                                losses=("base", "uad"))
  chance = _chance_map(config)
  assert TEST_IDS * 3 <= len(input_pipeline.read_metadata(
      input_pipeline.open_split_from_config(config, "query")))     # every test id queried
  np.testing.assert_allclose(table["reference_rows"]["chance"]["mAP"], chance, rtol=1e-6)
  uad_map = table["variants"]["UAD (+ ProCA + GPD)"]["mAP"]
  assert uad_map >= 2 * chance, (uad_map, chance, logs[-1])
  for row in table["variants"].values():
    assert row["mAP"] > chance
  written = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
  assert set(written["variants"]) == {"Base (CE + WRT)", "UAD (+ ProCA + GPD)"}
  markdown = (tmp_path / "ablation" / "ablation.md").read_text()
  assert markdown.count("\n| ") == 1 + 2 + 3           # header, two variants, three references
  assert (tmp_path / "ablation" / "uad" / "train_curves.png").stat().st_size > 0
  assert any(line.startswith("stage 1/2: pretraining the backbone") for line in logs)
