"""piq's LPIPS built offline with given weights: the reference for sfd_jax.lpips (tests only).

PyPI's torchvision 0.28.0 (the release paired with torch 2.13.0) is a CUDA build: beside the
CPU torch its C extension cannot load, and `import torchvision` then fails while registering
fake kernels for the missing `torchvision::nms` & co. The LPIPS reference needs only the
pure-Python `torchvision.models.vgg16`, so when that import fails the one module doing those
registrations is replaced by an empty one and the import is retried.
"""
import sys
import types

import numpy as np

from conftest import torch


def import_piq():
  """Imports piq (and torchvision), working around the CUDA-only torchvision extension."""
  try:
    import torchvision  # noqa: F401
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
    import torchvision  # noqa: F401
  import piq
  return piq


def piq_lpips(params, monkeypatch, dtype=None):
  """piq.LPIPS(replace_pooling=True, reduction='none') with `params` (sfd_jax.lpips layout).

  piq would download torchvision's VGG16 and its LPIPS weights; both loaders are replaced
  (through pytest's monkeypatch) by ones handing over these weights. dtype: torch's, float32 if None.
  """
  dtype = torch.float32 if dtype is None else dtype
  piq = import_piq()
  import torchvision
  from sfd_jax import lpips as lpips_lib

  def vgg16(*args, **kwargs):
    model = torchvision.models.vgg16(weights=None)
    state = {}
    for index, name in zip(lpips_lib.TORCHVISION_INDICES, lpips_lib.CONV_NAMES):
      state[f'features.{index}.weight'] = torch.from_numpy(
          np.ascontiguousarray(params['vgg'][name]['kernel'].transpose(3, 2, 0, 1)))
      state[f'features.{index}.bias'] = torch.from_numpy(params['vgg'][name]['bias'])
    model.features.load_state_dict(
        {k[len('features.'):]: v for k, v in state.items()})
    return model

  lin = [torch.from_numpy(params['lin'][name]).reshape(1, -1, 1, 1) for name in lpips_lib.FEATURE_LAYERS]
  monkeypatch.setattr(piq.perceptual, 'vgg16', vgg16)
  monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda *a, **k: lin)
  metric = piq.LPIPS(replace_pooling=True, reduction='none')
  metric.weights = [w.to(dtype) for w in metric.weights]
  return metric.to(dtype)
