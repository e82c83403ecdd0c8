"""The demo data set: scikit-learn's bundled 8x8 handwritten digits as NHWC images in [-1, 1].

The digits (1,797 images, 10 classes, grey levels 0..16) ship inside scikit-learn, so the
demo teacher can be trained and evaluated with nothing downloaded.
"""
import numpy as np
from sklearn.datasets import load_digits

NUM_IMAGES = 1797
NUM_CLASSES = 10
MAX_GREY = 16.0
SUPPORTED_RESOLUTIONS = (8, 16)


def load_digits_images(resolution=8):
  """Loads the digits as float32 NHWC images.

  Args:
    resolution: 8 keeps the native images; 16 doubles every pixel (nearest neighbour),
      so the 16x16 set holds exactly the same information.

  Returns:
    (images, labels): float32 `[1797, resolution, resolution, 1]` with values
    `grey / 8 - 1` in [-1, 1], and int32 `[1797]` class labels 0..9.

  Raises:
    ValueError: if `resolution` is not 8 or 16.
  """
  if resolution not in SUPPORTED_RESOLUTIONS:
    raise ValueError(f'data.resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution!r}')
  digits = load_digits()
  images = digits.images.astype(np.float32) * (2.0 / MAX_GREY) - 1.0
  factor = resolution // 8
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  return images[..., None], digits.target.astype(np.int32)


def to_native(images):
  """Brings NHWC digit images of resolution 8 or 16 back to 8x8 by 2x2 average pooling.

  Args:
    images: `[N, R, R, 1]` with R in (8, 16).

  Returns:
    `[N, 8, 8, 1]` float array.
  """
  images = np.asarray(images)
  resolution = images.shape[1]
  if resolution not in SUPPORTED_RESOLUTIONS or images.shape[2] != resolution:
    raise ValueError(f'digit images must be 8x8 or 16x16 NHWC, got shape {images.shape}')
  factor = resolution // 8
  n = images.shape[0]
  pooled = images.reshape(n, 8, factor, 8, factor, images.shape[3]).mean(axis=(2, 4))
  return pooled
