"""A frozen latent teacher: `load_latent_teacher(path, arch)` → `LatentTeacher`.

The teacher runs with the LitEma weights when the checkpoint has them (the official teacher
denoises inside `ema_scope()`); `raw_params` are the trained weights a student starts from.
A Stable Diffusion teacher also encodes prompts with its frozen CLIP text encoder (`encode_text`).
"""
import dataclasses
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from sfd_jax.clip import sd_text_encoder
from sfd_jax.clip import tokenizer as clip_tokenizer
from sfd_jax.io import latent_converted
from sfd_jax.io.ldm_checkpoint import read_checkpoint
from sfd_jax.latent.config import PRESETS, LatentConfig, resolve_arch
from sfd_jax.latent.model import make_decode, make_denoise
from sfd_jax.latent.student import make_tokenize
from sfd_jax.latent.state_dict import state_dict_to_variables
from sfd_jax.latent.vp import VPDiscrete


@dataclasses.dataclass(frozen=True)
class LatentTeacher:
  """A latent diffusion teacher.

  Attributes:
    config: the architecture.
    params: the teacher's variables (LitEma weights if the checkpoint has them, else raw).
    raw_params: the checkpoint's raw (trained) weights: the student's starting point.
    denoise: `denoise(params, x, sigma, condition=None, step_condition=None, *, uncondition=None,
      guidance=None)`: CFGPrecond's D(x; sigma) on NHWC latents (see `model.make_denoise`).
    decode: `decode(params, z)`: NHWC latents → NHWC images in about [-1, 1], unclamped.
    vp: the discrete VP table (sigma, sigma_inv).
    sigma_min: the official sampling sigma_min (LDM 0.006, SD 0.1).
    sigma_max: sigma(1), float32 as the official code computes it.
    source: the checkpoint path.
    has_ema: whether the checkpoint held LitEma shadows.
  """

  config: LatentConfig
  params: dict
  raw_params: dict
  denoise: Callable
  decode: Callable
  vp: VPDiscrete
  sigma_min: float
  sigma_max: float
  source: str
  has_ema: bool = False

  def denoiser_variables(self) -> dict:
    """The part of `params` that `denoise` reads: the UNet (`params['model']`), without the first
    stage or the text encoder (for SD about 0.6 GB that a training step need not hold)."""
    return {"params": {"model": self.params["params"]["model"]}}

  def text_encoder_variables(self) -> dict:
    """The part of `params` that `encode_tokens` reads: SD's text encoder (`cond_stage_model`)."""
    return {"params": {"cond_stage_model": self.params["params"]["cond_stage_model"]}}

  def sigma(self, t):
    """sigma(t) (traced, float32)."""
    return self.vp.sigma_jnp(t)

  def sigma_inv(self, sigma):
    """sigma_inv(sigma) (traced, float32)."""
    return self.vp.sigma_inv_jnp(sigma)

  def _text_config(self):
    if self.config.text_encoder is None:
      raise ValueError(f"{self.source}: this teacher has no text encoder (its config has no FrozenCLIPEmbedder)")
    return self.config.text_encoder

  def tokenize(self, prompts: Sequence[str], tokenizer=None) -> np.ndarray:
    """SD's token ids of `prompts` (`FrozenCLIPEmbedder`'s tokenizer, on the host).

    Args:
      prompts: the texts (a single string is one prompt).
      tokenizer: None (the vocabulary in the installed open_clip_torch wheel), a tokenizer folder
        (`vocab.json` + `merges.txt`, e.g. a diffusers SD download's `tokenizer/`) or a
        `clip.tokenizer.Vocabulary`.

    Returns:
      `[B, 77]` int32 ids, padded with `<|endoftext|>`.

    Raises:
      VocabularyError: no vocabulary (one line naming the file or how to install it).
    """
    self._text_config()
    vocab = tokenizer if tokenizer is None or isinstance(tokenizer, clip_tokenizer.Vocabulary) else (
        clip_tokenizer.load_vocabulary(tokenizer))
    return make_tokenize(self.config, vocab)([prompts] if isinstance(prompts, str) else prompts)

  def encode_tokens(self, params, token_ids):
    """The text encoder on `[B, 77]` ids → `[B, 77, D]` float32 (pure, jit-able)."""
    config = self._text_config()
    return sd_text_encoder.encode(params["params"]["cond_stage_model"]["transformer"]["text_model"], config, token_ids)

  def encode_text(self, params, prompts: Sequence[str], tokenizer=None):
    """SD's `get_learned_conditioning(prompts)`: `[B, 77, D]` float32 CLIP `last_hidden_state`.

    Args:
      params: the teacher's variables (`teacher.params`).
      prompts: the texts; `""` gives the unconditional condition.
      tokenizer: see `tokenize`.
    """
    config = self._text_config()
    return sd_text_encoder.encode_jit(params["params"]["cond_stage_model"]["transformer"]["text_model"], config,
                                      self.tokenize(prompts, tokenizer))


def build_teacher(config: LatentConfig, state_dict, source: str = "<state dict>", guidance_rate: float = 1.0,
                  rng=None) -> LatentTeacher:
  """A `LatentTeacher` from a state dict already in memory (see `state_dict_to_variables`)."""
  raw, ema = state_dict_to_variables(config, state_dict, rng, source=source)
  vp = VPDiscrete.from_alphas_cumprod(raw["buffers"]["alphas_cumprod"])
  return LatentTeacher(config=config, params=ema if ema is not None else raw, raw_params=raw,
                       denoise=make_denoise(config, vp, guidance_rate), decode=make_decode(config), vp=vp,
                       sigma_min=config.sigma_min, sigma_max=float(vp.sigma_np(1.0)), source=source,
                       has_ema=ema is not None)


def read_latent_teacher(path, arch=None) -> tuple:
  """(config, state_dict) of an LDM / SD checkpoint with architecture `arch`, or of a converted
  latent-teacher directory (which names its own architecture; `arch` must then be None)."""
  path = os.fspath(path)
  if os.path.isdir(path) and latent_converted.is_latent_converted(path):
    if arch is not None:
      raise ValueError(f"{path}: a converted latent teacher names its own architecture; drop arch={arch!r}")
    return latent_converted.load_latent_converted(path)
  if arch is None:
    raise ValueError(f"{path}: an LDM / SD checkpoint needs arch (a preset: {', '.join(sorted(PRESETS))}, "
                     "or an LDM yaml path)")
  return resolve_arch(arch), read_checkpoint(path)


def load_latent_teacher(path, arch=None, guidance_rate: float = 1.0, rng: Optional[object] = None) -> LatentTeacher:
  """Loads an LDM / SD checkpoint (`.ckpt` or `.safetensors`) with the architecture `arch`, or a
  converted latent-teacher directory.

  Args:
    path: the checkpoint or converted directory.
    arch: a preset name (`ldm-lsun-bedroom`, `ldm-ffhq`, `sd-v1`), an LDM yaml path or a
      `LatentConfig`; None for a converted directory.
    guidance_rate: the default classifier-free guidance of `denoise` (1: conditional only).
    rng: key for step-condition layers the checkpoint lacks (default key 0).

  Raises:
    FileNotFoundError: no such checkpoint, directory or yaml.
    ValueError: one line: unknown preset, refused/corrupt file, or a state dict not fitting `arch`.
  """
  config, state_dict = read_latent_teacher(path, arch)
  return build_teacher(config, state_dict, source=os.fspath(path), guidance_rate=guidance_rate, rng=rng)


def convert_latent_teacher(src, dst, arch=None) -> str:
  """Converts an LDM / SD checkpoint (or converted directory) into a new converted directory;
  returns a one-line description."""
  config, state_dict = read_latent_teacher(src, arch)
  raw, ema = state_dict_to_variables(config, state_dict, source=os.fspath(src))
  latent_converted.save_latent_converted(dst, config, raw, ema)
  unet = raw["params"]["model"]["diffusion_model"]
  count = sum(int(leaf.size) for leaf in jax.tree.leaves(unet))
  return f"wrote {dst} (latent teacher, UNet {count:,} parameters{', with LitEma weights' if ema else ''})"
