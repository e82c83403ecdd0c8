"""Noise-level schedules (time discretisations) for the EDM probability-flow ODE.

`get_schedule` returns the `num_steps` noise levels t_0 > ... > t_{N-1} a sampler visits.
In float32 it reproduces the official SFD code's arithmetic bit for bit (the constants are
Python doubles, everything else float32), so that distillation targets match the reference.
The values are computed on the host with NumPy: a schedule is a static input, fixed before
anything is compiled.
"""
import math

import jax.numpy as jnp
import numpy as np

from sfd_jax.registry import Registry

# VP-SDE end time used to map the `time_uniform` schedule to noise levels (DPM-Solver's value).
_EPSILON_S = 1e-3


def _power(base, exponent, dtype):
  """base ** exponent, computed in float64 and rounded once to `dtype`.

  The correctly rounded power is what the official float32 code gets for every SFD schedule
  (torch's vectorised powf has 1-ulp errors only from about 32 points on); NumPy's float32
  powf is off by one ulp already at some of the fixture's 13 points.
  """
  return (base.astype(np.float64) ** exponent).astype(dtype)


def _polynomial(num_steps, sigma_min, sigma_max, rho, dtype):
  """EDM's schedule: t_i = (a + i/(N-1) (b - a))^rho with a = sigma_max^(1/rho), b = sigma_min^(1/rho)."""
  # The roots are taken in double precision, as the official code does with Python floats.
  a = sigma_max ** (1.0 / rho)
  b = sigma_min ** (1.0 / rho)
  frac = np.arange(num_steps).astype(dtype) / dtype.type(num_steps - 1)
  base = dtype.type(a) + frac * dtype.type(b - a)
  return _power(base, rho, dtype)


def _linspace(start, end, num, dtype):
  """torch.linspace's float arithmetic: start + i*step on the first half, end - (N-1-i)*step after."""
  start, end = dtype.type(start), dtype.type(end)
  step = (end - start) / dtype.type(num - 1)
  i = np.arange(num)
  from_start = start + step * i.astype(dtype)
  from_end = end - step * (num - 1 - i).astype(dtype)
  return np.where(i < num // 2, from_start, from_end).astype(dtype)


def _logsnr(num_steps, sigma_min, sigma_max, rho, dtype):
  """Uniform in log-SNR: t_i = exp(-lambda_i), lambda uniform on [-log sigma_max, -log sigma_min]."""
  del rho  # unused: the spacing is fixed by the log-SNR
  lambda_min = -np.log(dtype.type(sigma_max))
  lambda_max = -np.log(dtype.type(sigma_min))
  return np.exp(-_linspace(lambda_min, lambda_max, num_steps, dtype))


def _time_uniform(num_steps, sigma_min, sigma_max, rho, dtype):
  """DPM-Solver's VP time points tau_i (polynomial in tau with exponent rho) mapped to sigma."""
  one = dtype.type(1)
  log_max = np.log(dtype.type(sigma_max) ** 2 + one)
  log_min = np.log(dtype.type(sigma_min) ** 2 + one)
  beta_d = dtype.type(2) * (log_min / dtype.type(_EPSILON_S) - log_max) / dtype.type(_EPSILON_S - 1)
  beta_min = log_max - dtype.type(0.5) * beta_d
  frac = np.arange(num_steps).astype(dtype) / dtype.type(num_steps - 1)
  tau = _power(one + frac * dtype.type(_EPSILON_S ** (1.0 / rho) - 1), rho, dtype)
  exponent = dtype.type(0.5) * beta_d * (tau * tau) + beta_min * tau
  # exp(.) - 1 cancels badly near sigma_min in float32 (the official values are off by ~1%
  # there); exp is rounded once from float64 to land on the same float32 values.
  return np.sqrt(np.exp(exponent.astype(np.float64)).astype(dtype) - one).astype(dtype)


SCHEDULES = Registry('schedule', {
    'polynomial': _polynomial,
    'logsnr': _logsnr,
    'time_uniform': _time_uniform,
})


def validate_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', rho=7.0):
  """Raises a one-line ValueError naming the bad argument; returns None when all are valid."""
  if schedule_type not in SCHEDULES:
    raise ValueError(f'schedule_type: unknown schedule {schedule_type!r}; valid: {sorted(SCHEDULES)}')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f'num_steps: need an integer >= 2 (time points, NFE + 1), got {num_steps!r}')
  if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
    raise ValueError(f'sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}')
  if not (math.isfinite(rho) and rho > 0):
    raise ValueError(f'rho: need a positive exponent, got {rho!r}')


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', rho=7.0,
                 dtype=jnp.float32):
  """Returns the noise levels of a sampling schedule, from sigma_max down to sigma_min.

  Args:
    num_steps: number of time points N (N - 1 solver steps); at least 2.
    sigma_min: last noise level (> 0).
    sigma_max: first noise level (> sigma_min).
    schedule_type: 'polynomial' (EDM, exponent `rho`), 'logsnr' (uniform in log sigma) or
      'time_uniform' (uniform VP-SDE time with exponent `rho`, mapped to sigma).
    rho: the exponent of the 'polynomial' and 'time_uniform' schedules.
    dtype: float32 (the official arithmetic) or float64 (needs `jax_enable_x64`).

  Returns:
    A `[num_steps]` array of `dtype`, descending; t_0 = sigma_max and t_{N-1} = sigma_min up to
    rounding (float32 gives t_0 = 79.999985 for sigma_max = 80, as the official code does).

  Raises:
    ValueError: unknown schedule_type, num_steps < 2, or invalid sigmas / rho.
  """
  validate_schedule(num_steps, sigma_min, sigma_max, schedule_type, rho)
  np_dtype = np.dtype(dtype)
  if np_dtype not in (np.float32, np.float64):
    raise ValueError(f'dtype: need float32 or float64, got {np_dtype}')
  t_steps = SCHEDULES[schedule_type](int(num_steps), float(sigma_min), float(sigma_max),
                                     float(rho), np_dtype)
  return jnp.asarray(t_steps, dtype=np_dtype)
