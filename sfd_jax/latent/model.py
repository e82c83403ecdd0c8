"""A latent teacher's pure functions: initialisation, `denoise` (SFD's `CFGPrecond`) and `decode`.

Variables are nested by the checkpoint's state-dict names:
`{'params': {'model': {'diffusion_model': UNet}, 'first_stage_model': first stage},
'buffers': {'alphas_cumprod': [M]}}`.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.latent.autoencoder import FirstStage
from sfd_jax.latent.config import LatentConfig
from sfd_jax.latent.unet import UNetModel
from sfd_jax.latent.vp import VPDiscrete


def _as_dict(tree):
  return {k: _as_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _init_unet(config: LatentConfig, rng):
  cfg, r = config.unet, config.latent_resolution
  x = jnp.zeros([1, r, r, cfg.in_channels], jnp.float32)
  context = jnp.zeros([1, 1, cfg.context_dim], jnp.float32) if cfg.context_dim else None
  ones = jnp.ones([1], jnp.float32)
  return _as_dict(UNetModel(cfg).init(rng, x, ones, context, ones)["params"])


def _init_first_stage(config: LatentConfig, rng):
  fs, r = config.first_stage, config.latent_resolution
  z = jnp.zeros([1, r, r, fs.embed_dim], jnp.float32)
  return _as_dict(FirstStage(fs).init(rng, z)["params"])


def init_variables(config: LatentConfig, rng) -> dict:
  """Fresh variables (torch's default initialisation, an untrained DDPM table of `config`).

  Returns:
    The variables tree described in the module docstring, float32.
  """
  # An RngBitGenerator key: one threefry stream per tensor makes XLA compile this many times slower.
  rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
  k1, k2 = jax.random.split(rbg)
  return {"params": {"model": {"diffusion_model": _init_unet(config, k1)},
                     "first_stage_model": _init_first_stage(config, k2)},
          "buffers": {"alphas_cumprod": jnp.asarray(alphas_cumprod(config))}}


def alphas_cumprod(config: LatentConfig) -> np.ndarray:
  """LDM's 'linear' schedule: betas = linspace(√start, √end, T)², cumulative product, float32."""
  betas = np.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.timesteps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _unet(config: LatentConfig, dtype=None, remat: bool = False) -> UNetModel:
  return UNetModel(config.unet, dtype=dtype, remat=remat)


def make_denoise(config: LatentConfig, vp: VPDiscrete, guidance_rate: float = 1.0, dtype=None,
                 remat: bool = False) -> Callable:
  """SFD's `CFGPrecond` around the UNet as a pure, jit-able denoiser.

  D(x; σ) = x − σ·ε(x/sqrt(σ²+1), M·σ⁻¹(σ) − 1, condition). With a guidance w ≠ 1 and an
  unconditional condition, ε = ε_u + w(ε_c − ε_u), both from one UNet call on a batch of 2N
  (unconditional first); w = 1 (the official training) runs the conditional branch only.

  Args:
    config: the architecture.
    vp: the teacher's discrete VP table (σ and σ⁻¹).
    guidance_rate: the default guidance w (1 = conditional branch only, as in training).
    dtype: None (float32) or 'bfloat16': the UNet's convolutions, linear layers and attention products
      take bfloat16 operands and give float32 results; norms, embeddings, preconditioning, the
      output and the (float32) parameters as in float32.
    remat: recompute each UNet block in the backward pass (same numbers, less activation memory).

  Returns:
    `denoise(variables, x, sigma, condition=None, step_condition=None, unconditional_condition=None,
    *, uncondition=None, guidance=None, train=False, dropout_rng=None) -> D`; x and D NHWC latents
    [N, H, W, C], sigma a scalar or [N], condition and uncondition (`unconditional_condition` is
    its older name) [N, L, context_dim] or None, step_condition a number or [N], guidance a number
    (a traced one always takes the guided branch) or None for `guidance_rate`. `variables` needs
    only `['params']['model']['diffusion_model']`; `train` and `dropout_rng` are accepted for the
    SFD step's student calls and ignored (dropout 0).
  """
  unet = _unet(config, dtype, remat)
  cfg = config.guidance_type == "classifier-free"

  def eps(variables, x_in, c_noise, condition, step):
    params = {"params": variables["params"]["model"]["diffusion_model"]}
    return unet.apply(params, x_in, c_noise, condition, step)

  def denoise(variables, x, sigma, condition=None, step_condition=None, unconditional_condition=None, *,
              uncondition=None, guidance=None, train=False, dropout_rng=None):
    del train, dropout_rng  # no dropout in these UNets (the SFD step passes them to every student)
    uncondition = unconditional_condition if uncondition is None else uncondition
    w = guidance_rate if guidance is None else guidance
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dt)
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dt).reshape(-1), (n,))
    c_in = (1 / jnp.sqrt(sigma ** 2 + 1)).reshape(-1, 1, 1, 1)
    c_noise = vp.M * vp.sigma_inv_jnp(sigma) - 1
    step = None
    if step_condition is not None:
      step = jnp.broadcast_to(jnp.asarray(step_condition, dt).reshape(-1), (n,))
    if cfg and uncondition is not None and not (isinstance(w, (int, float)) and w == 1):
      both = lambda a, b: jnp.concatenate([a, b])
      e = eps(variables, both(c_in * x, c_in * x), both(c_noise, c_noise),
              both(jnp.asarray(uncondition, dt), jnp.asarray(condition, dt)),
              None if step is None else both(step, step))
      e_uncond, e_cond = jnp.split(e, 2)
      f_x = e_uncond + jnp.asarray(w, dt) * (e_cond - e_uncond)
    else:
      f_x = eps(variables, c_in * x, c_noise, condition, step)
    return x - sigma.reshape(-1, 1, 1, 1) * f_x

  return denoise


def make_unet(config: LatentConfig) -> Callable:
  """`unet(variables, x, timesteps, context=None, step_condition=None)` → ε (the raw UNet, NHWC)."""
  unet = _unet(config)

  def apply(variables, x, timesteps, context=None, step_condition=None):
    return unet.apply({"params": variables["params"]["model"]["diffusion_model"]}, x, timesteps, context,
                      step_condition)

  return apply


def make_decode(config: LatentConfig) -> Callable:
  """`decode(variables, z, force_not_quantize=False)`: `decode_first_stage` on NHWC latents.

  z is multiplied by 1/scale_factor, (VQ: re-quantised to the codebook), passed through
  `post_quant_conv` and the decoder; returns NHWC images, nominally in [-1, 1], unclamped.
  """
  first_stage = FirstStage(config.first_stage)
  inv_scale = 1.0 / config.scale_factor

  def decode(variables, z, force_not_quantize=False):
    z = jnp.asarray(z)
    z = jnp.asarray(inv_scale, z.dtype) * z
    return first_stage.apply({"params": variables["params"]["first_stage_model"]}, z, force_not_quantize)

  return decode
