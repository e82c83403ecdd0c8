"""The discrete-time VP noise table of an LDM teacher, as SFD's `CFGPrecond` uses it.

log α_i = 0.5·log(alphas_cumprod_i) at t_i = (i+1)/M (torch's float32 `linspace(0, 1, M+1)[1:]`);
`sigma(t)` and `sigma_inv(sigma)` interpolate it piecewise linearly (DPM-Solver's
`interpolate_fn`), extrapolating with the two outermost keypoints. Everything is float32, as in
the official code. `sigma_jnp`/`sigma_inv_jnp` trace under jit (the denoiser); `sigma_np`/
`sigma_inv_np` run on the host for schedules, with correctly rounded elementary functions.
No Flax here: schedules use this module.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _round(fn, *args):
  """fn evaluated in float64 on float32 values and rounded once to float32."""
  return np.asarray(fn(*(np.asarray(a, _F32).astype(np.float64) for a in args))).astype(_F32)


def _fma32(a, b, c):
  """a*b + c rounded once to float32, for float32 a, c and integer b (torch.linspace's step)."""
  a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
  product, total = a * b, a * b + c
  c_part = total - product
  error = (product - (total - c_part)) + (c - c_part)
  even = (total.view(np.int64) & 1) == 0
  total = np.where((error != 0) & even, np.nextafter(total, total + error), total)
  return total.astype(_F32)


def time_grid(num: int) -> np.ndarray:
  """torch.linspace(0, 1, num + 1)[1:] in float32 (each half one fused multiply-add from its end)."""
  steps = num + 1
  step = _F32(1) / _F32(num)
  i = np.arange(steps)
  grid = np.where(i < steps // 2, _fma32(step, i, _F32(0)), _fma32(-step, steps - 1 - i, _F32(1)))
  return grid[1:]


def interpolate(x, xp, yp, xnp=jnp):
  """The piecewise-linear f(x) through keypoints (xp increasing, yp), extrapolated linearly.

  Segment j = clip(#{xp < x} − 1, 0, K − 2), then y_j + (x − x_j)(y_{j+1} − y_j)/(x_{j+1} − x_j) in
  that order, as `interpolate_fn` computes it.
  """
  k = xp.shape[0]
  j = xnp.clip(xnp.searchsorted(xp, x, side="left") - 1, 0, k - 2)
  x0, x1, y0, y1 = xp[j], xp[j + 1], yp[j], yp[j + 1]
  return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@dataclasses.dataclass(frozen=True, eq=False)
class VPDiscrete:
  """The keypoints: `t` [M] and `log_alpha` [M], float32 numpy."""

  t: np.ndarray
  log_alpha: np.ndarray

  @classmethod
  def from_alphas_cumprod(cls, alphas_cumprod) -> "VPDiscrete":
    alphas_cumprod = np.asarray(alphas_cumprod, _F32)
    log_alpha = _F32(0.5) * _round(np.log, alphas_cumprod)
    return cls(t=time_grid(len(alphas_cumprod)), log_alpha=log_alpha)

  @property
  def M(self) -> int:  # pylint: disable=invalid-name
    return len(self.t)

  # -- traced (jax.numpy) ---------------------------------------------------------------
  def sigma_jnp(self, t):
    """σ(t) = sqrt(1 − exp(2 log α(t))) / exp(log α(t))."""
    la = interpolate(t, jnp.asarray(self.t), jnp.asarray(self.log_alpha))
    return jnp.sqrt(1 - jnp.exp(2 * la)) / jnp.exp(la)

  def sigma_inv_jnp(self, sigma):
    """σ⁻¹(σ): log α = −0.5·logaddexp(0, 2 log σ), interpolated back to t."""
    lamb = -jnp.log(sigma)
    la = -0.5 * jnp.logaddexp(jnp.zeros_like(lamb), -2 * lamb)
    return interpolate(la, jnp.asarray(self.log_alpha[::-1]), jnp.asarray(self.t[::-1]))

  # -- host (numpy, float32 with correctly rounded exp/log/sqrt) ------------------------
  def sigma_np(self, t) -> np.ndarray:
    la = interpolate(np.asarray(t, _F32), self.t, self.log_alpha, xnp=np)
    e2 = _round(np.exp, _F32(2) * la)
    return _round(np.sqrt, _F32(1) - e2) / _round(np.exp, la)

  def sigma_inv_np(self, sigma) -> np.ndarray:
    lamb = -_round(np.log, np.asarray(sigma, _F32))
    d = _F32(-2) * lamb
    la = _F32(-0.5) * (np.maximum(d, _F32(0)) + _round(np.log1p, _round(np.exp, -np.abs(d))))
    return interpolate(la, self.log_alpha[::-1].copy(), self.t[::-1].copy(), xnp=np)
