"""float32 schedules against the official arithmetic, replayed with torch on this machine.

The replay below is written from the formulas of SPEC section 3 with the official code's
types: the sigmas become float32 torch scalars, Python-double constants meet float32 tensors,
`torch.linspace` spaces the log-SNR, the two logs of the `time_uniform` schedule are NumPy's
(the official code calls `np.log` on torch scalars) and its exponential is the Python float
`np.e` raised to a float32 tensor. sfd_jax computes the same values with NumPy only; this test
never calls it from the replay.

How far the official float32 arithmetic itself is from the exact (float64) schedule, over the
grid below (num_steps 2-257, sigma 0.002-80, 0.006-80, 0.1-14.6, rho 7), measured on an AMD
EPYC (AVX-512) with torch 2.13.0, 2026-12-02:
- polynomial: up to 33 ulps (2.1e-6 relative): the float32 base a + i/(N-1)(b - a) is rounded
  and the power multiplies its relative error by rho = 7.
- logsnr: up to 8 ulps (5.5e-7 relative): float32 logs of the sigmas and float32 spacing.
- time_uniform: up to 113721 ulps (1.2e-2 relative), near sigma_min = 0.002: beta_min =
  log(sigma_max^2 + 1) - beta_d/2 cancels (8.76 - 8.73) and exp(.) - 1 cancels for small sigma,
  both in float32. That is why the official arithmetic has to be mirrored operation by
  operation to get the same distillation targets.

What sfd_jax matches (and what these tests assert):
- polynomial and logsnr: within 1 ulp of the replay at every point, bit-equal at both ends.
- time_uniform: bit-equal to the replay (all 768 cases) when the replay's powers and square
  root are the correctly rounded ones (torch in float64, rounded to float32). With torch's own
  float32 power and square root it cannot be: for sigma below ~1, exp(.) - 1 cancels, so a
  1-ulp difference in torch's vectorised power (SLEEF powf, used on whole blocks of 32 points
  with AVX-512, 16 with AVX2) becomes up to 81 ulps of sigma, and torch's CPU sqrt (MKL) is
  not correctly rounded (1 ulp off for ~17% of random inputs). Measured: 613 of 768 cases off;
  more than 1 ulp only from 32 points on, an end point 1 ulp off in 256 cases. Those values
  depend on the machine's vector width and math libraries;
  `test_time_uniform_within_1ulp_of_torch_scalar_path` checks the part that does not (fewer
  than 16 points, where torch's power is the scalar one). On a GPU the official code takes
  the tau powers with CUDA's powf (`get_schedule` puts `step_indices` on the training device)
  and the rest on the CPU: the official float32 time_uniform schedule depends on the device.
"""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch
from sfd_jax import schedules

SIGMA_RANGES = [(0.002, 80.0), (0.006, 80.0), (0.1, 14.6)]
NUM_STEPS = range(2, 258)
EPS_S = 1e-3


def _ulps(a, b):
  """Distance in float32 units in the last place (positive values)."""
  return np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64)
                - np.asarray(b, np.float32).view(np.int32).astype(np.int64))


def _torch_polynomial(n, sigma_min, sigma_max, rho=7.0):
  i = torch.arange(n)
  a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)  # Python doubles
  return ((a + i / (n - 1) * (b - a)) ** rho).numpy()


def _torch_logsnr(n, sigma_min, sigma_max):
  # lambda = -log(sigma) of float32 sigmas, handed to linspace as Python floats.
  lambda_first = (-torch.log(torch.tensor(sigma_max))).item()
  lambda_last = (-torch.log(torch.tensor(sigma_min))).item()
  return torch.exp(-torch.linspace(lambda_first, lambda_last, steps=n)).numpy()


def _torch_time_uniform(n, sigma_min, sigma_max, rho=7.0, rounded=False):
  """rounded=True: the two powers and the square root in float64, each rounded once to float32."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # np.log on a torch scalar warns about __array_wrap__
    log_min = np.log(torch.tensor(sigma_min) ** 2 + 1)  # NumPy's float32 log
    log_max = np.log(torch.tensor(sigma_max) ** 2 + 1)
  beta_d = 2 * (log_min / EPS_S - log_max) / (EPS_S - 1)
  beta_min = log_max - 0.5 * beta_d
  base = 1 + torch.arange(n) / (n - 1) * (EPS_S ** (1 / rho) - 1)
  if not rounded:
    tau = base ** rho
    return ((np.e ** (0.5 * beta_d * tau ** 2 + beta_min * tau) - 1) ** 0.5).numpy()
  tau = (base.double() ** rho).float()
  exponent = 0.5 * beta_d * tau ** 2 + beta_min * tau
  e32 = torch.tensor(np.e, dtype=torch.float32).double()  # torch raises the float32 e
  p = (e32 ** exponent.double()).float()
  return (p - 1).double().sqrt().float().numpy()


def _ours(kind, n, sigma_min, sigma_max):
  return np.asarray(schedules.get_schedule(n, sigma_min, sigma_max, kind, 7.0, dtype=jnp.float32))


def _rounded_time_uniform(n, sigma_min, sigma_max):
  return _torch_time_uniform(n, sigma_min, sigma_max, rounded=True)


def _grid_mismatches(kind, reference):
  """(num_steps, sigma_min, worst ulps, end ulps) for every grid case off by > 1 ulp or at an end."""
  bad = []
  for sigma_min, sigma_max in SIGMA_RANGES:
    for n in NUM_STEPS:
      ulps = _ulps(_ours(kind, n, sigma_min, sigma_max), reference(n, sigma_min, sigma_max))
      if ulps.max() > 1 or ulps[0] or ulps[-1]:
        bad.append((n, sigma_min, int(ulps.max()), (int(ulps[0]), int(ulps[-1]))))
  return bad


@pytest.mark.torch_reference
@pytest.mark.parametrize("kind, reference", [
    ("polynomial", _torch_polynomial),
    ("logsnr", _torch_logsnr),
    ("time_uniform", _rounded_time_uniform),
])
def test_float32_within_1ulp_of_official_arithmetic(kind, reference):
  bad = _grid_mismatches(kind, reference)
  assert not bad, f"{kind}: {len(bad)} of {3 * len(NUM_STEPS)} cases off, first {bad[:5]}"


@pytest.mark.torch_reference
def test_time_uniform_within_1ulp_of_torch_scalar_path():
  # Below 16 points torch's power takes its scalar (libm) path on AVX2 and AVX-512 machines
  # alike; only the end points' square roots (MKL's, not correctly rounded) may differ by 1 ulp.
  for sigma_min, sigma_max in SIGMA_RANGES:
    for n in range(2, 16):
      ours = _ours("time_uniform", n, sigma_min, sigma_max)
      ulps = _ulps(ours, _torch_time_uniform(n, sigma_min, sigma_max))
      assert ulps.max() <= 1, (n, sigma_min, ulps)


def _numpy_float32_functions(fn, *args):
  return fn(*(np.asarray(a, np.float32) for a in args))


def _exp_instead_of_float32_e(fn, *args, rounded=schedules._rounded):  # pylint: disable=protected-access
  if fn is np.power and np.all(np.asarray(args[0]) == np.float32(np.e)):
    return rounded(np.exp, args[1])
  return rounded(fn, *args)


def _unfused(a, b, c):
  return np.float32(a) * np.asarray(b).astype(np.float32) + np.float32(c)


@pytest.mark.torch_reference
@pytest.mark.parametrize("kind, reference, name, mutant", [
    ("logsnr", _torch_logsnr, "_rounded", _numpy_float32_functions),
    ("logsnr", _torch_logsnr, "_fma32", _unfused),
    ("time_uniform", _rounded_time_uniform, "_rounded", _numpy_float32_functions),
    ("time_uniform", _rounded_time_uniform, "_rounded", _exp_instead_of_float32_e),
])
def test_comparison_catches_plausible_slips(monkeypatch, kind, reference, name, mutant):
  # NumPy's own float32 exp/log/pow (a few ulps, SIMD) instead of correctly rounded ones,
  # linspace points rounded twice (multiply, then add), exp(x) for the official
  # float32(e) ** x: the grid comparison must notice each.
  monkeypatch.setattr(schedules, name, mutant)
  assert _grid_mismatches(kind, reference)
