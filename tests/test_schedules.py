"""Tests for sfd_jax.schedules: official float32 arithmetic, float64 closed forms, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax import schedules


def _ulps(a, b):
  """Distance in float32 units in the last place (both arrays positive)."""
  return np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64)
                - np.asarray(b, np.float32).view(np.int32).astype(np.int64))


@pytest.mark.parametrize("key, num_steps", [("t_steps", 4), ("teacher_t_steps", 13)])
def test_polynomial_float32_is_bit_exact(fixture32, key, num_steps):
  t = schedules.get_schedule(num_steps, 0.006, 80.0, "polynomial", 7.0)
  assert t.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(t), fixture32[key])
  # The README's landmarks: t_0 = 79.999985, t_last = 0.0059999949.
  assert np.float32(t[0]) == np.float32(79.999985)


@pytest.mark.parametrize("key, num_steps", [("t_steps", 4), ("teacher_t_steps", 13)])
def test_polynomial_float64_matches_fp64_fixture(fixture64, key, num_steps):
  with jax.enable_x64(True):
    t = schedules.get_schedule(num_steps, 0.006, 80.0, dtype=jnp.float64)
    assert t.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(t), fixture64[key], rtol=1e-15, atol=0)


@pytest.mark.parametrize("num_steps", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_teacher_schedule_contains_student_points(num_steps, M):
  # SFD's targets rely on this: every (M+1)-th teacher point is a student point, bit for bit.
  student = np.asarray(schedules.get_schedule(num_steps, 0.006, 80.0))
  teacher = np.asarray(schedules.get_schedule((M + 1) * (num_steps - 1) + 1, 0.006, 80.0))
  np.testing.assert_array_equal(teacher[::M + 1], student)


def _closed_form(schedule_type, n, sigma_min, sigma_max, rho):
  """SPEC section 3 in float64, written independently of the module."""
  i = np.arange(n) / (n - 1)
  if schedule_type == "polynomial":
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  if schedule_type == "logsnr":
    lam = -np.log(sigma_max) + i * (np.log(sigma_max) - np.log(sigma_min))
    return np.exp(-lam)
  eps = 1e-3
  beta_d = 2 * (np.log(sigma_min ** 2 + 1) / eps - np.log(sigma_max ** 2 + 1)) / (eps - 1)
  beta_min = np.log(sigma_max ** 2 + 1) - beta_d / 2
  tau = (1 + i * (eps ** (1 / rho) - 1)) ** rho
  return np.sqrt(np.exp(beta_d * tau ** 2 / 2 + beta_min * tau) - 1)


@pytest.mark.parametrize("schedule_type", ["polynomial", "logsnr", "time_uniform"])
@pytest.mark.parametrize("num_steps, sigma_min, sigma_max, rho", [
    (2, 0.002, 80.0, 7.0), (18, 0.002, 80.0, 7.0), (13, 0.006, 80.0, 3.0), (40, 0.03, 14.6, 1.0)])
def test_matches_closed_form(schedule_type, num_steps, sigma_min, sigma_max, rho):
  ref = _closed_form(schedule_type, num_steps, sigma_min, sigma_max, rho)
  with jax.enable_x64(True):
    t64 = np.asarray(schedules.get_schedule(num_steps, sigma_min, sigma_max, schedule_type, rho,
                                            dtype=jnp.float64))
  np.testing.assert_allclose(t64, ref, rtol=1e-12)
  assert np.all(np.diff(t64) < 0)
  t32 = np.asarray(schedules.get_schedule(num_steps, sigma_min, sigma_max, schedule_type, rho))
  assert t32.dtype == np.float32 and np.all(np.diff(t32) < 0)
  # The float32 path keeps the official float32 arithmetic and its rounding: the polynomial
  # base a + i/(N-1) (b - a) cancels to ~1 ulp of a (2.3e-5 relative at t_last for rho = 1,
  # sigma_max = 14.6), time_uniform takes log(1 + sigma_min^2) in float32 (~1e-5 relative on
  # beta_d). A wrong formula is off by far more than 1e-4.
  if schedule_type == "time_uniform":
    # exp(.) - 1 also cancels in float32 when sigma^2 is below ~1e-3: the official values
    # carry the same ~1% error at sigma_min = 0.002.
    big = ref > 0.1
    np.testing.assert_allclose(t32[big], ref[big], rtol=1e-4)
    np.testing.assert_allclose(t32, ref, rtol=3e-2)
  else:
    np.testing.assert_allclose(t32, ref, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule_type="cosine"), r"schedule_type: .*'cosine'.*\['logsnr', 'polynomial', 'time_uniform'\]"),
    (dict(num_steps=1), r"num_steps: .*1"),
    (dict(num_steps=2.5), r"num_steps"),
    (dict(sigma_min=80.0), r"sigma_min, sigma_max"),
    (dict(sigma_min=0.0), r"sigma_min, sigma_max"),
    (dict(rho=0.0), r"rho"),
    (dict(dtype=jnp.int32), r"dtype"),
])
def test_errors_are_one_line(kwargs, match):
  args = dict(num_steps=4, sigma_min=0.002, sigma_max=80.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match) as info:
    schedules.get_schedule(**args)
  assert "\n" not in str(info.value)


def test_registry_key_error_lists_names():
  with pytest.raises(KeyError, match=r"'cosine': unknown schedule; valid: \['logsnr', 'polynomial', 'time_uniform'\]"):
    schedules.SCHEDULES["cosine"]  # pylint: disable=pointless-statement
