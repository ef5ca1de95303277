"""Reads ``torch.save`` checkpoints (the zip format of torch >= 1.6) with numpy alone.

The archive holds one top folder with ``data.pkl``, ``byteorder`` (absent: little-endian) and
``data/<key>``, the raw bytes of each storage. ``data.pkl`` rebuilds tensors by calling
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` on storages it names by
persistent id ``('storage', storage_type, key, location, numel)``.

Only the globals such a file of tensors needs are resolved (the rebuild functions, storage types,
dtypes, ``OrderedDict``); anything else is refused before it runs, so like torch's
``weights_only=True`` this is safe on untrusted files. Tensors come back as numpy arrays of their
dtype, bfloat16 widened to float32 (numpy has no bfloat16).

    state = torch_pickle.load("vit.pth")   # nested dicts/lists of numpy arrays
"""
import collections
import dataclasses
import pickle
import zipfile

import numpy as np

# torch dtype name → numpy dtype of its elements; bfloat16 is held as its uint16 bits.
_DTYPES = {
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2", "complex128": "c16",
    "complex64": "c8", "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1", "uint64": "u8",
    "uint32": "u4", "uint16": "u2", "uint8": "u1", "bool": "?",
}
# Storage classes named as persistent-id storage types → dtype name. New dtypes (uint16, ...) are
# saved as UntypedStorage bytes, their dtype passed to _rebuild_tensor_v3.
_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}
_RESAVE = "re-save it with a recent torch (torch.save) or convert it to .safetensors"


class CheckpointError(ValueError):
  """The file is not a torch zip checkpoint this reader accepts; the message names the file."""


@dataclasses.dataclass(frozen=True)
class _Storage:
  data: memoryview
  dtype: str     # key of _DTYPES
  order: str     # "<" or ">"


def _array(storage: _Storage, dtype: str, offset: int, size, stride, metadata) -> np.ndarray:
  """The tensor viewing ``storage`` (element offset and strides), copied out in native order."""
  if dtype not in _DTYPES:
    raise ValueError(f"unsupported tensor dtype {dtype!r}")
  flat = np.frombuffer(storage.data, np.dtype(_DTYPES[dtype]).newbyteorder(storage.order))
  size, stride = tuple(size), tuple(stride)
  # as_strided reads raw memory: bounds are checked here so a crafted file cannot read past it.
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise ValueError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
  if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(flat):
    raise ValueError(f"tensor {size} at offset {offset}, stride {stride} overruns its storage "
                     f"of {len(flat)} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride],
                                         writeable=False)
  x = np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")
  if dtype == "bfloat16":  # bfloat16 is the top half of a float32
    x = (x.astype(np.uint32) << 16).view(np.float32)
  metadata = dict(metadata or {})
  if metadata.pop("neg", False):  # lazily negated/conjugated views keep their bit here
    x = -x
  if metadata.pop("conj", False):
    x = np.conj(x)
  if metadata:
    raise ValueError(f"unsupported tensor metadata {metadata}")
  return x


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  return _array(storage, storage.dtype, offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  return _array(storage, dtype, offset, size, stride, metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  return data


_CALLABLES = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "torch.Size": tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, path: str, archive: zipfile.ZipFile, folder: str, order: str):
    super().__init__(archive.open(f"{folder}/data.pkl"))
    self._path, self._archive, self._folder, self._order = path, archive, folder, order
    self._storages = {}

  def find_class(self, module, name):
    qualified = f"{module}.{name}"
    if qualified in _CALLABLES:
      return _CALLABLES[qualified]
    # Storage types and dtypes only stand for a dtype name, consumed by persistent_load/v3.
    if module in ("torch", "torch.storage") and name in _STORAGES:
      return _STORAGES[name]
    if module == "torch" and name in _DTYPES:
      return name
    raise CheckpointError(f"{self._path}: refusing the global {qualified} in its pickle; a "
                          "checkpoint of tensors needs only torch's tensor rebuild functions, "
                          "storage types and OrderedDict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and pid[1] in _DTYPES):
      raise CheckpointError(f"{self._path}: unknown persistent id {pid!r} in its pickle")
    _, dtype, key, _, numel = pid
    if key not in self._storages:
      nbytes = numel * np.dtype(_DTYPES[dtype]).itemsize
      data = self._archive.read(f"{self._folder}/data/{key}")
      if len(data) < nbytes:
        raise CheckpointError(f"{self._path}: storage {key} holds {len(data)} bytes, its pickle "
                              f"says {nbytes}")
      self._storages[key] = _Storage(memoryview(data)[:nbytes], dtype, self._order)
    return self._storages[key]


def load(path: str):
  """Reads a ``torch.save`` zip checkpoint into nested dicts/lists of numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f"{path} is not a torch zip checkpoint (torch.save since torch 1.6); "
                          f"if it is an older torch pickle, {_RESAVE}")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: a zip, but not in torch's layout (one top folder holding "
                            f"data.pkl); {_RESAVE}")
    folder = pickles[0].split("/")[0]
    try:
      order = archive.read(f"{folder}/byteorder").decode()
    except KeyError:
      order = "little"
    if order not in ("little", "big"):
      raise CheckpointError(f"{path}: unknown byteorder {order!r}")
    try:
      return _Unpickler(path, archive, folder, "<" if order == "little" else ">").load()
    except CheckpointError:
      raise
    except Exception as e:  # untrusted bytes can fail anywhere in unpickling: say which file
      raise CheckpointError(f"{path}: unreadable torch checkpoint ({type(e).__name__}: {e}); "
                            f"{_RESAVE}") from e
