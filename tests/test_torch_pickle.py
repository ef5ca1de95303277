"""The torch-free reader of torch.save checkpoints.

CI has no torch, so the fixtures are written here in torch's layout by a small writer: stand-in
classes pickle as torch's globals (fake ``torch`` modules are installed while dumping, since pickle
checks that a global resolves), storages go out as persistent ids and raw bytes, as torch.save
does. Where torch is installed, real torch.save files are checked too.
"""
import collections
import dataclasses
import io
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from uad_jax.models import torch_pickle


def _global(module: str, name: str):
  return type(name, (), {"__module__": module, "__qualname__": name})


REBUILD_V2 = _global("torch._utils", "_rebuild_tensor_v2")
REBUILD_V3 = _global("torch._utils", "_rebuild_tensor_v3")
REBUILD_PARAMETER = _global("torch._utils", "_rebuild_parameter")
STORAGES = {dtype: _global("torch", name) for dtype, name in [
    ("float32", "FloatStorage"), ("float16", "HalfStorage"), ("bfloat16", "BFloat16Storage"),
    ("float64", "DoubleStorage"), ("int64", "LongStorage"), ("bool", "BoolStorage"),
    ("uint8", "ByteStorage")]}
UNTYPED = _global("torch.storage", "UntypedStorage")
UINT16 = _global("torch", "uint16")
_FAKE_GLOBALS = [REBUILD_V2, REBUILD_V3, REBUILD_PARAMETER, UNTYPED, UINT16, *STORAGES.values()]


@dataclasses.dataclass(eq=False)
class Storage:
  """A flat storage; ``values`` are its elements (bfloat16: their uint16 bits)."""
  dtype: str
  values: np.ndarray
  untyped: bool = False   # saved as UntypedStorage bytes, as torch does for uint16


@dataclasses.dataclass
class Tensor:
  """Pickles as torch does a tensor: a rebuild call on a storage, offset, size and stride."""
  storage: Storage
  offset: int
  size: tuple
  stride: tuple
  metadata: dict | None = None

  def __reduce__(self):
    args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
    if self.storage.untyped:
      return REBUILD_V3, args + (UINT16,)
    return REBUILD_V2, args + ((self.metadata,) if self.metadata else ())


@dataclasses.dataclass
class Parameter:
  data: Tensor

  def __reduce__(self):
    return REBUILD_PARAMETER, (self.data, True, collections.OrderedDict())


class _TorchPickler(pickle.Pickler):

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages = {}

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    key = next((k for k, s in self.storages.items() if s is obj), str(len(self.storages)))
    self.storages[key] = obj
    storage_type = UNTYPED if obj.untyped else STORAGES[obj.dtype]
    numel = obj.values.nbytes if obj.untyped else obj.values.size
    return ("storage", storage_type, key, "cpu", numel)


def save(path, obj, byteorder="little"):
  """Writes ``obj`` as torch.save's zip would; ``byteorder=None`` leaves that record out."""
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer)
  fakes = {"torch": types.ModuleType("torch"), "torch._utils": types.ModuleType("torch._utils"),
           "torch.storage": types.ModuleType("torch.storage")}
  for g in _FAKE_GLOBALS:
    setattr(fakes[g.__module__], g.__qualname__, g)
  with pytest.MonkeyPatch.context() as mp:
    for name, module in fakes.items():
      mp.setitem(sys.modules, name, module)
    pickler.dump(obj)
  order = "<" if byteorder in ("little", None) else ">"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("checkpoint/data.pkl", buffer.getvalue())
    archive.writestr("checkpoint/.format_version", "1")
    if byteorder:
      archive.writestr("checkpoint/byteorder", byteorder)
    for key, storage in pickler.storages.items():
      values = storage.values
      archive.writestr(f"checkpoint/data/{key}",
                       values.astype(values.dtype.newbyteorder(order)).tobytes())


def contiguous(dtype: str, x: np.ndarray) -> Tensor:
  strides = [s // x.itemsize for s in x.strides]
  return Tensor(Storage(dtype, x.ravel()), 0, x.shape, tuple(strides))


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
  return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _arrays():
  rng = np.random.default_rng(0)
  return {
      "float32": rng.normal(size=(3, 4)).astype(np.float32),
      "float16": rng.normal(size=(5,)).astype(np.float16),
      "float64": rng.normal(size=(2, 2, 2)),
      "int64": np.array([[-3, 2**40], [7, 0]], np.int64),
      "bool": np.array([True, False, True]),
      "uint8": np.arange(250, 256, dtype=np.uint8),
  }


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_every_dtype_comes_back_exactly(tmp_path, byteorder):
  arrays = _arrays()
  # bfloat16 holds the top 16 bits of a float32: these values are exact in it.
  bf16 = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
  bf16 = (_bfloat16_bits(bf16).astype(np.uint32) << 16).view(np.float32)
  state = {k: contiguous(k, v) for k, v in arrays.items()}
  state["bfloat16"] = contiguous("bfloat16", _bfloat16_bits(bf16))
  state["uint16"] = Tensor(Storage("uint16", np.array([1, 65535, 300], np.uint16), untyped=True),
                           0, (3,), (1,))
  state["negated"] = Tensor(Storage("float32", np.arange(3.0, dtype=np.float32)), 0, (3,), (1,),
                            metadata={"neg": True})
  save(tmp_path / "x.pth", state, byteorder)
  loaded = torch_pickle.load(str(tmp_path / "x.pth"))
  expected = {**arrays, "bfloat16": bf16, "uint16": np.array([1, 65535, 300], np.uint16),
              "negated": -np.arange(3.0, dtype=np.float32)}
  assert loaded.keys() == expected.keys()
  for name, want in expected.items():
    assert loaded[name].dtype == want.dtype.newbyteorder("="), name
    np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_strided_views_of_one_storage(tmp_path):
  base = np.arange(24, dtype=np.float32).reshape(4, 6)
  storage = Storage("float32", base.ravel())
  state = {
      "full": Tensor(storage, 0, (4, 6), (6, 1)),
      "sliced_transposed": Tensor(storage, 1 * 6 + 2, (3, 3), (1, 6)),   # base[1:, 2:5].T
      "column": Tensor(storage, 5, (4,), (6,)),                          # base[:, 5]
      "broadcast": Tensor(storage, 7, (2, 3), (0, 1)),                   # base[1, 1:4] twice
      "empty": Tensor(storage, 24, (0, 3), (3, 1)),
  }
  save(tmp_path / "x.pth", state)
  loaded = torch_pickle.load(str(tmp_path / "x.pth"))
  np.testing.assert_array_equal(loaded["full"], base)
  np.testing.assert_array_equal(loaded["sliced_transposed"], base[1:, 2:5].T)
  np.testing.assert_array_equal(loaded["column"], base[:, 5])
  np.testing.assert_array_equal(loaded["broadcast"], np.stack([base[1, 1:4]] * 2))
  assert loaded["empty"].shape == (0, 3)
  # Copies, not views of the file's bytes: callers may write to them.
  loaded["sliced_transposed"][0, 0] = -1
  assert loaded["sliced_transposed"].flags.c_contiguous


def test_nested_containers_and_parameters(tmp_path):
  weight = np.ones((2, 3), np.float32)
  layers = collections.OrderedDict(fc=Parameter(contiguous("float32", weight)))
  state = {"model": {"layers": layers, "list": [contiguous("int64", np.arange(2))], "step": 7},
           "name": "vit", "shape": (2, 3)}
  save(tmp_path / "x.pth", state)
  loaded = torch_pickle.load(str(tmp_path / "x.pth"))
  assert isinstance(loaded["model"]["layers"], collections.OrderedDict)
  np.testing.assert_array_equal(loaded["model"]["layers"]["fc"], weight)
  np.testing.assert_array_equal(loaded["model"]["list"][0], np.arange(2))
  assert (loaded["model"]["step"], loaded["name"], loaded["shape"]) == (7, "vit", (2, 3))


def test_storage_overruns_and_odd_files_are_refused(tmp_path):
  storage = Storage("float32", np.zeros(4, np.float32))
  save(tmp_path / "over.pth", {"x": Tensor(storage, 2, (2, 2), (2, 1))})
  with pytest.raises(torch_pickle.CheckpointError, match="over.pth.*overruns its storage"):
    torch_pickle.load(str(tmp_path / "over.pth"))
  legacy = tmp_path / "legacy.pth"     # pre-1.6 torch wrote bare pickles
  legacy.write_bytes(pickle.dumps({"x": 1}, protocol=2))
  with pytest.raises(ValueError, match="legacy.pth is not a torch zip.*safetensors"):
    torch_pickle.load(str(legacy))
  with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
    archive.writestr("weights.bin", b"123")
  with pytest.raises(ValueError, match="other.pth: a zip, but not in torch's layout"):
    torch_pickle.load(str(tmp_path / "other.pth"))
  with zipfile.ZipFile(tmp_path / "cut.pth", "w") as archive:
    archive.writestr("a/data.pkl", pickle.dumps({"x": [1, 2]}, protocol=2)[:-5])
  with pytest.raises(ValueError, match="cut.pth: unreadable torch checkpoint"):
    torch_pickle.load(str(tmp_path / "cut.pth"))


def test_real_torch_save_files(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tensors = {
      "float32": torch.randn(3, 4), "float16": torch.randn(5).half(),
      "bfloat16": torch.randn(2, 3).bfloat16(), "float64": torch.randn(2, 2, dtype=torch.float64),
      "int64": torch.tensor([-3, 2**40]), "bool": torch.tensor([True, False]),
      "int32": torch.tensor([1, -2], dtype=torch.int32),
      "uint16": torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16),
      "non_contiguous": torch.randn(4, 6)[1:, 2:5].t(),
      "parameter": torch.nn.Parameter(torch.randn(2, 3)),
      "negated_view": torch.randn(3)._neg_view(),
  }
  assert tensors["non_contiguous"].storage_offset() != 0
  assert not tensors["non_contiguous"].is_contiguous()
  module = torch.nn.Linear(3, 2)
  torch.save({"tensors": tensors, "module": module.state_dict(), "epoch": 3},
             tmp_path / "real.pth")
  loaded = torch_pickle.load(str(tmp_path / "real.pth"))
  for name, t in tensors.items():
    want = t.detach().resolve_neg()
    want = want.float().numpy() if t.dtype == torch.bfloat16 else want.numpy()
    assert loaded["tensors"][name].dtype == want.dtype, name
    np.testing.assert_array_equal(loaded["tensors"][name], want, err_msg=name)
  for name, t in module.state_dict().items():
    np.testing.assert_array_equal(loaded["module"][name], t.numpy())
  assert loaded["epoch"] == 3
