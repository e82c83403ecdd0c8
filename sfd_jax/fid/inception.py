"""Inception-v3 of TensorFlow's 2015-12-05 graph as a Flax module, with EDM's input handling.

This is the network behind FID in EDM's `fid.py` (its `inception-2015-12-05.pkl` detector):
uint8 images of any size, grey repeated to RGB, resized to 299x299 with the old TF
ResizeBilinear (source pixel `j * in / out`, edge pixels repeated; no half-pixel centres),
normalised as `(x - 128) / 128`, then the graph's 94 conv+BN+ReLU layers and the 2048-d
average pool ("pool_3"). Layer names are the graph's (`mixed_4.tower_1.conv_2`), weights keep
torch's OIHW layout (`sfd_jax.fid.weights` reads them), activations are NHWC float32.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

RESOLUTION = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3  # The TF graph's batch-norm epsilon.
_HIGHEST = lax.Precision.HIGHEST  # Full float32 on GPU/TPU too (no TF32 / bf16 passes).


def _kaiming(key, shape):
  fan_in = int(np.prod(shape[1:]))
  return jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in)


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU, as the graph's conv layers.

  Params: `weight` OIHW, `beta`, `mean`, `var`, `gamma` (ones in the 2015-12-05 graph).
  """

  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  same: bool = True  # TF 'SAME' (k // 2 each side; only used at stride 1) or 'VALID'.

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    w = self.param('weight', _kaiming, (self.features, x.shape[-1], kh, kw))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    gamma = self.param('gamma', nn.initializers.ones, (self.features,))
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
    y = lax.conv_general_dilated(x, jnp.transpose(w, (2, 3, 1, 0)), (self.stride, self.stride), pad,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
    scale = gamma * lax.rsqrt(var + _BN_EPS)
    return nn.relu(y * scale + (beta - mean * scale))


def _max_pool(x, stride=2, padding='VALID'):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


def _avg_pool_same(x):
  """3x3 stride-1 average pool, TF 'SAME': padded pixels are not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, conv_2, ... (optionally after a pool)."""

  layers: tuple  # (features, kernel, stride, same) per conv.
  pool: str = ''  # '' | 'avg': 3x3 SAME average pool first (the graph's tower_2).

  @nn.compact
  def __call__(self, x):
    if self.pool == 'avg':
      x = _avg_pool_same(x)
    for i, (features, kernel, stride, same) in enumerate(self.layers):
      x = ConvBN(features, kernel, stride, same, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


def _conv(features, kernel=(1, 1), stride=1, same=True):
  return (features, kernel, stride, same)


class InceptionA(nn.Module):
  """mixed, mixed_1, mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, name='conv')(x),
        Tower((_conv(48), _conv(64, (5, 5))), name='tower')(x),
        Tower((_conv(64), _conv(96, (3, 3)), _conv(96, (3, 3))), name='tower_1')(x),
        Tower((_conv(self.pool_features),), pool='avg', name='tower_2')(x)], axis=-1)


class InceptionB(nn.Module):
  """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, False, name='conv')(x),
        Tower((_conv(64), _conv(96, (3, 3)), _conv(96, (3, 3), 2, False)), name='tower')(x),
        _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7: factorised 7x7 towers of width `c7`."""

  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    return jnp.concatenate([
        ConvBN(192, name='conv')(x),
        Tower((_conv(c7), _conv(c7, (1, 7)), _conv(192, (7, 1))), name='tower')(x),
        Tower((_conv(c7), _conv(c7, (7, 1)), _conv(c7, (1, 7)), _conv(c7, (7, 1)),
               _conv(192, (1, 7))), name='tower_1')(x),
        Tower((_conv(192),), pool='avg', name='tower_2')(x)], axis=-1)


class InceptionD(nn.Module):
  """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower((_conv(192), _conv(320, (3, 3), 2, False)), name='tower')(x),
        Tower((_conv(192), _conv(192, (1, 7)), _conv(192, (7, 1)), _conv(192, (3, 3), 2, False)),
              name='tower_1')(x),
        _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """mixed_9 (avg pool branch) and mixed_10 (max pool branch, as in the graph)."""

  pool: str

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, name='tower_conv')(x)
    b = ConvBN(448, name='tower_1_conv')(x)
    b = ConvBN(384, (3, 3), name='tower_1_conv_1')(b)
    pooled = _avg_pool_same(x) if self.pool == 'avg' else _max_pool(x, 1, ((1, 1), (1, 1)))
    return jnp.concatenate([
        ConvBN(320, name='conv')(x),
        ConvBN(384, (1, 3), name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), name='tower_1_mixed_conv_1')(b),
        ConvBN(192, name='tower_2_conv')(pooled)], axis=-1)


class InceptionV3(nn.Module):
  """The 2015-12-05 graph from its normalised input to the 2048-d pool features.

  Input: `[N, H, W, 3]` float32 in [-1, 1) (299x299 for the real features); output `[N, 2048]`.
  """

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), 2, False, name='conv')(x)
    x = ConvBN(32, (3, 3), 1, False, name='conv_1')(x)
    x = ConvBN(64, (3, 3), name='conv_2')(x)
    x = _max_pool(x)
    x = ConvBN(80, name='conv_3')(x)
    x = ConvBN(192, (3, 3), 1, False, name='conv_4')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='mixed')(x)
    x = InceptionA(64, name='mixed_1')(x)
    x = InceptionA(64, name='mixed_2')(x)
    x = InceptionB(name='mixed_3')(x)
    for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(c7, name=f'mixed_{i}')(x)
    x = InceptionD(name='mixed_8')(x)
    x = InceptionE('avg', name='mixed_9')(x)
    x = InceptionE('max', name='mixed_10')(x)
    return jnp.mean(x, axis=(1, 2))  # pool_3: the 8x8 average pool at 299x299.


# ----------------------------------------------------------------------------------------
# EDM's input handling.


@functools.lru_cache(maxsize=None)
def resize_matrix(in_size, out_size=RESOLUTION):
  """`[out, in]` float32 weights of TF's old ResizeBilinear along one axis.

  Output pixel j reads source position `j * in / out` (align_corners=False, no half-pixel
  offset), interpolating linearly between its two neighbours and repeating the last pixel.
  This is what EDM's detector does with `affine_grid` + `grid_sample(padding_mode='border')`.
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images, resolution=RESOLUTION):
  """uint8 `[N, H, W, 1 or 3]` -> the network's input `[N, res, res, 3]` float32.

  Grey is repeated to RGB, the image resized with `resize_matrix` (skipped at the target
  size, where it is the identity), then normalised to `(x - 128) / 128`.
  """
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1:3]
  if (h, w) != (resolution, resolution):
    x = jnp.einsum('ph,nhwc->npwc', resize_matrix(h, resolution), x, precision=_HIGHEST)
    x = jnp.einsum('qw,npwc->npqc', resize_matrix(w, resolution), x, precision=_HIGHEST)
  return (x - 128) / 128
