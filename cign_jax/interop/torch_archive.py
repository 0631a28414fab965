"""Reads PyTorch zip-format files with numpy only (no `import torch`).

A PyTorch zip archive (what `torch.save` has written since PyTorch 1.6, what
PyTorch Lightning writes as `.ckpt`, and what `torch.jit.save` writes) is a zip
file whose records sit under one top-level folder:

- `<name>/data.pkl`: a pickle (protocol 2) of the saved object. Tensors appear
  as calls of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  ...)`, where `storage` is a *persistent id* `('storage', <storage type>,
  <key>, <device>, <numel>)` naming the record `<name>/data/<key>`.
- `<name>/data/<key>`: the raw bytes of each storage, in the byte order given
  by `<name>/byteorder` (little endian when that record is absent).
- TorchScript only: `<name>/constants.pkl` (tensor constants of the code, with
  storages under `<name>/constants/<key>`) and `<name>/code/...` (the Python-like
  source, not needed for the weights). Modules are pickled as instances of
  `__torch__.*` classes whose state is a dict of their attributes (parameters,
  buffers, sub-modules, flags).

This module unpickles those files with a restricted `pickle.Unpickler`: tensor
rebuild functions become numpy builders (honouring storage offset, size and
stride, so views and shared storages come out right; every tensor is returned
as its own contiguous copy), storage classes and dtypes map to numpy dtypes,
a few harmless standard-library and numpy globals are allowed, and every other
class (TorchScript modules, Lightning's `AttributeDict`, pickled `nn.Module`s,
...) becomes a `TorchObject` placeholder that records its constructor arguments,
its `__setstate__` state and any items or list entries. Nothing from the file
is ever imported or executed.

Public API:

- `load(path)`: the object of `data.pkl`, numpy arrays in place of tensors.
- `load_constants(path)`: the tuple of `constants.pkl` (TorchScript), or ().
- `state_dict_from(path, prefix="")`: a flat `{name: np.ndarray}`: the
  `state_dict` entry of a Lightning checkpoint, a plain state dict, or the
  parameters and buffers of a TorchScript module tree under dotted names.
- `flatten_arrays(obj)`: the same flattening, for an object already loaded.
- `is_torch_archive(path)`.

A file that is not a PyTorch zip archive, or is truncated or corrupt, raises a
`ValueError` that names the file.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import datetime
import io
import os
import pickle
import zipfile
from typing import Any, Iterator, Mapping

import ml_dtypes  # bfloat16 / float8 dtypes (a JAX dependency)
import numpy as np
import numpy.dtypes

__all__ = [
    "TorchObject",
    "flatten_arrays",
    "is_torch_archive",
    "load",
    "load_constants",
    "state_dict_from",
]


def _extended_dtype(name: str):
  """bfloat16 / float8 dtypes come from ml_dtypes (a JAX dependency)."""
  return np.dtype(getattr(ml_dtypes, name))


_DTYPE_NAMES = {
    # torch dtype attribute name -> numpy dtype (or ml_dtypes name)
    "float32": np.float32,
    "float": np.float32,
    "float64": np.float64,
    "double": np.float64,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": "bfloat16",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "cfloat": np.complex64,
    "complex128": np.complex128,
    "cdouble": np.complex128,
}

_STORAGE_TYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    # Untyped storages hold bytes; `_rebuild_tensor_v3` passes the dtype.
    "UntypedStorage": "uint8",
}


def _numpy_dtype(torch_name: str) -> np.dtype:
  spec = _DTYPE_NAMES[torch_name]
  if isinstance(spec, str):
    dtype = _extended_dtype(spec)
    if dtype is None:  # pragma: no cover
      raise ValueError(f"dtype torch.{torch_name} needs the ml_dtypes package")
    return dtype
  return np.dtype(spec)


class _TorchDtype:
  """Stands for a pickled `torch.<dtype>`; `.numpy` is the numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    self.numpy = _numpy_dtype(name)

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageType:
  """Stands for a pickled storage class such as `torch.FloatStorage`."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _numpy_dtype(_STORAGE_TYPES[name])

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """A storage read from the archive: a flat numpy array of its elements."""

  def __init__(self, array: np.ndarray, record: str):
    self.array = array
    self.record = record


class TorchObject:
  """Placeholder for a class that this reader does not reconstruct.

  Subclasses are made per pickled class name (`type_name`, e.g.
  `"__torch__.inceptionv3.Conv2dLayer"`). An instance records what the pickle
  gave it: constructor `args`/`kwargs`, the `state` passed to `__setstate__`,
  and `items` / `entries` set by dict- or list-style opcodes.

  `attrs` is the attribute dict (the state when it is a dict, or the dict
  parts of a `(dict, slots)` state); attribute access falls back to it, so a
  TorchScript module's sub-module reads as `obj.layers.conv.weight`.
  """

  type_name = "object"

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    self.args = args
    self.kwargs = kwargs
    self.state = None
    self.items = {}
    self.entries = []
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs  # recorded by __new__

  def __setstate__(self, state):
    self.state = state

  @property
  def attrs(self) -> dict:
    state = self.state
    if isinstance(state, dict):
      return state
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and all(s is None or isinstance(s, dict) for s in state)
    ):
      merged = {}
      for part in state:
        merged.update(part or {})
      return merged
    return {}

  def __getattr__(self, name):
    # Only reached when normal lookup fails; guard the recorded fields so a
    # half-built instance (during unpickling) cannot recurse.
    if name.startswith("__") or name in (
        "args",
        "kwargs",
        "state",
        "items",
        "entries",
    ):
      raise AttributeError(name)
    attrs = self.attrs
    if name in attrs:
      return attrs[name]
    raise AttributeError(f"{self.type_name} has no attribute {name!r}")

  # dict-like and list-like opcodes (SETITEM(S), APPEND(S)).
  def __setitem__(self, key, value):
    self.items[key] = value

  def __getitem__(self, key):
    return self.items[key]

  def append(self, value):
    self.entries.append(value)

  def extend(self, values):
    self.entries.extend(values)

  def __repr__(self):
    keys = list(self.attrs)[:8]
    return f"<TorchObject {self.type_name} attrs={keys}>"


_PLACEHOLDER_TYPES: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
  type_name = f"{module}.{name}"
  cls = _PLACEHOLDER_TYPES.get(type_name)
  if cls is None:
    cls = type(name, (TorchObject,), {"type_name": type_name})
    _PLACEHOLDER_TYPES[type_name] = cls
  return cls


# ---------------------------------------------------------------------------
# Tensor builders.


def _strided_copy(
    storage: _Storage, offset: int, size, stride, dtype: np.dtype | None = None
) -> np.ndarray:
  base = storage.array
  if dtype is not None and dtype != base.dtype:
    base = base.view(dtype)  # an untyped (byte) storage read as `dtype`
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise pickle.UnpicklingError(
        f"tensor size {size} and stride {stride} differ in rank"
    )
  if any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"bad tensor size {size} / stride {stride}")
  if 0 in size:
    return np.empty(size, base.dtype)
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if offset < 0 or last >= base.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reaches past "
        f"its storage {storage.record} of {base.size} elements"
    )
  item = base.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      base[offset:],
      shape=size,
      strides=tuple(st * item for st in stride),
      writeable=False,
  )
  return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor storage is {type(storage)!r}")
  return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    metadata=None,
):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor storage is {type(storage)!r}")
  np_dtype = dtype.numpy if isinstance(dtype, _TorchDtype) else None
  return _strided_copy(storage, storage_offset, size, stride, np_dtype)


def _rebuild_parameter(
    data, requires_grad=None, backward_hooks=None, state=None
):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # a tensor subclass (e.g. Parameter): keep the data
  return func(*args)


def _reconstructor(cls, base, state):
  """copyreg._reconstructor without calling arbitrary constructors."""
  if isinstance(cls, type) and issubclass(cls, TorchObject):
    obj = cls.__new__(cls)
    if state is not None:
      obj.args = (state,)
    return obj
  if base is object:
    return cls.__new__(cls)
  return base.__new__(cls, state)


def _identity(value, *unused):
  del unused
  return value


def _device(*args):
  return ":".join(str(a) for a in args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "range"): range,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_intlist_legacy"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


def _numpy_global(module: str, name: str):
  """The few numpy globals a pickled ndarray / scalar / dtype needs."""
  if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    if name in ("_reconstruct", "scalar"):
      # Here, not at the top: numpy 2 renamed numpy.core, and importing the
      # old name there warns.
      try:
        from numpy._core import multiarray  # pylint: disable=import-outside-toplevel
      except ImportError:  # numpy < 2
        from numpy.core import multiarray  # pylint: disable=import-outside-toplevel
      return getattr(multiarray, name)
  if module == "numpy" and name in ("ndarray", "dtype"):
    return getattr(np, name)
  if module == "numpy.dtypes" and name.endswith("DType"):
    return getattr(numpy.dtypes, name, None)
  if module == "_codecs" and name == "encode":
    return codecs.encode
  return None


class _Unpickler(pickle.Unpickler):
  """Unpickler for one pickle record of a PyTorch archive."""

  def __init__(self, file, archive: "_Archive", storage_dir: str):
    super().__init__(file)
    self._archive = archive
    self._storage_dir = storage_dir
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    # Protocol-2 pickles written by Python 3 name some builtins by their
    # Python 2 modules (`__builtin__.set`); map them back as pickle would.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    fn = _ALLOWED.get((module, name))
    if fn is not None:
      return fn
    if module == "torch":
      if name in _STORAGE_TYPES:
        return _StorageType(name)
      if name in _DTYPE_NAMES:
        return _TorchDtype(name)
    if module.startswith("numpy") or module == "_codecs":
      fn = _numpy_global(module, name)
      if fn is not None:
        return fn
    return _placeholder(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if isinstance(storage_type, _TorchDtype):
      dtype = storage_type.numpy
    elif isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:
      raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
    key = str(key)
    storage = self._storages.get(key)
    if storage is None:
      record = f"{self._storage_dir}/{key}"
      raw = self._archive.read(record)
      if len(raw) % dtype.itemsize:
        raise pickle.UnpicklingError(
            f"storage {record}: {len(raw)} bytes is not a whole number of "
            f"{dtype} elements"
        )
      array = np.frombuffer(raw, dtype=dtype)
      if self._archive.big_endian and dtype.itemsize > 1:
        array = array.byteswap().view(dtype)
      storage = _Storage(array, record)
      self._storages[key] = storage
    needed = int(numel)
    if storage.array.size < needed:
      raise pickle.UnpicklingError(
          f"storage {storage.record} holds {storage.array.size} elements, the "
          f"pickle says {needed}: truncated"
      )
    return storage


class _Archive:
  """A PyTorch zip archive opened for reading."""

  def __init__(self, path):
    self.path = os.fspath(path)
    try:
      self._zip = zipfile.ZipFile(self.path)
    except FileNotFoundError:
      raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
      raise ValueError(self._not_archive_message(str(e))) from e
    names = self._zip.namelist()
    pickles = [
        n
        for n in names
        if n.endswith("data.pkl")
        and n.count("/") == 1
        and n.split("/")[1] == "data.pkl"
    ]
    if len(pickles) != 1:
      self._zip.close()
      found = "no" if not pickles else f"{len(pickles)}"
      raise ValueError(
          f"{self.path}: a zip file but not a PyTorch archive "
          f"({found} top-level '<name>/data.pkl' records)"
      )
    self.prefix = pickles[0].split("/")[0]
    order = f"{self.prefix}/byteorder"
    self.big_endian = False
    if order in names:
      self.big_endian = self.read(order).strip() == b"big"
    self.is_torchscript = f"{self.prefix}/constants.pkl" in names and any(
        n.startswith(f"{self.prefix}/code/") for n in names
    )

  def _not_archive_message(self, detail: str) -> str:
    head = b""
    try:
      with open(self.path, "rb") as f:
        head = f.read(2)
    except OSError:
      pass
    if head == b"\x80\x02" or head[:1] == b"\x80":
      return (
          f"{self.path}: a plain pickle, not a PyTorch zip archive (the "
          "legacy torch.save format, before PyTorch 1.6, is not "
          "supported; re-save it with a recent PyTorch)"
      )
    return (
        f"{self.path}: not a PyTorch zip archive, or truncated/corrupt "
        f"({detail})"
    )

  def has(self, record: str) -> bool:
    try:
      self._zip.getinfo(record)
      return True
    except KeyError:
      return False

  def read(self, record: str) -> bytes:
    try:
      return self._zip.read(record)
    except KeyError as e:
      raise ValueError(
          f"{self.path}: record {record!r} is missing: "
          "truncated or corrupt archive"
      ) from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
      raise ValueError(
          f"{self.path}: cannot read record {record!r} "
          f"(truncated or corrupt archive: {e})"
      ) from e

  def unpickle(self, name: str, storage_dir: str):
    data = self.read(f"{self.prefix}/{name}")
    try:
      return _Unpickler(
          io.BytesIO(data), self, f"{self.prefix}/{storage_dir}"
      ).load()
    except ValueError as e:
      if str(e).startswith(self.path):
        raise
      raise ValueError(f"{self.path}: cannot unpickle {name}: {e}") from e
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        ImportError,
        OverflowError,
        MemoryError,
    ) as e:
      raise ValueError(
          f"{self.path}: cannot unpickle {name} (truncated or "
          f"corrupt archive?): {type(e).__name__}: {e}"
      ) from e

  def close(self):
    self._zip.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def is_torch_archive(path) -> bool:
  """Whether `path` opens as a PyTorch zip archive (checks the layout only)."""
  try:
    with _Archive(path):
      return True
  except (ValueError, OSError):
    return False


def load(path) -> Any:
  """The object saved in `path`, with numpy arrays in place of tensors.

  Works for `torch.save` files (state dicts, nested containers, Lightning
  checkpoints) and TorchScript archives (the module tree as `TorchObject`s).
  Raises ValueError (naming the file) when it is not a PyTorch zip archive or
  is truncated or corrupt; FileNotFoundError when it does not exist.
  """
  with _Archive(path) as archive:
    return archive.unpickle("data.pkl", "data")


def load_constants(path) -> tuple:
  """The tensor constants of a TorchScript archive (`constants.pkl`), or ()."""
  with _Archive(path) as archive:
    if not archive.has(f"{archive.prefix}/constants.pkl"):
      return ()
    return tuple(archive.unpickle("constants.pkl", "constants"))


def _iter_arrays(obj, name: str, seen: set) -> Iterator[tuple[str, np.ndarray]]:
  if isinstance(obj, np.ndarray):
    yield name, obj
    return
  if id(obj) in seen:
    return
  if isinstance(obj, Mapping):
    seen.add(id(obj))
    for key, value in obj.items():
      yield from _iter_arrays(value, _join(name, key), seen)
    return
  if isinstance(obj, TorchObject):
    seen.add(id(obj))
    attrs = obj.attrs
    if "_parameters" in attrs or "_modules" in attrs:
      # A pickled (non-TorchScript) nn.Module: its parameters, buffers and
      # children live in these three dicts.
      for part in ("_parameters", "_buffers", "_modules"):
        value = attrs.get(part)
        if isinstance(value, Mapping):
          for key, sub in value.items():
            yield from _iter_arrays(sub, _join(name, key), seen)
      return
    for key, value in attrs.items():
      yield from _iter_arrays(value, _join(name, key), seen)
    for key, value in obj.items.items():
      yield from _iter_arrays(value, _join(name, key), seen)


def _join(prefix: str, key) -> str:
  return f"{prefix}.{key}" if prefix else str(key)


def flatten_arrays(obj) -> dict[str, np.ndarray]:
  """Every array in `obj` (mappings, TorchScript / pickled modules) by dotted
  name, in pickle order. Lists, tuples and other values are skipped."""
  return dict(_iter_arrays(obj, "", set()))


def state_dict_from(path, prefix: str = "") -> dict[str, np.ndarray]:
  """A flat `{name: array}` dict of the weights saved in `path`.

  - Lightning checkpoint (a dict with a `state_dict` mapping): that mapping.
  - `torch.save(model.state_dict())`: the dict itself (nested mappings are
    joined with dots).
  - TorchScript archive or a pickled module: its module tree flattened to the
    dotted names of its parameters and buffers (and tensor attributes).

  With `prefix` (e.g. "model." or "model"), only names that start with it are
  kept, and it is stripped from them; a prefix without a trailing dot matches
  whole components ("model" keeps "model.x" but not "model_copy.x").
  Raises ValueError when nothing is left.
  """
  obj = load(path)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  flat = flatten_arrays(obj)
  if prefix:
    dotted = prefix if prefix.endswith(".") else prefix + "."
    flat = {
        k[len(dotted) :]: v for k, v in flat.items() if k.startswith(dotted)
    }
  if not flat:
    what = f" under the prefix {prefix!r}" if prefix else ""
    raise ValueError(f"{os.fspath(path)}: no tensors found{what}")
  return flat
