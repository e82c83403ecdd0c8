"""Image sources for FID, read as EDM's `ImageFolderDataset` reads them, as uint8 NHWC batches.

A source is an image folder (recursive), an EDM dataset zip (`dataset_tool.py` layout), an
`.npz` of samples (`arr_0` uint8 NHWC, as `sfd_jax.sample --npz` writes), or `tfds:NAME`
(`tfds:NAME:SPLIT`, from an already prepared TFDS data dir; needs tensorflow-datasets).
"""
import dataclasses
import io
import os
import zipfile
from typing import Callable

import numpy as np
from PIL import Image


class SourceError(ValueError):
  """An image source or one of its images cannot be read."""


@dataclasses.dataclass
class Source:
  """`count` images that `load(indices)` returns as uint8 `[n, H, W, C]`."""

  name: str
  count: int
  load: Callable


def _image_extensions():
  Image.init()
  return {ext.lower() for ext in Image.registered_extensions()}


def _decode(data, where):
  """EDM's decoding: `np.array(PIL.Image.open(f))`, HW -> HW1; only 1 or 3 channels."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      image = np.array(im)
  except Exception as e:  # PIL raises many types for broken files. pylint: disable=broad-except
    raise SourceError(f'{where}: unreadable image ({type(e).__name__}: {e})') from None
  if image.ndim == 2:
    image = image[:, :, None]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise SourceError(f'{where}: need an 8-bit grey or RGB image, got {image.dtype} {list(image.shape)}')
  return image


def _stack(images, names):
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    first = images[0].shape
    bad, shape = next((n, im.shape) for n, im in zip(names, images) if im.shape != first)
    raise SourceError(f'{bad}: image of shape {list(shape)} among images of shape {list(first)} '
                      '(all images must have one size)')
  return np.stack(images)


def _files_source(path, names, read, label):
  def load(indices):
    picked = [names[i] for i in indices]
    return _stack([_decode(read(n), label(n)) for n in picked], [label(n) for n in picked])
  return Source(path, len(names), load)


def _folder(path):
  exts = _image_extensions()
  names = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path)
                 for f in files if os.path.splitext(f)[1].lower() in exts)
  if not names:
    raise SourceError(f'{path}: no image files found')

  def read(name):
    with open(os.path.join(path, name), 'rb') as f:
      return f.read()

  return _files_source(path, names, read, lambda n: os.path.join(path, n))


def _zip(path):
  exts = _image_extensions()
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise SourceError(f'{path}: not a readable zip ({e})') from None
  names = sorted(n for n in archive.namelist() if os.path.splitext(n)[1].lower() in exts)
  if not names:
    raise SourceError(f'{path}: no image files found in the zip')
  return _files_source(path, names, archive.read, lambda n: f'{path}:{n}')


def _npz(path):
  try:
    data = np.load(path, allow_pickle=False)
    images = data['arr_0']
  except KeyError:
    raise SourceError(f'{path}: no arr_0 (uint8 NHWC images) in the .npz') from None
  except (OSError, ValueError) as e:
    raise SourceError(f'{path}: not a readable .npz ({e})') from None
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise SourceError(f'{path}: arr_0 must be uint8 [N, H, W, 1 or 3], got {images.dtype} {list(images.shape)}')
  return Source(path, len(images), lambda idx: images[np.asarray(idx, np.int64)])


def _tfds(spec, data_dir=None):
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[1]:
    raise SourceError(f'{spec}: expected tfds:NAME or tfds:NAME:SPLIT')
  name, split = parts[1], parts[2] if len(parts) == 3 else 'train'
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SourceError(f'{spec}: needs tensorflow-datasets (pip install "sfd_jax[data]")') from None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises assorted types for a missing data dir. pylint: disable=broad-except
    raise SourceError(f'{spec}: not prepared in the TFDS data dir {data_dir or "(default)"} '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None

  def load(indices):
    images = [np.asarray(ds[int(i)]['image']) for i in indices]
    images = [im[:, :, None] if im.ndim == 2 else im for im in images]
    return _stack(images, [f'{spec}[{int(i)}]' for i in indices])

  return Source(spec, len(ds), load)


def open_source(path, tfds_data_dir=None):
  """Opens an image folder, EDM zip, `.npz` of samples, or `tfds:NAME[:SPLIT]`.

  Raises:
    FileNotFoundError: no such path.
    SourceError: one line naming the path if it holds no readable images.
  """
  path = os.fspath(path)
  if path.startswith('tfds:'):
    return _tfds(path, tfds_data_dir)
  if os.path.isdir(path):
    return _folder(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file or directory')
  if path.lower().endswith('.npz'):
    return _npz(path)
  if zipfile.is_zipfile(path):
    return _zip(path)
  raise SourceError(f'{path}: not an image folder, zip, .npz or tfds:NAME')


def subset(count, num=None, seed=0):
  """EDM's `max_size` selection: all indices, or a sorted random `num` of them (RandomState(seed))."""
  idx = np.arange(count)
  if num is not None and count > num:
    np.random.RandomState(seed).shuffle(idx)
    idx = np.sort(idx[:num])
  return idx
