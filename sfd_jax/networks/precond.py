"""EDM's four preconditioners (EDM, VP, VE, iDDPM) as Flax modules wrapping a U-Net.

`D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))`, computed in float32 as EDM does
with `force_fp32=True` (float64 when the input is float64 under jax x64). The constant
tables EDM derives in float32 (VP σ(t), the iDDPM `u` table) are reproduced here with numpy
float32 arithmetic so that the attributes match a pickled network's.
"""
import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sfd_jax.networks.dhariwal import DhariwalUNet
from sfd_jax.networks.layers import compute_dtype
from sfd_jax.networks.songunet import SongUNet

MODEL_CLASSES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def model_class(model_type: str):
  """The U-Net class for an EDM `model_type` name."""
  try:
    return MODEL_CLASSES[model_type]
  except KeyError:
    raise ValueError(f"model_type {model_type!r} is not one of {sorted(MODEL_CLASSES)}") from None


def _f32(fn, x):
  """A float32 elementary function rounded correctly (numpy's float32 exp/sin are not
  always; torch's, which EDM used, are)."""
  return np.float32(fn(np.float64(x)))


def vp_sigma(t, beta_d: float, beta_min: float) -> np.float32:
  """VP noise level σ(t) = sqrt(exp(β_d t²/2 + β_min t) − 1), in float32 like EDM."""
  t = np.float32(t)
  f32 = np.float32
  return np.sqrt(_f32(np.exp, f32(0.5 * beta_d) * (t * t) + f32(beta_min) * t) - f32(1))


def iddpm_u_table(M: int, C_1: float, C_2: float) -> np.ndarray:
  """iDDPM's table of M+1 noise levels (`u[M] = 0`), float32 as EDM builds it."""
  f32 = np.float32

  def alpha_bar(j):
    return np.square(_f32(np.sin, f32(0.5 * np.pi) * f32(j) / f32(M) / f32(C_2 + 1)))

  u = np.zeros(M + 1, dtype=np.float32)
  for j in range(M, 0, -1):
    ratio = np.maximum(alpha_bar(j - 1) / alpha_bar(j), f32(C_1))
    u[j - 1] = np.sqrt((u[j] * u[j] + f32(1)) / ratio - f32(1))
  return u


class Precond(nn.Module):
  """Shared plumbing of EDM's preconditioners; subclasses give the coefficients."""

  img_resolution: int                 # Image resolution.
  img_channels: int                   # Number of color channels.
  label_dim: int = 0                  # Number of class labels, 0 = unconditional.
  use_fp16: bool = False              # Recorded only: the port always runs in float32.
  model_type: str = "DhariwalUNet"    # Class name of the underlying model.
  model_kwargs: tuple = ()            # (name, value) pairs for the underlying model.
  use_step_condition: bool = False    # SFD-v step-condition layers in the model.

  out_channel_factor = 1              # iDDPM's model predicts 2·img_channels.

  @staticmethod
  def sigma_range(kwargs: dict) -> tuple:
    """EDM's (`net.sigma_min`, `net.sigma_max`) from the constructor kwargs (defaults filled in)."""
    return float(kwargs["sigma_min"]), float(kwargs["sigma_max"])

  def setup(self):
    self.model = model_class(self.model_type)(
        img_resolution=self.img_resolution, in_channels=self.img_channels,
        out_channels=self.img_channels * self.out_channel_factor, label_dim=self.label_dim,
        use_step_condition=self.use_step_condition, **dict(self.model_kwargs))

  def coefficients(self, sigma):
    """(c_skip, c_out, c_in, c_noise) for sigma of shape [N, 1, 1, 1]."""
    raise NotImplementedError

  def __call__(self, x, sigma, class_labels=None, augment_labels=None, step_condition=None,
               train: bool = False, return_model_output: bool = False):
    """Args:
      x: [N, H, W, C] noisy images.
      sigma: scalar, [1] or [N] noise levels.
      class_labels: [N, label_dim] or None (→ zeros for conditional nets).
      augment_labels: [N, augment_dim] or None.
      step_condition: scalar (SFD-v number of time points) or None.
      train: dropout active (needs the 'dropout' rng).
      return_model_output: also return the raw model output F_x.

    Returns:
      D_x [N, H, W, C] (and F_x [N, H, W, C·out_channel_factor]).
    """
    dtype = compute_dtype(jnp.result_type(x))
    x = jnp.asarray(x, dtype)
    sigma = jnp.asarray(sigma, dtype).reshape(-1, 1, 1, 1)
    if self.label_dim == 0:
      class_labels = None
    elif class_labels is None:
      class_labels = jnp.zeros([1, self.label_dim], dtype)
    else:
      class_labels = jnp.asarray(class_labels, dtype).reshape(-1, self.label_dim)
    if augment_labels is not None:
      augment_labels = jnp.asarray(augment_labels, dtype)
    if step_condition is not None:
      step_condition = jnp.asarray(step_condition, dtype).reshape(-1)

    c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
    F_x = self.model(c_in * x, c_noise.reshape(-1), class_labels, augment_labels, step_condition,
                     train=train)
    D_x = c_skip * x + c_out * F_x[..., :self.img_channels]
    return (D_x, F_x) if return_model_output else D_x


class EDMPrecond(Precond):
  """EDM's preconditioning (Karras et al. 2022)."""

  sigma_min: float = 0.0              # Minimum supported noise level.
  sigma_max: float = float("inf")     # Maximum supported noise level.
  sigma_data: float = 0.5             # Expected standard deviation of the training data.

  def coefficients(self, sigma):
    sd = float(self.sigma_data)
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
  """Variance-preserving preconditioning (Song et al. 2021)."""

  model_type: str = "SongUNet"
  beta_d: float = 19.9                # Extent of the noise level schedule.
  beta_min: float = 0.1               # Initial slope of the noise level schedule.
  M: int = 1000                       # Original number of DDPM timesteps.
  epsilon_t: float = 1e-5             # Minimum t-value used during training.

  @staticmethod
  def sigma_range(kwargs: dict) -> tuple:
    """σ(epsilon_t) and σ(1) of the VP schedule."""
    return (float(vp_sigma(kwargs["epsilon_t"], kwargs["beta_d"], kwargs["beta_min"])),
            float(vp_sigma(1, kwargs["beta_d"], kwargs["beta_min"])))

  def coefficients(self, sigma):
    beta_d, beta_min = float(self.beta_d), float(self.beta_min)
    # log(1 + σ²) in the compute dtype, not log1p: EDM's float32 rounding at small σ is
    # part of the function the teacher was trained with.
    sigma_inv = (jnp.sqrt(beta_min ** 2 + 2 * beta_d * jnp.log(1 + sigma ** 2)) - beta_min) / beta_d
    return 1, -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), (self.M - 1) * sigma_inv


class VEPrecond(Precond):
  """Variance-exploding preconditioning (Song et al. 2021)."""

  model_type: str = "SongUNet"
  sigma_min: float = 0.02             # Minimum supported noise level.
  sigma_max: float = 100.0            # Maximum supported noise level.

  def coefficients(self, sigma):
    return 1, sigma, 1, jnp.log(0.5 * sigma)


class iDDPMPrecond(Precond):  # noqa: N801 (EDM's class name)
  """Improved-DDPM preconditioning (Nichol & Dhariwal 2021): discrete noise levels `u`."""

  model_type: str = "DhariwalUNet"
  C_1: float = 0.001                  # Timestep adjustment at low noise levels.
  C_2: float = 0.008                  # Timestep adjustment at high noise levels.
  M: int = 1000                       # Original number of DDPM timesteps.

  out_channel_factor = 2

  @staticmethod
  def sigma_range(kwargs: dict) -> tuple:
    """The smallest and largest entries of the discrete noise-level table u: u[M-1] and u[0]."""
    u = _u_table(kwargs["M"], kwargs["C_1"], kwargs["C_2"])
    return float(u[kwargs["M"] - 1]), float(u[0])

  def setup(self):
    super().setup()
    self.u = self.variable("buffers", "u", lambda: jnp.asarray(iddpm_u_table(self.M, self.C_1, self.C_2)))

  def coefficients(self, sigma):
    # Nearest table entry; EDM compares in float32 (the compute dtype under x64).
    u = self.u.value.astype(sigma.dtype)
    index = jnp.argmin(jnp.abs(sigma.reshape(-1, 1) - u[None, :]), axis=1)
    c_noise = (self.M - 1 - index).astype(sigma.dtype).reshape(sigma.shape)
    return 1, -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), c_noise


@functools.lru_cache(maxsize=8)
def _u_table(M, C_1, C_2):
  return iddpm_u_table(M, C_1, C_2)


PRECOND_CLASSES = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                   "iDDPMPrecond": iDDPMPrecond}


def precond_class(name: str):
  """The preconditioner class for an EDM class name (a dotted path is accepted)."""
  short = name.rsplit(".", 1)[-1]
  try:
    return PRECOND_CLASSES[short]
  except KeyError:
    raise ValueError(f"precond {name!r} is not one of {sorted(PRECOND_CLASSES)}") from None


def precond_defaults(name: str) -> dict:
  """Constructor defaults of a preconditioner besides the image shape and label_dim:
  use_fp16, its own constants and model_type."""
  cls = precond_class(name)
  skip = {"img_resolution", "img_channels", "label_dim", "model_kwargs", "use_step_condition",
          "parent", "name"}
  return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def build_precond(name: str, img_resolution: int, img_channels: int, label_dim: int,
                  precond_kwargs: dict, model_kwargs: dict, use_step_condition: bool,
                  model_type: Optional[str] = None) -> Precond:
  """Instantiate a preconditioner module (unbound)."""
  kwargs = dict(precond_kwargs)
  if model_type is not None:
    kwargs["model_type"] = model_type
  return precond_class(name)(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             model_kwargs=tuple(sorted(model_kwargs.items())),
                             use_step_condition=use_step_condition, **kwargs)
