"""Tests for sfd_jax.solvers: convergence orders on closed-form ODEs, AFS, the official teacher
trajectory (replayed and through the fixture network), thresholding, errors."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EDM_FIXTURES
from sfd_jax import schedules, solvers


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class Counted:
  """Wraps a denoiser and counts its calls (NFE)."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, x, sigma):
    self.calls.append(float(sigma))
    return self.fn(x, sigma)


# ----------------------------------------------------------------------------------------
# Gaussian data N(mu, s^2 I): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the
# PF-ODE solution x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2) (x_0 - mu).

MU, S = 0.3, 0.5


def gaussian_denoise(x, sigma):
  return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def gaussian_exact(x0, sigma0, sigma):
  return MU + jnp.sqrt(S ** 2 + sigma ** 2) / jnp.sqrt(S ** 2 + sigma0 ** 2) * (x0 - MU)


def fitted_order(errors, num_steps):
  """Least-squares slope of log(error) against log(step size 1 / (N - 1))."""
  h = 1.0 / (np.asarray(num_steps) - 1)
  return np.polyfit(np.log(h), np.log(errors), 1)[0]


# Expected global orders of the official arithmetic. Euler 1, Heun 2, DPM-Solver-2 2; the
# first-order DPM-Solver++ step is exactly Euler in the VE form. Two things cap the multistep
# solvers at 2 on this problem:
#  * iPNDM uses fixed Adams-Bashforth coefficients, exact only for equal steps in t; on
#    the log-SNR grid its local error is O(h^3), and its Euler warm-up step is O(h^2) anyway.
#  * the official third-order DPM-Solver++ update uses D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 D''/2
#    where the Taylor expansion needs h^2 D'', so its local error is O(h^3): order 2 (doubling
#    D2 gives local order 4; measured while writing this test). The port keeps the official
#    formula because the SFD targets are defined by it.
GAUSSIAN_CASES = [
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpm", {}, 2),
    ("ipndm", dict(max_order=1), 1),
    ("ipndm", dict(max_order=2), 2),
    ("ipndm", dict(max_order=3), 2),
    ("ipndm", dict(max_order=4), 2),
    ("dpmpp", dict(max_order=1), 1),
    ("dpmpp", dict(max_order=2), 2),
    ("dpmpp", dict(max_order=3), 2),
    ("dpmpp", dict(max_order=2, predict_x0=False), 2),
    ("dpmpp", dict(max_order=3, predict_x0=False), 2),
    ("dpmpp", dict(max_order=3, lower_order_final=False), 2),
]


@pytest.mark.parametrize("solver, opts, expected", GAUSSIAN_CASES,
                         ids=[f"{s}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for s, o, _ in GAUSSIAN_CASES])
def test_gaussian_convergence_order(x64, solver, opts, expected):
  z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6)))
  num_steps = [65, 129, 257]
  errors = []
  for n in num_steps:
    t = schedules.get_schedule(n, 0.002, 80.0, "logsnr", dtype=jnp.float64)
    # Thresholding would change the ODE (|x0| > 1 happens here), so it is off.
    x = solvers.sample(gaussian_denoise, z, t, solver, thresholding=False, **opts)
    assert x.dtype == jnp.float64
    errors.append(float(jnp.max(jnp.abs(x - gaussian_exact(z * t[0], t[0], t[-1])))))
  order = fitted_order(errors, num_steps)
  # Observed: 0.99 for the first-order solvers, 1.98-2.06 for the rest.
  assert abs(order - expected) < 0.2, (errors, order)
  assert errors[-1] < 2e-2


# ----------------------------------------------------------------------------------------
# Multistep orders with the warm-up made harmless: an ODE whose direction is flat at the
# start, d(t) = (T0 - t)^4, so every warm-up step's local error is O(h^5).

T0, T1 = 3.0, 1.0


def flat_start_denoise(x, t):
  return x - t * (T0 - t) ** 4


@pytest.mark.parametrize("max_order, expected", [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_ipndm_order_on_equal_steps(x64, max_order, expected):
  x0 = jnp.ones((2, 3))
  num_steps = [17, 33, 65]
  errors = []
  for n in num_steps:
    t = jnp.linspace(T0, T1, n)
    x = solvers.sample(flat_start_denoise, x0 / T0, t, "ipndm", max_order=max_order)
    errors.append(float(jnp.max(jnp.abs(x - (x0 - (T0 - T1) ** 5 / 5)))))
  order = fitted_order(errors, num_steps)
  # Observed 0.98, 1.96, 2.95, 3.98.
  assert abs(order - expected) < 0.15, (errors, order)


# DPM-Solver++ with a data prediction that depends on lambda = -log t only, flat at the start:
# D = (lambda - L0)^4, x(t) = t (x(t_0) / t_0 + int_{L0}^{lambda} e^l (l - L0)^4 dl) in closed form.
L0, L1 = -np.log(5.0), -np.log(0.5)


def lambda_denoise(x, t):
  return (-jnp.log(t) - L0) ** 4 + 0 * x


def lambda_exact(z, t):
  """Solution at t from x(t_0) = z t_0 (so x(t_0) / t_0 = z)."""
  u = -jnp.log(t) - L0
  integral = jnp.exp(L0) * (jnp.exp(u) * (u ** 4 - 4 * u ** 3 + 12 * u ** 2 - 24 * u + 24) - 24)
  return t * (z + integral)


@pytest.mark.parametrize("opts, expected", [
    (dict(max_order=1), 1), (dict(max_order=2), 2), (dict(max_order=2, predict_x0=False), 2),
    # The official third-order update: second order (see GAUSSIAN_CASES), even without the
    # first-order final step of lower_order_final.
    (dict(max_order=3, lower_order_final=False), 2)])
def test_dpmpp_order_on_flat_start(x64, opts, expected):
  x0 = jnp.ones((2, 3))
  num_steps = [33, 65, 129]
  errors = []
  for n in num_steps:
    t = jnp.exp(-jnp.linspace(L0, L1, n))
    x = solvers.sample(lambda_denoise, x0, t, "dpmpp", thresholding=False, **opts)
    errors.append(float(jnp.max(jnp.abs(x - lambda_exact(x0, t[-1])))))
  order = fitted_order(errors, num_steps)
  # Observed 1.00, 1.93, 1.91, 2.12.
  assert abs(order - expected) < 0.2, (errors, order)


# ----------------------------------------------------------------------------------------
# AFS.

ALL_SOLVERS = [("euler", {}), ("heun", {}), ("dpm", {}), ("ipndm", dict(max_order=4)),
               ("dpmpp", dict(max_order=3)), ("dpmpp", dict(max_order=2, predict_x0=False))]


def afs_denoise(x, sigma):
  """The denoiser AFS assumes: (x - D) / sigma = x / sqrt(1 + sigma^2) exactly."""
  return x - sigma * x / jnp.sqrt(1 + sigma ** 2)


def _nfe(solver, num_steps):
  return (num_steps - 1) * (2 if solver in ("heun", "dpm") else 1)


@pytest.mark.parametrize("solver, opts", ALL_SOLVERS, ids=[f"{s}{o}" for s, o in ALL_SOLVERS])
def test_afs_is_exact_where_its_assumption_holds(x64, solver, opts):
  # With that denoiser the analytical first step IS the ODE direction, so AFS must change
  # nothing (in every solver, including DPM-Solver++'s x0 = x - t d and the multistep
  # histories) except saving the first network call.
  z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)))
  t = schedules.get_schedule(7, 0.002, 80.0, dtype=jnp.float64)
  plain, afs = Counted(afs_denoise), Counted(afs_denoise)
  ref = solvers.sample(plain, z, t, solver, thresholding=False, return_trajectory=True, **opts)
  out = solvers.sample(afs, z, t, solver, afs=True, thresholding=False, return_trajectory=True, **opts)
  chex.assert_trees_all_close(out, ref, rtol=1e-13, atol=1e-13)
  assert len(plain.calls) == _nfe(solver, 7)
  assert len(afs.calls) == _nfe(solver, 7) - 1
  assert float(t[0]) not in afs.calls[:1]


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("solver, opts", ALL_SOLVERS, ids=[f"{s}{o}" for s, o in ALL_SOLVERS])
def test_registry_nfe_is_the_number_of_network_calls(solver, opts, afs):
  counted = Counted(gaussian_denoise)
  t = schedules.get_schedule(6, 0.002, 80.0)
  solvers.sample(counted, jnp.ones((2, 3)), t, solver, afs=afs, **opts)
  assert len(counted.calls) == solvers.nfe(solver, 6, afs)
  assert solvers.num_steps_for_nfe(solver, solvers.nfe(solver, 6, afs), afs) == 6


@pytest.mark.parametrize("solver, opts", ALL_SOLVERS, ids=[f"{s}{o}" for s, o in ALL_SOLVERS])
def test_afs_changes_only_the_first_direction(x64, solver, opts):
  # On data that break the assumption, AFS must differ from the plain solver (the switch works).
  z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)))
  t = schedules.get_schedule(5, 0.002, 80.0, dtype=jnp.float64)
  ref = solvers.sample(gaussian_denoise, z, t, solver, thresholding=False, **opts)
  out = solvers.sample(gaussian_denoise, z, t, solver, afs=True, thresholding=False, **opts)
  assert float(jnp.max(jnp.abs(out - ref))) > 1e-6


def test_afs_algebra_for_unit_gaussian(x64):
  # mu = 0, s = 1: D = x / (1 + sigma^2), so the exact direction is sigma x / (1 + sigma^2),
  # while AFS takes x / sqrt(1 + sigma^2): their ratio is sqrt(1 + sigma^2) / sigma, i.e. AFS is
  # exact only as sigma -> infinity (relative error 1/(2 sigma^2) = 7.8e-5 at sigma = 80).
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4))) * 80
  for sigma in (80.0, 10.0, 1.0):
    d_exact = solvers.ode_direction(lambda x, s: x / (1 + s ** 2), x, sigma)
    d_afs = solvers.ode_direction(None, x, sigma, afs=True)
    np.testing.assert_allclose(d_afs / d_exact, np.sqrt(1 + sigma ** 2) / sigma, rtol=1e-14)
  np.testing.assert_allclose(np.sqrt(1 + 80.0 ** 2) / 80.0 - 1, 1 / (2 * 80.0 ** 2), rtol=1e-3)


def test_euler_step():
  x = jnp.full((2, 3), 4.0)
  t_cur, t_next = jnp.float32(2.0), jnp.float32(1.0)
  out = solvers.euler_step(lambda x, s: x / 2, x, t_cur, t_next)
  np.testing.assert_allclose(out, x + (1.0 - 2.0) * (x - x / 2) / 2.0)
  # AFS: no network call at all.
  out = solvers.euler_step(None, x, t_cur, t_next, afs=True)
  np.testing.assert_allclose(out, x - x / np.sqrt(5.0), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Bookkeeping shared by all solvers.


@pytest.mark.parametrize("solver, opts", ALL_SOLVERS, ids=[f"{s}{o}" for s, o in ALL_SOLVERS])
def test_trajectory_shape_start_and_nfe(solver, opts):
  z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 1)), jnp.float32)
  t = schedules.get_schedule(6, 0.002, 80.0)
  counted = Counted(gaussian_denoise)
  traj = solvers.teacher_trajectory(counted, z, t, solver, **opts)
  assert traj.shape == (6, 2, 4, 4, 1) and traj.dtype == jnp.float32
  np.testing.assert_array_equal(traj[0], z * t[0])
  np.testing.assert_array_equal(traj[-1], solvers.sample(gaussian_denoise, z, t, solver, **opts))
  assert len(counted.calls) == _nfe(solver, 6)


def test_jit_matches_eager_and_traces_once():
  z = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8)), jnp.float32)
  t = schedules.get_schedule(8, 0.002, 80.0)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(z):
    return solvers.sample(gaussian_denoise, z, t, "dpmpp", max_order=3)

  eager = solvers.sample(gaussian_denoise, z, t, "dpmpp", max_order=3)
  chex.assert_trees_all_close(run(z), eager, rtol=1e-5, atol=1e-5)
  run(z + 1)


def test_ipndm_order_one_is_euler():
  z = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8)), jnp.float32)
  t = schedules.get_schedule(6, 0.002, 80.0)
  np.testing.assert_array_equal(solvers.sample(gaussian_denoise, z, t, "ipndm", max_order=1),
                                solvers.sample(gaussian_denoise, z, t, "euler"))


def test_dpmpp_order_schedule():
  # The fixture README's order sequence for 13 time points, max_order 3, lower_order_final.
  orders = [solvers._dpmpp_order(i, 13, 3, True) for i in range(12)]
  assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 2, 1]
  assert [solvers._dpmpp_order(i, 5, 3, False) for i in range(4)] == [1, 2, 3, 3]


# ----------------------------------------------------------------------------------------
# Dynamic thresholding.


def test_threshold_scales_match_fixture(fixture32):
  # torch.quantile's linear interpolation reproduced bit for bit, for all 12 teacher calls.
  for k in range(12):
    x0 = jnp.asarray(np.transpose(fixture32["teacher_denoised_iter1"][k], (0, 2, 3, 1)))
    np.testing.assert_array_equal(solvers.threshold_scale(x0), fixture32["teacher_threshold_s_iter1"][k])


def test_dynamic_threshold_clips_and_rescales():
  rng = np.random.default_rng(6)
  quiet = rng.uniform(-0.9, 0.9, (1, 1000))
  quiet[0, :5] = 7.0  # 0.5% beyond 1: the 0.995 quantile still lies below 1, so s = 1
  loud = rng.uniform(-3.0, 3.0, (1, 1000))
  x0 = jnp.asarray(np.concatenate([quiet, loud]), jnp.float32)
  out = np.asarray(solvers.dynamic_threshold(x0))
  np.testing.assert_array_equal(solvers.threshold_scale(x0)[0], 1.0)
  np.testing.assert_array_equal(out[0], np.clip(quiet[0].astype(np.float32), -1, 1))  # clipped, not scaled
  s = np.quantile(np.abs(loud[0]), 0.995)  # NumPy's default is the same linear rule
  np.testing.assert_allclose(out[1], np.clip(loud[0], -s, s) / s, rtol=1e-6)
  assert np.max(np.abs(out[1])) == 1.0


# ----------------------------------------------------------------------------------------
# The official teacher trajectory (DPM-Solver++(3M), thresholding on, 13 points).


def _start(fixture, t_steps):
  """The fixture's teacher start: (latents / t_steps[0]) * t_teacher[0]; latents are 80 randn.

  The division is done in NumPy: XLA rewrites division by a scalar as multiplication by its
  reciprocal, one ulp away from torch.
  """
  z = fixture["latents_iter1"] / np.asarray(t_steps)[0]
  return jnp.asarray(np.transpose(z, (0, 2, 3, 1)))  # NCHW -> NHWC


def _nchw(traj):
  return np.transpose(np.asarray(traj), (0, 1, 4, 2, 3))


def _max_per_step(a):
  return np.abs(a).max(axis=tuple(range(1, a.ndim)))


def test_replayed_teacher_trajectory(fixture32, fixture64):
  """Solver arithmetic alone: the denoiser returns the recorded outputs in call order."""
  recorded = np.transpose(fixture32["teacher_denoised_iter1"], (0, 1, 3, 4, 2))
  t_student = schedules.get_schedule(4, 0.006, 80.0)
  t_teacher = schedules.get_schedule(13, 0.006, 80.0)

  def replay(x, sigma):
    k = len(replay.sigmas)
    replay.sigmas.append(float(sigma))
    return jnp.asarray(recorded[k])

  replay.sigmas = []
  traj = _nchw(solvers.teacher_trajectory(replay, _start(fixture32, t_student), t_teacher, "dpmpp",
                                          max_order=3, predict_x0=True, lower_order_final=True))
  np.testing.assert_array_equal(replay.sigmas, fixture32["teacher_t_steps"][:-1])
  ref = fixture32["teacher_traj_full_iter1"]
  # Tolerance per trajectory index: the official code's own float32-vs-float64 gap there
  # (README: up to 3.3e-5 at values up to 332). Observed: at most a quarter of it.
  gap = _max_per_step(fixture64["teacher_traj_full_iter1"] - ref)
  assert np.all(_max_per_step(traj - ref) <= gap), (_max_per_step(traj - ref), gap)
  np.testing.assert_array_equal(traj[fixture32["tea_slice"]], traj[[4, 8, 12]])
  np.testing.assert_allclose(traj[[4, 8, 12]], fixture32["teacher_targets_iter1"], atol=gap.max(), rtol=0)


def test_replay_without_thresholding_fails(fixture32):
  # The fixture really exercises thresholding: switching it off moves the last steps by far
  # more than the tolerance above.
  recorded = np.transpose(fixture32["teacher_denoised_iter1"], (0, 1, 3, 4, 2))
  calls = iter(range(12))
  traj = _nchw(solvers.teacher_trajectory(
      lambda x, s: jnp.asarray(recorded[next(calls)]), _start(fixture32, schedules.get_schedule(4, 0.006, 80.0)),
      schedules.get_schedule(13, 0.006, 80.0), "dpmpp", max_order=3, thresholding=False))
  assert _max_per_step(traj - fixture32["teacher_traj_full_iter1"])[-1] > 1e-2


@pytest.fixture(scope="module")
def teacher():
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  return load_teacher(EDM_FIXTURES / "edm_ddpmpp_uncond.pkl")


def test_teacher_trajectory_through_network(teacher, fixture32, fixture64):
  """End to end in float32: importer + network port + solver against the official run."""
  denoise = jax.jit(functools.partial(teacher.denoise, teacher.params))
  t_teacher = schedules.get_schedule(13, 0.006, 80.0)
  traj = _nchw(solvers.teacher_trajectory(
      denoise, _start(fixture32, schedules.get_schedule(4, 0.006, 80.0)), t_teacher, "dpmpp", max_order=3))
  ref32, ref64 = fixture32["teacher_traj_full_iter1"], fixture64["teacher_traj_full_iter1"]
  gap = _max_per_step(ref64 - ref32)
  # Our float32 run must be as close to the float64 reference as the official float32 run is,
  # up to a factor 2 (the network port adds its own float32 rounding; observed <= 1.45).
  assert np.all(_max_per_step(traj - ref64) <= 2 * gap), (_max_per_step(traj - ref64) / gap)


def test_teacher_trajectory_through_network_float64(teacher, fixture32, fixture64):
  """The same in float64 against the official float64 rerun: agreement to ~1e-14."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), teacher.params)
    denoise = jax.jit(functools.partial(teacher.denoise, params))
    t_teacher = schedules.get_schedule(13, 0.006, 80.0, dtype=jnp.float64)
    t_student = schedules.get_schedule(4, 0.006, 80.0, dtype=jnp.float64)
    z = fixture32["latents_iter1"].astype(np.float64) / np.asarray(t_student)[0]
    traj = solvers.teacher_trajectory(denoise, jnp.asarray(np.transpose(z, (0, 2, 3, 1))), t_teacher,
                                      "dpmpp", max_order=3)
    assert traj.dtype == jnp.float64
    # Observed max 2.8e-14 (values up to 332).
    np.testing.assert_allclose(_nchw(traj), fixture64["teacher_traj_full_iter1"], rtol=0, atol=1e-11)


# ----------------------------------------------------------------------------------------
# Errors: one line, before any denoiser call or compilation.


@pytest.mark.parametrize("solver, kwargs, num_steps, match", [
    ("rk4", {}, 5, r"solver: unknown solver 'rk4'; valid: \['dpm', 'dpmpp', 'euler', 'heun', 'ipndm'\]"),
    ("dpmpp", dict(max_order=4), 5, r"max_order: dpmpp needs 1\.\.3, got 4"),
    ("ipndm", dict(max_order=0), 5, r"max_order: ipndm needs 1\.\.4, got 0"),
    ("ipndm", dict(max_order=5), 5, r"max_order: ipndm needs 1\.\.4"),
    ("euler", {}, 1, r"num_steps: need at least 2"),
])
def test_bad_settings_fail_before_tracing(solver, kwargs, num_steps, match):
  counted = Counted(gaussian_denoise)
  t = jnp.linspace(80.0, 0.002, num_steps)
  with pytest.raises(ValueError, match=match) as info:
    solvers.sample(counted, jnp.ones((1, 2)), t, solver, **kwargs)
  assert "\n" not in str(info.value) and not counted.calls
  # Inside jit the error comes from tracing, before anything is compiled.
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda z: solvers.sample(counted, z, t, solver, **kwargs))(jnp.ones((1, 2)))
  assert not counted.calls


def test_schedule_must_be_one_dimensional():
  with pytest.raises(ValueError, match=r"t_steps: need a 1-D schedule"):
    solvers.sample(gaussian_denoise, jnp.ones((1, 2)), jnp.ones((2, 2)), "euler")


def test_max_order_is_ignored_by_one_step_solvers():
  # As in the official code (a config's max_order is for the multistep teachers).
  z = jnp.ones((1, 2))
  t = schedules.get_schedule(4, 0.002, 80.0)
  np.testing.assert_array_equal(solvers.sample(gaussian_denoise, z, t, "heun", max_order=7),
                                solvers.sample(gaussian_denoise, z, t, "heun"))


def test_registry_key_error_lists_names():
  with pytest.raises(KeyError, match=r"'rk4': unknown solver; valid: \['dpm', 'dpmpp', 'euler', 'heun', 'ipndm'\]"):
    solvers.SOLVERS["rk4"]  # pylint: disable=pointless-statement
