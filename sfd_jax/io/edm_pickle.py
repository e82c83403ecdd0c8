"""Read NVIDIA EDM snapshot pickles without torch and without running code they carry.

EDM's training loop pickles `dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`
where every network object is stored by `torch_utils.persistence` together with the source of
its module, and every tensor storage is a legacy `torch.save` stream. A pickle is a program:
loading one with the standard unpickler may call any importable function. This module loads
them with an unpickler that admits only the handful of globals such snapshots reference, each
mapped to a harmless stand-in defined here; the embedded module source is dropped unread.
"""
import collections
import dataclasses
import io
import os
import pickle
import struct
from typing import Any

import ml_dtypes
import numpy as np

from sfd_jax.io.unpickler import (TENSOR_GLOBALS, CorruptDataError, RefusedGlobal,
                                 RestrictedUnpickler, StorageType)

KNOWN_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
KNOWN_MODELS = ("SongUNet", "DhariwalUNet")

# Positional constructor arguments shared by all four EDM preconditioners.
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim")

# torch's legacy serialisation header: magic number, then protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Raised by the stand-ins when pickled data do not have the expected shape.
_Malformed = CorruptDataError


class EDMPickleError(ValueError):
  """An EDM snapshot pickle is unreadable, refused or not what it claims to be."""


@dataclasses.dataclass
class EDMSnapshot:
  """The parts of an EDM snapshot pickle that a converter needs, as plain data.

  Attributes:
    path: the file read.
    precond_class: class name of the `ema` network, e.g. 'EDMPrecond'.
    init_kwargs: the network's constructor kwargs (`_init_kwargs`, positional arguments
      named), plain Python values.
    state_dict: torch `state_dict()` of `ema`: torch names and order, torch layouts
      (NCHW / OIHW / [out, in]); floating tensors as float32.
    other: the other snapshot entries (`loss_fn`, `augment_pipe`, `dataset_kwargs`, ...)
      as plain data (persistent objects become {'class_name', 'init_kwargs'}), plus
      'ema_attributes': the scalar attributes of the `ema` object (e.g. sigma_data).
  """

  path: str
  precond_class: str
  init_kwargs: dict
  state_dict: "collections.OrderedDict[str, np.ndarray]"
  other: dict


# ----------------------------------------------------------------------------------------
# Stand-ins for the globals EDM snapshots reference.


@dataclasses.dataclass
class PersistentObject:
  """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` stands for.

  Only the class name and the pickled `__dict__` are kept; `meta['module_src']` is dropped
  without being looked at.
  """

  class_name: str
  state: dict


class ModuleDictStandIn:
  """Takes the place of `torch.nn.ModuleDict`: an object that only records its state."""

  def __init__(self):
    self.state = {}

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {}


def _reconstruct_persistent_obj(meta):
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise _Malformed("persistent object metadata is not of type 'class'")
  class_name, state = meta.get("class_name"), meta.get("state")
  if not isinstance(class_name, str) or not isinstance(state, dict):
    raise _Malformed("persistent object metadata lacks class_name/state")
  return PersistentObject(class_name=class_name, state=state)


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  if not isinstance(spec, str):
    raise _Malformed(f"numpy dtype spec {spec!r} is not a string")
  dtype = np.dtype(spec)
  if dtype.kind not in "biufc":
    raise _Malformed(f"numpy dtype {spec!r} is not numeric")
  return dtype


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise _Malformed("bad numpy scalar")
  return np.frombuffer(data, dtype)[0].item()



# ----------------------------------------------------------------------------------------
# Legacy torch.save streams (one storage each).


class _LegacyUnpickler(RestrictedUnpickler):
  """Reads one record of a legacy storage stream; admits only torch storage classes."""

  STORAGE_TYPES = True

  def __init__(self, file, storages):
    super().__init__(file)
    self._storages = storages

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise _Malformed(f"unexpected persistent id in storage stream: {pid!r:.80}")
    storage_type, key, _, numel = pid[1:5]
    if len(pid) > 5 and pid[5] is not None:
      raise _Malformed("storage views (torch < 1.0 files) are not supported")
    if not isinstance(storage_type, StorageType):
      raise _Malformed(f"unknown storage type {storage_type!r:.80}")
    self._storages[key] = (storage_type.dtype, numel)
    return key


def _load_legacy_storage(payload: bytes) -> np.ndarray:
  """Decodes a `torch.storage._load_from_bytes` payload into a 1-D numpy array."""
  if not isinstance(payload, bytes):
    raise _Malformed("storage payload is not bytes")
  if payload[:2] == b"PK":
    raise _Malformed("zip-format storage payloads are not supported (expected legacy torch.save)")
  stream = io.BytesIO(payload)
  storages = {}

  def record():
    return _LegacyUnpickler(stream, storages).load()

  if record() != _LEGACY_MAGIC:
    raise _Malformed("storage payload lacks torch's legacy magic number")
  if record() != _LEGACY_PROTOCOL:
    raise _Malformed("storage payload has an unknown legacy protocol version")
  sys_info = record()
  little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
  key = record()
  keys = record()
  if key not in storages or not isinstance(keys, list):
    raise _Malformed("storage payload does not describe one storage")
  arrays = {}
  for k in keys:
    dtype, numel = storages[k]
    dtype = dtype if little else dtype.newbyteorder(">")
    (count,) = struct.unpack("<q" if little else ">q", _read_exact(stream, 8))
    if count != numel:
      raise _Malformed(f"storage {k} holds {count} elements, header says {numel}")
    data = _read_exact(stream, count * dtype.itemsize)
    arrays[k] = np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))
  return arrays[key]


def _read_exact(stream, n):
  data = stream.read(n)
  if len(data) != n:
    raise _Malformed("storage payload is truncated")
  return data


def _load_from_bytes(payload):
  return _load_legacy_storage(payload)


# ----------------------------------------------------------------------------------------
# The snapshot unpickler.

SAFE_GLOBALS = {
    **TENSOR_GLOBALS,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictStandIn,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # Name used by numpy >= 2.
    ("numpy", "dtype"): _numpy_dtype,
}


class _SnapshotUnpickler(RestrictedUnpickler):
  """Maps the globals EDM snapshots use to inert stand-ins and refuses all others."""

  SAFE_GLOBALS = SAFE_GLOBALS


def load_snapshot_objects(path) -> Any:
  """Unpickles an EDM snapshot into stand-in objects (no torch, nothing executed).

  Args:
    path: an EDM snapshot `.pkl`.

  Returns:
    The unpickled object (for a snapshot, a dict with key 'ema'); networks are
    `PersistentObject`s, tensors numpy arrays in torch layout.

  Raises:
    FileNotFoundError: no such file.
    EDMPickleError: not a pickle, truncated/corrupt, or a refused global.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(2)
    if head[:2] == b"PK":
      raise EDMPickleError(f"{path}: is a zip archive (a torch.save file?), not an EDM snapshot pickle")
    if len(head) < 2 or head[0] != pickle.PROTO[0]:
      raise EDMPickleError(f"{path}: not a pickle file (no pickle protocol header)")
    f.seek(0)
    try:
      return _SnapshotUnpickler(f).load()
    except RefusedGlobal as e:
      raise EDMPickleError(f"{path}: refused global {e} (not used by EDM snapshots)") from None
    except _Malformed as e:
      raise EDMPickleError(f"{path}: corrupt EDM snapshot: {e}") from None
    except (EOFError, pickle.UnpicklingError) as e:
      raise EDMPickleError(f"{path}: truncated or corrupt pickle ({e or type(e).__name__})") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error,
            MemoryError, RecursionError) as e:
      raise EDMPickleError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _module_state_dict(obj, prefix, out, path):
  """Appends `obj`'s parameters and persistent buffers, then its children's, torch-style."""
  if not isinstance(obj, (PersistentObject, ModuleDictStandIn)):
    raise EDMPickleError(f"{path}: {prefix.rstrip('.') or 'ema'} is not a torch module")
  state = obj.state
  skip = set(state.get("_non_persistent_buffers_set", ()))
  entries = list(state.get("_parameters", {}).items())
  entries += [(k, v) for k, v in state.get("_buffers", {}).items() if k not in skip]
  for name, value in entries:
    if value is None:
      continue
    if not isinstance(value, np.ndarray):
      raise EDMPickleError(f"{path}: {prefix}{name} is not a tensor")
    if value.dtype.kind == "f" or value.dtype == ml_dtypes.bfloat16:
      value = value.astype(np.float32)
    out[prefix + name] = value
  for name, child in state.get("_modules", {}).items():
    if child is not None:
      _module_state_dict(child, f"{prefix}{name}.", out, path)


def _plain(value):
  """Turns unpickled values into plain Python data (persistent objects summarised)."""
  if isinstance(value, PersistentObject):
    return {"class_name": value.class_name,
            "init_kwargs": _plain(value.state.get("_init_kwargs", {}))}
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (str, int, float, bool, bytes)):
    return value
  return f"<{type(value).__name__}>"


def _init_kwargs(ema, path):
  kwargs = dict(ema.state.get("_init_kwargs") or {})
  args = tuple(ema.state.get("_init_args") or ())
  if len(args) > len(_PRECOND_POSITIONAL):
    raise EDMPickleError(f"{path}: ema was built with {len(args)} positional arguments; "
                         f"at most {len(_PRECOND_POSITIONAL)} are understood")
  kwargs.update(zip(_PRECOND_POSITIONAL, args))
  return _plain(kwargs)


def _scalar_attributes(state):
  return {k: v for k, v in state.items()
          if not k.startswith("_") and isinstance(v, (int, float, str)) and k != "training"}


def read_edm_snapshot(path) -> EDMSnapshot:
  """Reads an EDM snapshot pickle without torch and without executing anything from it.

  Args:
    path: an EDM snapshot `.pkl` (training snapshot or released model).

  Returns:
    The `EDMSnapshot`: precond class, constructor kwargs and torch-named state dict.

  Raises:
    FileNotFoundError: no such file.
    EDMPickleError: with a one-line message naming the file, if the file is not a pickle,
      is truncated, names a global EDM snapshots do not use, has no `ema` entry, or `ema`
      is not a known EDM network.
  """
  path = os.fspath(path)
  data = load_snapshot_objects(path)
  if not isinstance(data, dict) or "ema" not in data:
    raise EDMPickleError(f"{path}: no 'ema' entry (not an EDM snapshot)")
  ema = data["ema"]
  if not isinstance(ema, PersistentObject):
    raise EDMPickleError(f"{path}: 'ema' is not an EDM network (found {type(ema).__name__})")
  if ema.class_name not in KNOWN_PRECONDS:
    raise EDMPickleError(f"{path}: unknown network class '{ema.class_name}' for 'ema' "
                         f"(known: {', '.join(KNOWN_PRECONDS)})")
  model = ema.state.get("_modules", {}).get("model")
  if not isinstance(model, PersistentObject):
    raise EDMPickleError(f"{path}: 'ema' ({ema.class_name}) has no EDM 'model' submodule")
  if model.class_name not in KNOWN_MODELS:
    raise EDMPickleError(f"{path}: unknown model class '{model.class_name}' in 'ema.model' "
                         f"(known: {', '.join(KNOWN_MODELS)})")
  state_dict = collections.OrderedDict()
  _module_state_dict(ema, "", state_dict, path)
  other = {k: _plain(v) for k, v in data.items() if k != "ema"}
  other["ema_attributes"] = _plain(_scalar_attributes(ema.state))
  return EDMSnapshot(path=path, precond_class=ema.class_name, init_kwargs=_init_kwargs(ema, path),
                     state_dict=state_dict, other=other)
