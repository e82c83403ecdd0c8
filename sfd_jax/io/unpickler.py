"""One restricted unpickler for every untrusted weight file sfd_jax reads.

A pickle is a program: the standard unpickler may call any importable function it names.
`RestrictedUnpickler` admits only the globals a subclass lists in `SAFE_GLOBALS`, each mapped
to an inert stand-in, and refuses every other one by name. The tensor stand-ins shared by all
of torch's formats (storage classes, `_rebuild_tensor_v2`, `_rebuild_parameter`) live here.
"""
import collections
import dataclasses
import pickle
from typing import Callable, Mapping, Tuple

import ml_dtypes
import numpy as np

# torch storage classes and the little-endian numpy dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CorruptDataError(Exception):
  """Raised while unpickling malformed data; readers re-raise it naming the file."""


class RefusedGlobal(Exception):
  """Raised when a pickle names a global its reader does not admit (the message is its name)."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  """A torch storage class named in a pickle (`torch.FloatStorage`, ...)."""

  name: str

  @property
  def dtype(self) -> np.dtype:
    return STORAGE_DTYPES[self.name]


def rebuild_tensor(storage: np.ndarray, offset, size, stride) -> np.ndarray:
  """Copies the strided view `(offset, size, stride)` (in elements) out of a 1-D storage.

  Raises:
    CorruptDataError: geometry that is not a valid view of `storage`.
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CorruptDataError("tensor storage is not a torch storage")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or any(not isinstance(v, int) or v < 0 for v in size + stride):
    raise CorruptDataError(f"bad tensor geometry size={size} stride={stride}")
  if not isinstance(offset, int) or offset < 0:
    raise CorruptDataError(f"bad tensor storage offset {offset!r}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CorruptDataError(f"tensor of size {size} reads past its storage of {storage.size} elements")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Training-time flags: irrelevant here.
  return rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise CorruptDataError("parameter data is not a tensor")
  return data


# The globals any pickled torch tensor or state dict references.
TENSOR_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that admits only `SAFE_GLOBALS` (and, if enabled, torch storage classes).

  Subclasses set `SAFE_GLOBALS` ({(module, name): stand-in}) and `STORAGE_TYPES`, and
  override `persistent_load` where their format uses persistent ids.
  """

  SAFE_GLOBALS: Mapping[Tuple[str, str], Callable] = {}
  STORAGE_TYPES = False  # admit `torch.<X>Storage` as `StorageType` stand-ins

  def find_class(self, module, name):
    if self.STORAGE_TYPES and module == "torch" and name.endswith("Storage"):
      if name not in STORAGE_DTYPES:
        raise CorruptDataError(f"unsupported tensor storage type torch.{name} "
                               f"(supported: {', '.join(STORAGE_DTYPES)})")
      return StorageType(name)
    try:
      return self.SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise RefusedGlobal(f"{module}.{name}") from None

  def persistent_load(self, pid):
    raise CorruptDataError(f"unexpected persistent id {pid!r:.80}")
