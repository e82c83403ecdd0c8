"""The SFD student of a latent teacher: its variables, denoiser, decoder and VP table.

A student trains only the UNet (`params: {'model': {'diffusion_model': ...}}`, step-condition
layers included); everything else of the teacher's raw variables (the first stage, the DDPM
table `alphas_cumprod`) rides along as never-trained `buffers`, so a student checkpoint alone
samples and decodes. Params and buffers together flatten to the checkpoint's state-dict names.
"""
from typing import Callable

import numpy as np

from sfd_jax.latent.config import LatentConfig
from sfd_jax.latent.model import make_decode, make_denoise
from sfd_jax.latent.vp import VPDiscrete


def student_variables(raw: dict) -> dict:
  """A teacher's raw variables → the student's: the UNet as params, the rest as buffers."""
  params = raw["params"]
  frozen = {name: tree for name, tree in params.items() if name != "model"}
  return {"params": {"model": params["model"]}, "buffers": {**raw.get("buffers", {}), **frozen}}


def student_vp(variables: dict) -> VPDiscrete:
  """The discrete VP table a student (or teacher) carries in `buffers['alphas_cumprod']`."""
  return VPDiscrete.from_alphas_cumprod(variables["buffers"]["alphas_cumprod"])


def make_student_denoise(config: LatentConfig, vp: VPDiscrete, dtype=None, remat: bool = False) -> Callable:
  """CFGPrecond around the student's UNet: the teacher's `denoise` signature (see `model.make_denoise`;
  `dtype` and `remat` as there)."""
  return make_denoise(config, vp, dtype=dtype, remat=remat)


def make_student_decode(config: LatentConfig) -> Callable:
  """`decode(variables, z)`: NHWC latents → NHWC images in about [-1, 1] with the first stage in
  the student's buffers (`decode_first_stage`, unclamped)."""
  decode = make_decode(config)

  def student_decode(variables, z):
    return decode({"params": {"first_stage_model": variables["buffers"]["first_stage_model"]}}, z)

  return student_decode


def make_student_encode(config: LatentConfig) -> Callable:
  """`encode(variables, token_ids)`: `[N, 77]` ids → `[N, 77, D]` float32, SD's frozen CLIP text
  encoder as the student carries it (`buffers['cond_stage_model']['transformer']['text_model']`)."""
  from sfd_jax.clip import sd_text_encoder  # pylint: disable=g-import-not-at-top
  text_config = config.text_encoder

  def encode(variables, token_ids):
    params = variables["buffers"]["cond_stage_model"]["transformer"]["text_model"]
    return sd_text_encoder.encode(params, text_config, token_ids)

  return encode


def make_tokenize(config: LatentConfig, vocab=None) -> Callable:
  """`tokenize(prompts)` → `[N, 77]` int32: SD's `FrozenCLIPEmbedder` ids (padded with EOT), on the host.

  Args:
    vocab: a `clip.tokenizer.Vocabulary` (None: the one in the installed open_clip_torch wheel).
  """
  from sfd_jax.clip import tokenizer  # pylint: disable=g-import-not-at-top
  positions = config.text_encoder.positions
  return lambda prompts: tokenizer.sd_tokenize(list(prompts), vocab, positions).astype(np.int32)


def image_shape(config: LatentConfig) -> tuple:
  """(H, W, C) of the decoded images: the latent side times the first stage's factor 2^(levels-1)."""
  fs = config.first_stage
  side = config.latent_resolution * 2 ** (len(fs.ch_mult) - 1)
  return side, side, fs.out_ch


def latent_shape(config: LatentConfig) -> tuple:
  """(H, W, C) of the latents the UNet denoises."""
  r = config.latent_resolution
  return r, r, config.latent_channels
