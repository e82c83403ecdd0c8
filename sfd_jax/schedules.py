"""Noise-level schedules (time discretisations) for the EDM probability-flow ODE.

`get_schedule` returns the `num_steps` noise levels t_0 > ... > t_{N-1} a sampler visits.
The values are computed on the host with NumPy: a schedule is a static input, fixed before
anything is compiled.

In float32 it follows the official SFD code operation by operation: which values are Python
doubles and which float32, the order of every float32 operation, `torch.linspace`'s two halves
(each point one fused multiply-add from its nearer end), NumPy's float32 log where the official
code calls `np.log`, and torch's float32 power of the float32 constant e. Only the elementary
functions (exp, log, pow, sqrt) differ in kind: here they are correctly rounded (computed in
float64, rounded once), while torch's CPU ones are MKL's, SLEEF's or glibc's, which depend on
the machine and are themselves within 1 ulp of the correctly rounded value. What that leaves
(`tests/test_schedule_parity.py` replays the official arithmetic with torch):

- polynomial: within 1 ulp of the official values, exact at both ends.
- logsnr: within 1 ulp, exact at both ends (num_steps 2-257, sigma ranges 0.002-80, 0.006-80,
  0.1-14.6 on the machine tested; for a sigma whose float32 log torch rounds the other way,
  every point would move by a few ulps).
- time_uniform: bit-equal to the official arithmetic done with correctly rounded power and
  square root. Against torch's own CPU functions it is within 1 ulp below 32 points, but not
  beyond: exp(.) - 1 cancels for sigma below ~1, so a 1-ulp difference in the power (torch's
  vectorised SLEEF powf, used on blocks of 32 points with AVX-512) grows to up to 81 ulps of
  sigma, and torch's CPU sqrt is not correctly rounded. The official float32 values are
  machine-dependent to that degree themselves (and ~1e5 ulps from the exact schedule); in an
  official GPU run the tau powers are CUDA's (the official `get_schedule` takes them on the
  training device, the rest on the CPU), so no single official float32 schedule exists here.

float64 computes the closed forms of SPEC section 3 in double precision (no official quirks).

discrete (LDM-style teachers with a discrete VP table; needs the teacher's `vp`, see
`sfd_jax.latent.vp`): t uniform between t_max = sigma_inv(sigma_max) and t_min =
sigma_inv(sigma_min), then sigma(t), in the official float32 arithmetic (`vp.sigma_np`). Only
rho = 1 is accepted: the official formula raises t_min but not t_max to 1/rho, so for rho != 1
the SFD student's re-derived 2-point schedule starts far from t_cur and turns NaN below the
table (tests/fixtures/ldm/README.md).
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
  """Evenly spaced points, start + i*step (float64 path)."""
  start, end = dtype.type(start), dtype.type(end)
  step = (end - start) / dtype.type(num - 1)
  i = np.arange(num)
  from_start = start + step * i.astype(dtype)
  from_end = end - step * (num - 1 - i).astype(dtype)
  return np.where(i < num // 2, from_start, from_end).astype(dtype)


def _fma32(a, b, c):
  """a*b + c rounded once to float32 (a fused multiply-add), for float32 a, c and integer b.

  a*b is exact in float64 (b < 2^29); TwoSum gives the exact error of the float64 sum, and
  rounding that sum to odd before the final rounding to float32 avoids double rounding.
  """
  a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
  product = a * b
  total = product + c
  c_part = total - product
  error = (product - (total - c_part)) + (c - c_part)
  even = (total.view(np.int64) & 1) == 0
  total = np.where((error != 0) & even, np.nextafter(total, total + error), total)
  return total.astype(np.float32)


def _linspace32(start, end, num):
  """torch.linspace's float32 arithmetic (CPU): step = (end - start)/(num - 1) in float32,
  then start + i*step on the first half and end - (num-1-i)*step on the second, each one fused
  multiply-add."""
  start, end = np.float32(start), np.float32(end)
  step = (end - start) / np.float32(num - 1)
  i = np.arange(num)
  return np.where(i < num // 2, _fma32(step, i, start), _fma32(-step, num - 1 - i, end))


def _rounded(fn, *args):
  """fn on float32 values, computed in float64 and rounded once: the correctly rounded result
  (up to a double rounding, about one case in 2^29)."""
  return fn(*(np.asarray(a, np.float32).astype(np.float64) for a in args)).astype(np.float32)


def _power32(base, exponent):
  """torch's float32 `tensor ** exponent`: exponents 1, 2 and 3 are products, 0.5 a sqrt,
  anything else the power rounded from double."""
  if exponent == 1:
    return base
  if exponent == 2:
    return base * base
  if exponent == 3:
    return base * base * base
  if exponent == 0.5:
    return np.sqrt(base)
  return _rounded(np.power, base, np.float32(exponent))


def _logsnr(num_steps, sigma_min, sigma_max, rho, dtype):
  """Uniform in log-SNR: t_i = exp(-lambda_i), lambda uniform on [-log sigma_max, -log sigma_min]."""
  del rho  # unused: the spacing is fixed by the log-SNR
  if dtype == np.float32:
    # Official: the two logs of float32 sigmas, read back as Python floats, a float32
    # torch.linspace between them, then exp of its negation.
    lambda_min = -_rounded(np.log, np.float32(sigma_max))
    lambda_max = -_rounded(np.log, np.float32(sigma_min))
    return _rounded(np.exp, -_linspace32(lambda_min, lambda_max, num_steps))
  lambda_min = -np.log(dtype.type(sigma_max))
  lambda_max = -np.log(dtype.type(sigma_min))
  return np.exp(-_linspace(lambda_min, lambda_max, num_steps, dtype))


def _time_uniform32(num_steps, sigma_min, sigma_max, rho):
  """The official float32 arithmetic of `_time_uniform`, operation by operation."""
  f32 = np.float32
  one = f32(1)
  # The official code takes these two logs with NumPy (np.log of a float32 torch scalar).
  log_max = np.log(f32(sigma_max) * f32(sigma_max) + one)
  log_min = np.log(f32(sigma_min) * f32(sigma_min) + one)
  # Python-double constants become float32 before each float32 operation.
  beta_d = f32(2) * (log_min / f32(_EPSILON_S) - log_max) / f32(_EPSILON_S - 1)
  beta_min = log_max - f32(0.5) * beta_d
  frac = np.arange(num_steps).astype(f32) / f32(num_steps - 1)
  tau = _power32(one + frac * f32(_EPSILON_S ** (1.0 / rho) - 1), rho)
  exponent = (f32(0.5) * beta_d) * (tau * tau) + beta_min * tau
  # np.e ** exponent: torch raises the float32 constant e (2.7182817) to the power; that is
  # not exp(exponent) (e is 3e-8 short in float32).
  return np.sqrt(_rounded(np.power, f32(np.e), exponent) - one)


def _time_uniform(num_steps, sigma_min, sigma_max, rho, dtype):
  """DPM-Solver's VP time points tau_i (polynomial in tau with exponent rho) mapped to sigma."""
  if dtype == np.float32:
    return _time_uniform32(num_steps, sigma_min, sigma_max, rho)
  one = dtype.type(1)
  log_max = np.log(dtype.type(sigma_max) ** 2 + one)
  log_min = np.log(dtype.type(sigma_min) ** 2 + one)
  beta_d = dtype.type(2) * (log_min / dtype.type(_EPSILON_S) - log_max) / dtype.type(_EPSILON_S - 1)
  beta_min = log_max - dtype.type(0.5) * beta_d
  frac = np.arange(num_steps).astype(dtype) / dtype.type(num_steps - 1)
  tau = _power(one + frac * dtype.type(_EPSILON_S ** (1.0 / rho) - 1), rho, dtype)
  exponent = dtype.type(0.5) * beta_d * (tau * tau) + beta_min * tau
  return np.sqrt(np.exp(exponent) - one)


def _discrete(num_steps, sigma_min, sigma_max, rho, dtype, vp=None):
  """Uniform in the teacher's discrete time: t_i = t_max + i/(N-1) (t_min - t_max), sigma(t_i)."""
  if vp is None:
    raise ValueError("schedule_type: 'discrete' needs a teacher with a discrete VP table "
                     "(an LDM / SD teacher); pass its `vp`")
  if rho != 1:
    raise ValueError(f"rho: the discrete schedule needs rho = 1, got {rho!r} (the official formula does not raise "
                     "t_max to 1/rho, so the student's per-step schedules would start far from t_cur and turn NaN)")
  if dtype != np.float32:
    raise ValueError('dtype: the discrete schedule is float32 (the teacher\'s VP table is float32)')
  f32 = np.float32
  t_min = vp.sigma_inv_np(np.asarray([sigma_min], f32))
  t_max = vp.sigma_inv_np(np.asarray([sigma_max], f32))
  # torch divides the int64 arange by the Python int in float32 (both exact there).
  frac = np.arange(num_steps).astype(f32) / f32(num_steps - 1)
  return vp.sigma_np(t_max + frac * (t_min - t_max))


SCHEDULES = Registry('schedule', {
    'polynomial': _polynomial,
    'logsnr': _logsnr,
    'time_uniform': _time_uniform,
})
# Schedules that need the teacher's discrete VP table (`vp`); kept apart from SCHEDULES, whose
# names every teacher accepts.
TEACHER_SCHEDULES = Registry('schedule', {'discrete': _discrete})


def validate_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', rho=7.0):
  """Raises a one-line ValueError naming the bad argument; returns None when all are valid."""
  if schedule_type not in SCHEDULES and schedule_type not in TEACHER_SCHEDULES:
    raise ValueError(f'schedule_type: unknown schedule {schedule_type!r}; valid: {sorted(SCHEDULES)} '
                     f'(and {sorted(TEACHER_SCHEDULES)} with an LDM teacher)')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f'num_steps: need an integer >= 2 (time points, NFE + 1), got {num_steps!r}')
  if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
    raise ValueError(f'sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}')
  if not (math.isfinite(rho) and rho > 0):
    raise ValueError(f'rho: need a positive exponent, got {rho!r}')


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', rho=7.0,
                 dtype=jnp.float32, vp=None):
  """Returns the noise levels of a sampling schedule, from sigma_max down to sigma_min.

  Args:
    num_steps: number of time points N (N - 1 solver steps); at least 2.
    sigma_min: last noise level (> 0).
    sigma_max: first noise level (> sigma_min).
    schedule_type: 'polynomial' (EDM, exponent `rho`), 'logsnr' (uniform in log sigma) or
      'time_uniform' (uniform VP-SDE time with exponent `rho`, mapped to sigma), or 'discrete'
      (uniform in an LDM teacher's discrete time; rho must be 1; needs `vp`).
    rho: the exponent of the 'polynomial' and 'time_uniform' schedules.
    dtype: float32 (the official arithmetic) or float64 (needs `jax_enable_x64`).
    vp: the teacher's `sfd_jax.latent.vp.VPDiscrete` (only for 'discrete').

  Returns:
    A `[num_steps]` array of `dtype`, descending; t_0 = sigma_max and t_{N-1} = sigma_min up to
    rounding (float32 gives t_0 = 79.999985 for sigma_max = 80, as the official code does).

  Raises:
    ValueError: unknown schedule_type, num_steps < 2, invalid sigmas / rho, or 'discrete'
      without `vp` or with rho != 1.
  """
  validate_schedule(num_steps, sigma_min, sigma_max, schedule_type, rho)
  np_dtype = np.dtype(dtype)
  if np_dtype not in (np.float32, np.float64):
    raise ValueError(f'dtype: need float32 or float64, got {np_dtype}')
  if schedule_type in TEACHER_SCHEDULES:
    t_steps = TEACHER_SCHEDULES[schedule_type](int(num_steps), float(sigma_min), float(sigma_max), float(rho),
                                               np_dtype, vp=vp)
  else:
    t_steps = SCHEDULES[schedule_type](int(num_steps), float(sigma_min), float(sigma_max), float(rho), np_dtype)
  return jnp.asarray(t_steps, dtype=np_dtype)
