"""Writing generated images: EDM's quantisation, PNG files in EDM's folder layout, grids, .npz.

Images arrive NHWC float in [-1, 1] (the sfd_jax convention) and leave as uint8 files; this
module is the boundary where that conversion happens.
"""
import math
import os
import pathlib

import numpy as np
from PIL import Image


def to_uint8(images):
  """EDM's quantisation: clip(x * 127.5 + 128, 0, 255) truncated to uint8, in float32.

  Args:
    images: `[..., H, W, C]` floats, nominally in [-1, 1].

  Returns:
    uint8 array of the same shape.
  """
  x = np.asarray(images, np.float32) * np.float32(127.5) + np.float32(128)
  return np.clip(x, 0, 255).astype(np.uint8)


def seed_path(outdir, seed):
  """EDM's layout: one subfolder per 1000 seeds, `outdir/001000/001234.png`."""
  return pathlib.Path(outdir) / f'{seed - seed % 1000:06d}' / f'{seed:06d}.png'


def _pil(image):
  """`[H, W, C]` uint8 → PIL image: grayscale for 1 channel, RGB for 3."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise ValueError(f'image: need uint8 [H, W, 1 or 3], got {image.dtype} {list(image.shape)}')
  return Image.fromarray(image[..., 0], 'L') if image.shape[-1] == 1 else Image.fromarray(image, 'RGB')


def save_png(path, image):
  """Writes one `[H, W, C]` uint8 image as PNG, creating the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _pil(image).save(path)


def save_seed_images(outdir, seeds, images):
  """Writes `images[i]` (uint8 NHWC) to `seed_path(outdir, seeds[i])`."""
  for seed, image in zip(seeds, images):
    save_png(seed_path(outdir, int(seed)), image)


def make_grid(images, num_cols=None):
  """Tiles uint8 NHWC images row by row into one `[rows*H, cols*W, C]` image (black padding).

  Args:
    images: `[N, H, W, C]` uint8.
    num_cols: images per row; default ceil(sqrt(N)).
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  num_cols = num_cols or max(1, math.ceil(math.sqrt(n)))
  num_rows = math.ceil(n / num_cols)
  padded = np.zeros((num_rows * num_cols, h, w, c), images.dtype)
  padded[:n] = images
  grid = padded.reshape(num_rows, num_cols, h, w, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(num_rows * h, num_cols * w, c)


def save_grid(path, images, num_cols=None):
  """Writes `make_grid(images, num_cols)` as a PNG."""
  save_png(path, make_grid(images, num_cols))


def save_npz(path, images, seeds, class_labels=None):
  """One `.npz` file: `arr_0` uint8 NHWC images (the ADM evaluator's key), `seeds`, and
  `class_labels` (class indices) for conditional models."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {'arr_0': np.asarray(images, np.uint8), 'seeds': np.asarray(seeds, np.int64)}
  if class_labels is not None:
    arrays['class_labels'] = np.asarray(class_labels, np.int64)
  np.savez(os.fspath(path), **arrays)
