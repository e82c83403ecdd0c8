"""The solvers trace the network once per step body (lax.scan), not once per step, also inside
the SFD iteration, and the scanned solvers agree with their eager (Python loop) runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax import schedules, sfd, solvers
from sfd_jax.config_types import DistillSettings, OptimSettings


def gaussian_denoise(x, sigma):
  """D of N(0.3, 0.5^2 I) data: a closed form, so the solvers run without a network."""
  return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


def counting(fn, calls):
  def wrapped(*args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)
  return wrapped


# Denoiser calls in one step body: Heun and DPM-Solver-2 call it twice per step.
SOLVER_CASES = [("euler", {}, 1), ("heun", {}, 2), ("dpm", {}, 2), ("ipndm", dict(max_order=4), 1),
                ("ipndm", dict(max_order=1), 1), ("dpmpp", dict(max_order=3), 1),
                ("dpmpp", dict(max_order=2, predict_x0=False, lower_order_final=False), 1)]


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("solver, opts, per_step", SOLVER_CASES, ids=[f"{s}{o}" for s, o, _ in SOLVER_CASES])
def test_jit_traces_denoiser_once_per_body_and_matches_eager(solver, opts, per_step, afs):
  z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 1)), jnp.float32)
  for num_steps in (6, 13):
    t = schedules.get_schedule(num_steps, 0.002, 80.0)
    calls = []
    traced = jax.jit(lambda z: solvers.teacher_trajectory(counting(gaussian_denoise, calls), z, t, solver,
                                                          afs=afs, **opts))(z)
    # The scan body once, plus the AFS first step outside the scan (one call fewer: no D there).
    assert len(calls) == per_step + (per_step - 1 if afs else 0), (num_steps, len(calls))
    eager_calls = []
    eager = solvers.teacher_trajectory(counting(gaussian_denoise, eager_calls), z, t, solver, afs=afs, **opts)
    assert len(eager_calls) == per_step * (num_steps - 1) - afs  # eagerly: every NFE
    assert traced.shape == eager.shape == (num_steps, 2, 4, 4, 1)
    # Same operations; only XLA's compilation of them (fusion, folding) differs.
    np.testing.assert_allclose(traced, eager, rtol=2e-6, atol=2e-6 * float(t[0]))
    last = jax.jit(lambda z: solvers.sample(gaussian_denoise, z, t, solver, afs=afs, **opts))(z)
    np.testing.assert_allclose(last, traced[-1], rtol=2e-6, atol=2e-6 * float(t[0]))


def toy_denoise(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None, *,
                train=False, dropout_rng=None):
  p = variables['params']
  return x * p['w'] / (1 + sigma ** 2) + p['b']


@pytest.mark.parametrize("afs", [True, False])
def test_sfd_step_traces_networks_a_bounded_number_of_times(afs):
  """Teacher: one trace of the scanned solver step per num_steps; student: ONE trace of the
  interval program for every interval of every num_steps (interval times are traced values)."""
  optim = OptimSettings()
  optimizer = sfd.make_optimizer(optim)
  teacher_vars = {'params': {'w': jnp.float32(1.1), 'b': jnp.float32(0.1)}}
  latents = 80.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  teacher_calls, student_calls = [], []
  step = sfd.make_step(sfd.Denoisers(counting(toy_denoise, student_calls), counting(toy_denoise, teacher_calls)),
                       optimizer, debug=True)
  for k, num_steps in enumerate((3, 4, 7)):
    settings = dataclasses.replace(DistillSettings(num_steps=num_steps), afs=afs)
    params = {'w': jnp.float32(1.0), 'b': jnp.float32(0.0)}
    state, metrics = step(sfd.TrainState(params, optimizer.init(params), {}), teacher_vars, latents, None,
                          jax.random.key(1), optim.lr, settings)
    debug = metrics.pop('debug')
    num_teacher = (settings.M + 1) * (num_steps - 1) + 1
    assert len(teacher_calls) == k + 1, (num_steps, len(teacher_calls))
    assert len(student_calls) == 1, (num_steps, len(student_calls))
    n = num_steps - 1
    assert all(metrics[key].shape == (n,) for key in ('loss', 'grad_norm', 'nonfinite', 'redo'))
    assert set(metrics) == {'loss', 'grad_norm', 'nonfinite', 'redo', 'teacher_redo'}
    assert len(debug['out']) == len(debug['denoised']) == n and len(debug['grads']) == n - afs
    assert (debug['denoised'][0] is None) == afs
    assert debug['trajectory'].shape == (num_teacher, 2, 4, 4, 3)
    assert float(metrics['grad_norm'][0] if not afs else metrics['grad_norm'][1]) > 0
    # Adam moves a parameter by at most about lr per step: n - afs steps were taken.
    moved = abs(float(state.params['b']))
    assert 0 < moved <= (n - afs) * optim.lr * 1.01, moved
