"""Read CompVis LDM / Stable Diffusion checkpoints into a flat state dict, without torch.

`.ckpt` files are torch zip archives, read through the project's restricted unpickler: tensors
and OrderedDicts as for any state dict, and the `pytorch_lightning` classes that Lightning-era
checkpoints reference (a `ModelCheckpoint` class used as a dict key, `AttributeDict` hyper-
parameters, ...) as inert records that hold their arguments and nothing else. Any other global is
refused by name, so nothing in the file runs. `.safetensors` files are read with the
`safetensors` package's numpy API.
"""
import collections
import os
import pickle
import zipfile

import numpy as np

from sfd_jax.io.torch_files import StateDictUnpickler, unpickle_archive
from sfd_jax.io.unpickler import CorruptDataError, RefusedGlobal

_LIGHTNING = ("pytorch_lightning", "lightning")


class InertRecord(dict):
  """Stand-in for a Lightning class: records constructor arguments and pickled state only."""

  qualname = ""

  def __init__(self, *args, **kwargs):  # pylint: disable=super-init-not-called
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"<inert {self.qualname}>"


_RECORD_TYPES = {}


def _inert_type(module: str, name: str) -> type:
  """One inert class per Lightning global (classes are hashable, so they may be dict keys)."""
  key = f"{module}.{name}"
  if key not in _RECORD_TYPES:
    _RECORD_TYPES[key] = type(name, (InertRecord,), {"qualname": key, "__hash__": object.__hash__})
  return _RECORD_TYPES[key]


class CheckpointUnpickler(StateDictUnpickler):
  """A state-dict unpickler that also admits `pytorch_lightning.*` globals as inert records."""

  def find_class(self, module, name):
    if module.split(".")[0] in _LIGHTNING:
      return _inert_type(module, name)
    return super().find_class(module, name)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read (refused, corrupt or not a state dict)."""


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _state_dict_of(obj, path):
  """The flat state dict inside a loaded checkpoint (`{'state_dict': ...}` or the dict itself)."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not obj:
    raise CheckpointError(f"{path}: holds no state dict")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{path}: state-dict entry {bad[0]!r} is not a tensor")
  return collections.OrderedDict(obj)


def read_ckpt(path) -> "collections.OrderedDict[str, np.ndarray]":
  """The state dict of a torch zip-format `.ckpt` (Lightning layout or a bare state dict).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: one line naming `path`: a refused global (named), corrupt data, or no state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f"{path}: not a torch zip-format checkpoint (legacy pre-1.6 torch files are not read)")
  try:
    with zipfile.ZipFile(path) as archive:
      obj = unpickle_archive(archive, CheckpointUnpickler)
  except RefusedGlobal as e:
    raise CheckpointError(f"{path}: refused global {e} (only tensors, OrderedDict and pytorch_lightning "
                          "records are admitted)") from None
  except CorruptDataError as e:
    raise CheckpointError(f"{path}: {_one_line(e)}") from None
  except (EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError,
          AttributeError, IndexError) as e:
    raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {_one_line(e)})") from None
  return _state_dict_of(obj, path)


def read_safetensors(path) -> "collections.OrderedDict[str, np.ndarray]":
  """All tensors of a `.safetensors` file as numpy arrays (no torch).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: one line naming `path` for a truncated or corrupt file.
  """
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    tensors = load_file(path)
  except (SafetensorError, ValueError, OSError, TypeError) as e:
    raise CheckpointError(f"{path}: corrupt .safetensors file ({_one_line(e)})") from None
  return _state_dict_of(dict(tensors), path)


def read_checkpoint(path) -> "collections.OrderedDict[str, np.ndarray]":
  """A `.safetensors` or torch `.ckpt`/`.pt`/`.pth` checkpoint's state dict, chosen by suffix."""
  if os.fspath(path).endswith(".safetensors"):
    return read_safetensors(path)
  return read_ckpt(path)
