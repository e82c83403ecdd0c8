"""Reading CLIP weights without running code: a state-dict file to a parameter tree.

`.safetensors` files are read with safetensors' numpy API; `.bin` / `.pt` files (torch's zip
format, e.g. open_clip's `open_clip_pytorch_model.bin`) with the project's restricted
unpickler (`sfd_jax.io.torch_files`). The tree is the state dict split on '.', torch layouts kept.
"""
import os
import pathlib
from typing import Mapping

import numpy as np
from flax import traverse_util

from sfd_jax.io import torch_files


class CLIPWeightsError(ValueError):
  """A CLIP weights file is missing, unreadable, or does not match the model's tensors."""


def read_state_dict(path) -> dict:
  """Tensor name -> numpy array, from a `.safetensors` or a torch zip-format `.bin`/`.pt` file.

  Raises:
    CLIPWeightsError: no such file, or not readable as a state dict (one line naming the file).
  """
  path = pathlib.Path(os.fspath(path))
  if not path.is_file():
    raise CLIPWeightsError(f'{path}: no such file')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file  # an optional dependency, needed only here
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CLIPWeightsError(f'{path}: not a readable safetensors file ({e})') from None
  try:
    return dict(torch_files.load_state_dict(path))
  except torch_files.TorchFormatError as e:
    raise CLIPWeightsError(str(e)) from None


def check_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], source: str,
                     optional=(), spelled: str = '') -> None:
  """Raises `CLIPWeightsError` naming the first missing, unexpected or mis-shaped tensor.

  Args:
    state_dict: name -> array.
    shapes: every expected name -> shape.
    source: the file or description named in the message.
    optional: names that may be present (with any shape checked by the caller) or absent.
    spelled: prepended to names in messages (where they sit in the file).
  """
  for name, shape in shapes.items():
    if name not in state_dict:
      raise CLIPWeightsError(f'{source}: missing tensor {spelled + name!r}')
    if tuple(state_dict[name].shape) != tuple(shape):
      raise CLIPWeightsError(f'{source}: {spelled + name!r} has shape {tuple(state_dict[name].shape)}, '
                             f'the model needs {tuple(shape)}')
  unexpected = [name for name in state_dict if name not in shapes and name not in optional]
  if unexpected:
    raise CLIPWeightsError(f'{source}: unexpected tensor {spelled + unexpected[0]!r} (not part of this model)')


def nest(state_dict: Mapping[str, np.ndarray], dtype=np.float32) -> dict:
  """The state dict split on '.' into nested dicts, floating tensors cast to `dtype`."""
  flat = {tuple(name.split('.')): (np.asarray(v, dtype) if np.issubdtype(v.dtype, np.floating) else np.asarray(v))
          for name, v in state_dict.items()}
  return traverse_util.unflatten_dict(flat)
