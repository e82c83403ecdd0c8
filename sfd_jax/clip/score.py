"""The CLIP score of the official SFD `clip_score.py`, as a library call.

Image i is scored against caption i: `100 · cos(image features, text features)` of open_clip's
ViT-g-14 (`laion2b_s34b_b88k`), features divided by their L2 norm (no epsilon), no clamp at 0,
no logit scale; the reported number is the mean over the pairs.
"""
import functools
import json
import os
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.clip import open_clip_model, preprocess, tokenizer, weights
from sfd_jax.clip.open_clip_model import OpenCLIPConfig

DEFAULT_BATCH = 64  # clip_score.py's batch size


class CLIPScore(NamedTuple):
  """What `clip_score` returns."""
  mean: float         # the number clip_score.py prints
  scores: np.ndarray  # [N] float32, one per image/caption pair


def load_open_clip(path: Union[str, os.PathLike], config=open_clip_model.VIT_G_14):
  """open_clip weights (`open_clip_pytorch_model.bin` or `.safetensors`), read without running code.

  Args:
    path: the weights file; never fetched.
    config: an `OpenCLIPConfig` or an open_clip model-config dict (default: ViT-g-14's).

  Returns:
    `(params, config)`: the float32 parameter tree (state-dict names split on '.'), placed on the
    default device once, and the config.

  Raises:
    CLIPWeightsError: missing file, or a tensor missing, unexpected or of the wrong shape for the
      config (the first one is named).
  """
  if not isinstance(config, OpenCLIPConfig):
    config = OpenCLIPConfig.from_open_clip_json(config)
  state_dict = weights.read_state_dict(path)
  weights.check_state_dict(state_dict, open_clip_model.state_dict_shapes(config), str(path))
  return jax.device_put(weights.nest(state_dict)), config


def read_open_clip_config(path) -> OpenCLIPConfig:
  """Sizes from an open_clip model-config JSON: a plain one (open_clip's `model_configs/ViT-g-14.json`)
  or a Hugging Face `open_clip_config.json` (the same under `model_cfg`).

  Raises:
    CLIPWeightsError: missing or unreadable file, or no `vision_cfg` / `text_cfg` (one line naming it).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except FileNotFoundError:
    raise weights.CLIPWeightsError(f'{path}: no such open_clip config file') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise weights.CLIPWeightsError(f'{path}: not a readable JSON file ({type(e).__name__}: {e})') from None
  cfg = cfg.get('model_cfg', cfg) if isinstance(cfg, dict) else cfg
  try:
    return OpenCLIPConfig.from_open_clip_json(cfg)
  except (KeyError, TypeError, AttributeError) as e:
    raise weights.CLIPWeightsError(f'{path}: not an open_clip model config (needs embed_dim, vision_cfg and '
                                   f'text_cfg; missing {e})') from None


@functools.partial(jax.jit, static_argnums=1)
def image_features(params, config: OpenCLIPConfig, pixels):
  """Jitted `encode_image`: `[N, S, S, 3]` normalised pixels -> `[N, embed_dim]`."""
  return open_clip_model.encode_image(params, config, pixels)


@functools.partial(jax.jit, static_argnums=1)
def text_features(params, config: OpenCLIPConfig, token_ids):
  """Jitted `encode_text`: `[N, 77]` open_clip token ids -> `[N, embed_dim]`."""
  return open_clip_model.encode_text(params, config, token_ids)


def pair_scores(image_feats, text_feats):
  """`100 · Σ(a/‖a‖ · b/‖b‖)` per row: `[N]`."""
  a = image_feats / jnp.linalg.norm(image_feats, axis=-1, keepdims=True)
  b = text_feats / jnp.linalg.norm(text_feats, axis=-1, keepdims=True)
  return 100 * (a * b).sum(-1)


def _padded(array, size):
  """`array` padded with zeros along axis 0 to `size` rows (one compiled shape per batch size)."""
  return np.concatenate([array, np.zeros((size - len(array),) + array.shape[1:], array.dtype)])


def _batch_scores(params, config, images, token_ids, size):
  """Scores of one batch of image/caption pairs, computed padded to `size` rows."""
  pixels = _padded(preprocess.preprocess(images, config.image_size), size)
  scores = pair_scores(image_features(params, config, pixels), text_features(params, config, _padded(token_ids, size)))
  return np.asarray(scores)[:len(images)]


class RunningScore:
  """Scores image batches as they arrive, each image with the caption given beside it.

  The towers run on chunks of a fixed size (the first batch's, at most `batch_size`), the last
  one padded, so every call reuses one compiled program per tower.
  """

  def __init__(self, params, config: OpenCLIPConfig, vocab=None, batch_size: int = DEFAULT_BATCH):
    self.params, self.config, self.vocab, self.batch_size = params, config, vocab, batch_size
    self.size, self.scores = None, []

  def update(self, images, captions) -> np.ndarray:
    """Scores `images[i]` against `captions[i]`; returns this batch's `[n]` scores."""
    if len(images) != len(captions):
      raise ValueError(f'clip score: {len(images)} images but {len(captions)} captions in one batch')
    self.size = self.size or min(self.batch_size, len(images))
    ids = tokenizer.open_clip_tokenize(list(captions), self.vocab, self.config.context_length)
    out = [_batch_scores(self.params, self.config, images[start:start + self.size], ids[start:start + self.size],
                         self.size) for start in range(0, len(images), self.size)]
    self.scores.extend(out)
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def result(self) -> CLIPScore:
    """`CLIPScore(mean over all pairs so far, scores)`; the mean as clip_score.py takes it (sum / N)."""
    scores = np.concatenate(self.scores) if self.scores else np.zeros((0,), np.float32)
    if not len(scores):
      raise ValueError('clip score: no images were scored')
    return CLIPScore(float(scores.astype(np.float64).sum() / len(scores)), scores)


def scores_of_batches(image_batches, captions, params, config, vocab, batch_size) -> CLIPScore:
  """Scores of uint8 image batches (iterable of image lists) paired in order with `captions`.

  Returns:
    `CLIPScore(mean over all pairs, scores)`.
  """
  running, done = RunningScore(params, config, vocab, batch_size), 0
  for images in image_batches:
    running.update(images, captions[done:done + len(images)])
    done += len(images)
  return running.result()


def clip_score(images: Sequence[np.ndarray], captions: Sequence[str], params, config: OpenCLIPConfig,
               vocab: Optional[tokenizer.Vocabulary] = None, batch_size: int = DEFAULT_BATCH) -> CLIPScore:
  """The official CLIP score of images paired with captions (image i with caption i).

  Args:
    images: uint8 arrays `[H, W]` or `[H, W, C]` (any sizes, as loaded from PNGs), or one
      `[N, H, W, C]` uint8 array.
    captions: N strings.
    params, config: from `load_open_clip`.
    vocab: the BPE vocabulary (default: open_clip's installed one).
    batch_size: images per device call (the last batch is padded, its extra rows dropped).

  Returns:
    `CLIPScore(mean, scores)`.
  """
  if len(images) != len(captions) or not len(images):
    raise ValueError(f'clip_score needs as many captions as images (and at least one): '
                     f'{len(images)} images, {len(captions)} captions')
  batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
  return scores_of_batches(batches, captions, params, config, vocab, batch_size)

