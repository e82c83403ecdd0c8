"""open_clip's eval preprocessing, as the official `clip_score.py` applies it to each image.

`ToPILImage` → `Resize(S, bicubic)` of the shorter side → `CenterCrop(S)` → RGB → `ToTensor` →
`Normalize(OpenAI mean, std)`. The input is a PIL image, so the resize is Pillow's own 8-bit
bicubic resampler (uint8 rounding between its horizontal and vertical passes); it runs here on
the host with Pillow itself, which is what makes the crops bit-exact.
"""
from typing import Sequence

import numpy as np
from PIL import Image

OPENAI_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
OPENAI_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}  # torchvision ToPILImage on uint8 channels


def to_pil(image: np.ndarray) -> Image.Image:
  """An `[H, W]` or `[H, W, C]` uint8 array (as sfd-main's image loader returns) as a PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8 arrays, got {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in _MODES:
    raise ValueError(f'images must be [H, W] or [H, W, C] with C in 1..4, got shape {image.shape}')
  mode = _MODES[image.shape[-1]]
  return Image.fromarray(image[:, :, 0] if mode == 'L' else image, mode)


def resized_size(height: int, width: int, size: int):
  """torchvision's `Resize(size)` output `(h, w)`: shorter side to `size`, longer truncated."""
  short, long = min(height, width), max(height, width)
  new_long = int(size * long / short)
  return (size, new_long) if height <= width else (new_long, size)


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize of the shorter side to `size` by Pillow (untouched when already that size)."""
  h, w = resized_size(image.height, image.width, size)
  if (h, w) == (image.height, image.width):
    return image
  return image.resize((w, h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision's `CenterCrop(size)` of an image at least `size` on each side.

  The offsets use Python's `round` (half to even): a 53-wide image is cut from column 10.
  """
  top = int(round((image.height - size) / 2.0))
  left = int(round((image.width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def crop_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """Resize, crop, convert to RGB: `[size, size, 3]` uint8, before normalisation."""
  return np.asarray(center_crop(resize_shortest(to_pil(image), size), size).convert('RGB'))


def normalize(crop: np.ndarray) -> np.ndarray:
  """`ToTensor` then `Normalize`, in float32 in torch's order: `(x / 255 − mean) / std`, HWC."""
  return (crop.astype(np.float32) / np.float32(255) - OPENAI_MEAN) / OPENAI_STD


def preprocess(images: Sequence[np.ndarray], size: int = 224) -> np.ndarray:
  """The eval transform of each image: `[N, size, size, 3]` float32 (NHWC)."""
  return np.stack([normalize(crop_uint8(image, size)) for image in images])
