"""Every ```python block of README.md runs, so its examples cannot rot.

Each block runs as written in a fresh namespace that already holds the small inputs it names but
does not make (a batch for the losses, features for the evaluation, images for the model). One
thing a test cannot hold is the full-size ViT-B/16 checkpoint of the pretrained example: the
rewrites in REWRITES swap in the committed tiny timm ViT in the same format (tests/fixtures, the
"mu/16" variant), and each must match the README, so none can silently stop applying. The bash
blocks are not run here.
"""
import functools
import os
import pathlib
import re
import tempfile

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
REWRITES = {
    '"jx_vit_base_p16_224-80ecf9dd.pth"': repr(os.fspath(FIXTURES / "tiny_vit.pth")),
    'variant="B/16"': 'variant="mu/16"',
    # The export example reads an export of the demo's model: a tiny one made on first use.
    '"exports/uad/': lambda: '"' + _tiny_export() + "/",
}
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"),
                    flags=re.DOTALL | re.MULTILINE)


def inputs():
  """What the blocks use without making: names as the README uses them, tiny sizes."""
  rng = np.random.default_rng(0)
  # One replica batch, modality-major: 3 modalities × P=2 identities × K=4 images; 5 classes.
  labels = np.tile(np.repeat([3, 1], 4), 3).astype(np.int32)
  memory = rng.normal(size=(5, 16)).astype(np.float32)
  q_ids, g_ids = rng.integers(0, 4, 12), rng.integers(0, 4, 40)
  return {
      "labels": labels, "logits": rng.normal(size=(24, 5)).astype(np.float32),
      "feats": rng.normal(size=(24, 16)).astype(np.float32),
      "memory": memory / np.linalg.norm(memory, axis=1, keepdims=True),
      "images": rng.uniform(-1, 1, (2, 256, 128, 3)).astype(np.float32),
      "q_feats": rng.normal(size=(12, 8)).astype(np.float32), "q_ids": q_ids,
      "q_cams": rng.integers(0, 3, 12),
      "g_feats": rng.normal(size=(40, 8)).astype(np.float32), "g_ids": g_ids,
      "g_cams": rng.integers(0, 3, 40),
  }


@functools.lru_cache(maxsize=1)
def _tiny_export() -> str:
  """An export of an initialised demo-sized model (64×32 input), in a temporary folder."""
  from configs import uad
  from uad_jax.models import serving_export
  from uad_jax.training import train_state
  config = uad.get_config("synthetic")
  model = train_state.build_model(config, 3)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         np.zeros((1, 64, 32, 3), np.float32), train=False)
  out = os.path.join(tempfile.mkdtemp(prefix="readme_export_"), "uad")
  serving_export.export(model, variables, (64, 32), out)
  return out


def test_the_readme_has_the_examples_this_test_expects():
  assert len(BLOCKS) >= 3
  text = "".join(BLOCKS)
  for written in REWRITES:
    assert written in text, f"README no longer contains {written}: update REWRITES"


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[block.splitlines()[0][:40] for block in BLOCKS])
def test_python_block_runs(index):
  code = BLOCKS[index]
  for written, tiny in REWRITES.items():
    if written in code:
      code = code.replace(written, tiny() if callable(tiny) else tiny)
  namespace = inputs()
  exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
  for name, value in namespace.items():
    if isinstance(value, (jax.Array, np.ndarray)) and value.dtype.kind == "f":
      assert np.isfinite(np.asarray(value)).all(), f"block {index + 1}: {name} is not finite"
