"""Write and read PyTorch `.pt` state dicts (torch's zip format) without importing torch.

A file written here loads with `torch.load(path, weights_only=True)` and then with an EDM
network's `load_state_dict`. The reader admits only what a saved state dict references
(an OrderedDict, `torch._utils._rebuild_tensor_v2`, torch storage classes); anything else is
refused, so reading an untrusted `.pt` never runs code.
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Mapping

import numpy as np

from sfd_jax.io.unpickler import (STORAGE_DTYPES, TENSOR_GLOBALS, CorruptDataError, RefusedGlobal,
                                 RestrictedUnpickler, StorageType)

_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

_ARCHIVE = "archive"    # Record prefix; torch.load accepts any single top-level folder.
_ALIGNMENT = 64         # torch aligns tensor data records so that files can be mmapped.
_PAD_FIELD_ID = 0x4246  # "FB": the zip extra-field id torch uses for that padding.


class TorchFormatError(ValueError):
  """A `.pt` file cannot be written or read as a plain state dict."""


# ----------------------------------------------------------------------------------------
# Writing. The pickle is emitted opcode by opcode (protocol 2, as torch.save does) because
# the standard pickler can only name globals it can import, and torch must not be imported.


def _op_int(n: int) -> bytes:
  if 0 <= n < 2**8:
    return b"K" + bytes([n])
  if 0 <= n < 2**16:
    return b"M" + n.to_bytes(2, "little")
  if -2**31 <= n < 2**31:
    return b"J" + n.to_bytes(4, "little", signed=True)
  data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data


def _op_str(s: str) -> bytes:
  data = s.encode("utf-8")
  return b"X" + struct.pack("<I", len(data)) + data


def _op_tuple(items) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _op_global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_EMPTY_ORDERED_DICT = _op_global("collections", "OrderedDict") + b")R"


def _tensor_ops(key: str, array: np.ndarray) -> bytes:
  """`_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` for `array`."""
  storage_id = _op_tuple([_op_str("storage"), _op_global("torch", _STORAGE_NAMES[array.dtype]),
                          _op_str(key), _op_str("cpu"), _op_int(array.size)]) + b"Q"
  size = _op_tuple(_op_int(n) for n in array.shape)
  stride = _op_tuple(_op_int(s // array.itemsize) for s in array.strides)
  args = _op_tuple([storage_id, _op_int(0), size, stride, b"\x89", _EMPTY_ORDERED_DICT])
  return _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict_pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
  items = b"".join(_op_str(name) + _tensor_ops(str(i), a) for i, (name, a) in enumerate(arrays.items()))
  return b"\x80\x02" + _EMPTY_ORDERED_DICT + b"(" + items + b"u."


def _as_storable(name, value, path) -> np.ndarray:
  array = np.asarray(value, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d.)
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  if array.dtype not in _STORAGE_NAMES:
    raise TorchFormatError(f"{path}: tensor {name!r} has dtype {array.dtype}, which has no torch storage type")
  return array


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes, offset: int) -> None:
  info = zipfile.ZipInfo(f"{_ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(info.filename.encode())
  pad = -(offset + header + 4) % _ALIGNMENT
  info.extra = struct.pack("<HH", _PAD_FIELD_ID, pad) + b"\0" * pad
  archive.writestr(info, data)


def save_state_dict(state_dict: Mapping[str, np.ndarray], path) -> None:
  """Writes `{name: array}` as a torch zip-format `.pt` state dict, without torch.

  Args:
    state_dict: tensor names (torch naming) to arrays in torch layout (NCHW / OIHW /
      [out, in]); numpy or jax arrays of a dtype torch has a storage for.
    path: the `.pt` file to write (its folder must exist).

  Raises:
    TorchFormatError: a tensor whose dtype torch cannot store.
  """
  path = os.fspath(path)
  arrays = collections.OrderedDict(
      (str(name), _as_storable(name, value, path)) for name, value in state_dict.items())
  records = [("data.pkl", _state_dict_pickle(arrays)), ("byteorder", b"little")]
  records += [(f"data/{i}", a.tobytes()) for i, a in enumerate(arrays.values())]
  records += [("version", b"3\n")]
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
    for name, data in records:
      _write_record(archive, name, data, f.tell())


# ----------------------------------------------------------------------------------------
# Reading.


class StateDictUnpickler(RestrictedUnpickler):
  """Admits only what a saved state dict references; storages come from the zip records."""

  SAFE_GLOBALS = TENSOR_GLOBALS
  STORAGE_TYPES = True

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._storages = {}

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], StorageType)):
      raise CorruptDataError(f"unexpected persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = self._load_storage(str(key), storage_type.dtype, numel)
    return self._storages[key]


def unpickle_archive(archive: zipfile.ZipFile, unpickler_cls):
  """Unpickles a torch zip archive's `data.pkl` with `unpickler_cls(file, load_storage)`, whose
  storages come from the archive's `data/KEY` records (in the archive's byte order).

  Raises:
    CorruptDataError / RefusedGlobal / the unpickler's errors: for the caller to name the file.
  """
  prefix = archive_prefix(archive)
  little = _byteorder(archive, prefix) == "little"

  def load_storage(key, dtype, numel):
    dtype = dtype if little else dtype.newbyteorder(">")
    data = archive.read(f"{prefix}data/{key}")
    if len(data) != numel * dtype.itemsize:
      raise CorruptDataError(f"storage {key} holds {len(data)} bytes, expected {numel * dtype.itemsize}")
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))

  return unpickler_cls(io.BytesIO(archive.read(f"{prefix}data.pkl")), load_storage).load()


def archive_prefix(archive: zipfile.ZipFile) -> str:
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise CorruptDataError("no <archive>/data.pkl record (not a torch zip-format file)")
  return pickles[0][: -len("data.pkl")]


def load_state_dict(path) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a torch zip-format state dict into numpy arrays, without torch.

  Args:
    path: a `.pt` file holding a (possibly ordered) dict of tensors, as written by
      `torch.save(module.state_dict(), path)` or `save_state_dict`.

  Returns:
    Tensor names to numpy arrays, in file order, dtypes as stored.

  Raises:
    FileNotFoundError: no such file.
    TorchFormatError: not a torch zip file, a refused global, or not a dict of tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if not zipfile.is_zipfile(path):
    raise TorchFormatError(f"{path}: not a torch zip-format .pt file")
  try:
    with zipfile.ZipFile(path) as archive:
      result = unpickle_archive(archive, StateDictUnpickler)
  except RefusedGlobal as e:
    raise TorchFormatError(f"{path}: refused global {e} (not part of a state dict)") from None
  except CorruptDataError as e:
    raise TorchFormatError(f"{path}: {e}") from None
  except (EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError) as e:
    raise TorchFormatError(f"{path}: corrupt .pt file ({type(e).__name__}: {e})") from None
  if not isinstance(result, dict) or not all(isinstance(v, np.ndarray) for v in result.values()):
    raise TorchFormatError(f"{path}: does not hold a flat state dict of tensors")
  return collections.OrderedDict(result)


def _byteorder(archive, prefix):
  try:
    return archive.read(f"{prefix}byteorder").decode().strip()
  except KeyError:
    return "little"  # Files from torch < 1.10 have no byteorder record and are little-endian.
