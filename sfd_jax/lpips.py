"""LPIPS (VGG16, v0.1 linear weights) exactly as the official SFD second stage computes it.

The official code calls piq's `LPIPS(replace_pooling=True, reduction='none')` on both images
bilinearly resized to 224x224. That metric, reproduced here as pure JAX (jit-able and
differentiable in the images):

1. x ← (x − mean) / std with ImageNet's mean and std. piq expects images in [0, 1]; SFD
   feeds its [-1, 1] images unchanged. Kept: it defines the paper's numbers.
2. torchvision's VGG16 trunk (13 3x3 convolutions + ReLU) with every max-pool replaced by a
   2x2 average pool (stride 2); features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
3. Each feature map is unit-normalised over channels: f / (‖f‖₂ + 1e-10).
4. d = (f_x − f_y)², weighted per channel by LPIPS v0.1's learned linear layer, averaged
   over the spatial positions, summed over channels and layers: one value per image.

Images are NHWC here; a one-channel batch (the digits demo) is repeated to RGB, since VGG
needs three channels (no official data set is grey, so parity is unaffected).

Weights: `load_params` (from `sfd_jax.io.lpips_weights`, which reads them without running code).
"""
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.io.lpips_weights import (CONV_NAMES, FEATURE_LAYERS, TORCHVISION_INDICES, VGG16,  # noqa: F401
                                      LPIPSWeightsError, load_params)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-10          # piq's feature-normalisation epsilon
RESOLUTION = 224     # the official code resizes both images to 224x224 before LPIPS

# ------------------------------------------------------------------------------------------
# The metric.


def _conv(x, kernel, bias):
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.nn.relu(y + bias)


def _avg_pool(x):
  """torch's AvgPool2d(2, stride 2): odd trailing rows/columns are dropped."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def vgg_features(params, x):
  """The five LPIPS feature maps of the average-pooled VGG16 trunk.

  Args:
    params: from `load_params`.
    x: `[N, H, W, 3]` ImageNet-normalised images.

  Returns:
    A list of five `[N, h, w, C]` ReLU outputs (relu1_2 ... relu5_3).
  """
  features = []
  for layer in VGG16:
    if layer == 'pool':
      x = _avg_pool(x)
      continue
    name = layer[0]
    x = _conv(x, params['vgg'][name]['kernel'], params['vgg'][name]['bias'])
    if name in FEATURE_LAYERS:
      features.append(x)
  return features


def _unit(f):
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


def _to_rgb(x):
  if x.shape[-1] == 1:
    return jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f'lpips: images need 1 or 3 channels, got shape {x.shape}')
  return x


def lpips(params, x, y):
  """piq's `LPIPS(replace_pooling=True, reduction='none')(x, y)` for NHWC batches.

  Args:
    params: from `load_params`.
    x, y: `[N, H, W, C]` images, C 3 (or 1, repeated to RGB); fed as they are (the
      official second stage passes [-1, 1] images where piq documents [0, 1]).

  Returns:
    `[N]` LPIPS distances (dtype of the inputs' computation, float32 for float32 inputs).
  """
  # piq keeps the statistics as float32 tensors and casts them to the input's dtype.
  mean = jnp.asarray(np.float32(IMAGENET_MEAN), x.dtype)
  std = jnp.asarray(np.float32(IMAGENET_STD), x.dtype)
  fx = vgg_features(params, (_to_rgb(x) - mean) / std)
  fy = vgg_features(params, (_to_rgb(y) - mean) / std)
  total = 0.0
  for name, a, b in zip(FEATURE_LAYERS, fx, fy):
    d = (_unit(a) - _unit(b)) ** 2
    total = total + jnp.sum(jnp.mean(d * params['lin'][name], axis=(1, 2)), axis=-1)
  return total


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of torch's bilinear interpolate (align_corners=False, no antialias)."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), i1), frac)
  return m


def resize_bilinear(x, size: int = RESOLUTION):
  """`torch.nn.functional.interpolate(x, size=size, mode='bilinear')` for NHWC `x`."""
  rows = jnp.asarray(_bilinear_matrix(x.shape[1], size), x.dtype)
  cols = jnp.asarray(_bilinear_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def second_stage_lpips(params, out, target):
  """The official second stage's LPIPS term: mean over the batch of LPIPS at 224x224.

  Added to every element of the last interval's L1 map before the sum, so the interval's
  summed loss is Σ|out − target| + out.size · second_stage_lpips(params, out, target).

  Args:
    params: from `load_params`.
    out, target: `[N, H, W, C]` student output and teacher target (computed in at least
      float32, as the official code, whose half-precision network returns float32).

  Returns:
    A scalar.
  """
  dtype = jnp.promote_types(out.dtype, jnp.float32)
  out, target = out.astype(dtype), target.astype(dtype)
  return jnp.mean(lpips(params, resize_bilinear(out), resize_bilinear(target)))
