"""The SFD student of a latent teacher: its variables, denoiser, decoder and VP table.

A student trains only the UNet (`params: {'model': {'diffusion_model': ...}}`, step-condition
layers included); everything else of the teacher's raw variables (the first stage, the DDPM
table `alphas_cumprod`) rides along as never-trained `buffers`, so a student checkpoint alone
samples and decodes. Params and buffers together flatten to the checkpoint's state-dict names.
"""
from typing import Callable

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


def image_shape(config: LatentConfig) -> tuple:
  """(H, W, C) of the decoded images: the latent side times the first stage's factor 2^(levels-1)."""
  fs = config.first_stage
  side = config.latent_resolution * 2 ** (len(fs.ch_mult) - 1)
  return side, side, fs.out_ch


def latent_shape(config: LatentConfig) -> tuple:
  """(H, W, C) of the latents the UNet denoises."""
  r = config.latent_resolution
  return r, r, config.latent_channels
