"""The package layout by layer (uad_jax/__init__.py): no module imports a higher layer, and each
external library stays in the one module that owns it."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "uad_jax"
# Lowest first; a module may import its own layer and those before it.
LAYERS = ("uad_jax.sharding|uad_jax.numerics|uad_jax.console|uad_jax.distributed",
          "uad_jax.data", "uad_jax.models", "uad_jax.evaluation", "uad_jax.training",
          "uad_jax.commands")
OWNERS = {"grain": {"uad_jax.data.input_pipeline"},
          "tensorflow_datasets": {"uad_jax.data.input_pipeline"},
          "orbax": {"uad_jax.training.checkpointing"},
          "tqdm": {"uad_jax.console"},
          "tensorboardX": {"uad_jax.training.metric_writers"},
          "scipy": {"uad_jax.evaluation.reranking"},
          "jax2onnx": {"uad_jax.models.onnx_export"}, "onnx": {"uad_jax.models.onnx_export"},
          "onnxruntime": {"uad_jax.models.onnx_export"},
          "torch": set(), "tensorflow": set()}


def _layer(module: str) -> int | None:
  for index, names in enumerate(LAYERS):
    if any(module == name or module.startswith(name + ".") for name in names.split("|")):
      return index
  return None


def _modules():
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    if not name.startswith("uad_jax.testing"):
      yield name, path


def _imports(path):
  """Every module an import statement names, with `from a import b` giving a.b as well as a."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


MODULES = dict(_modules())


def test_every_module_belongs_to_a_layer():
  assert {name for name in MODULES if name != "uad_jax" and _layer(name) is None} == set()
  for package in ("data", "models", "evaluation", "training", "commands"):
    docstring = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert docstring and "import" in docstring, package


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_a_library_it_does_not_own(name):
  own = _layer(name)
  for imported in _imports(MODULES[name]):
    if imported.startswith("uad_jax.testing"):
      pytest.fail(f"{name} imports the test-only {imported}")
    layer = _layer(imported)
    if layer is not None and own is not None:
      assert layer <= own, f"{name} (layer {LAYERS[own]}) imports {imported} ({LAYERS[layer]})"
    library = imported.split(".")[0]
    if library in OWNERS:
      assert name in OWNERS[library], f"{name} imports {library}, owned by {OWNERS[library]}"
