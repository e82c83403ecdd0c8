"""Training-free ODE solvers for the EDM probability-flow ODE dx/dt = (x - D(x, t)) / t.

Pure functions of a `denoise(x, sigma)` callable, the latents and a schedule; no Flax, no
state. The arithmetic follows the official SFD code (zju-pi/diff-sampler, `sfd-main/`)
operation by operation, so that a float32 teacher trajectory matches the reference data to
rounding. Under `jax.jit` (or any other trace) the steps run as one `lax.scan`, so a network
is traced and compiled once per distinct step body, not once per step; per-step values (times,
orders) are scanned arrays and the order-dependent update is chosen with `lax.switch`, each
branch being the official arithmetic of that order. Called eagerly, the same step functions
run in a Python loop. That second path is kept on purpose, measured: the demo evaluates 30
samplers (every baseline solver, AFS and NFE, plus two Heun references) around ONE jitted
network in 274 s, against 814 s when each sampler is its own jitted scan (2-core CPU, loaded,
2026-12-02; `experiments/bench_eager_vs_jit_baselines.py`); a denoiser with Python side effects
(call counting, replayed reference outputs) also sees every step there.

Solvers (`SOLVERS`): 'euler', 'heun' (EDM's 2nd order), 'dpm' (DPM-Solver-2), 'ipndm'
(improved PNDM, orders 1-4) and 'dpmpp' (multistep DPM-Solver++, orders 1-3). Any of them
can start with the analytical first step (AFS), which replaces the first denoiser call by
d = x / sqrt(1 + t^2).
"""
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.registry import Registry

# Official dynamic-thresholding quantile of |x0| (per sample).
THRESHOLD_QUANTILE = 0.995
# DPM-Solver-2 puts its intermediate point at t_mid = t_next^r * t_cur^(1-r).
DPM2_R = 0.5
# iPNDM's Adams-Bashforth coefficients on (d_cur, d_prev, d_prev2, ...), and their divisor.
_IPNDM_COEFFS = {
    1: ((1,), 1),
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
}


# ----------------------------------------------------------------------------------------
# Single steps shared with the SFD training step.


def afs_direction(x, t_cur):
  """The analytical first step's direction d = x / sqrt(1 + t^2) (no network call).

  It takes the noise in x to be x divided by the standard deviation sqrt(1 + t^2) that x has
  at noise level t when the data have unit variance.
  """
  return x / jnp.sqrt(1 + t_cur ** 2)


def ode_direction(denoise, x, t_cur, *, afs=False):
  """d = (x - D(x, t)) / t, or the AFS direction when `afs` (then D is not called)."""
  if afs:
    return afs_direction(x, t_cur)
  return (x - denoise(x, t_cur)) / t_cur


def euler_step(denoise, x, t_cur, t_next, *, afs=False):
  """One Euler step x + (t_next - t_cur) d of the probability-flow ODE.

  Args:
    denoise: `denoise(x, sigma) -> D(x; sigma)`.
    x: the current point, any shape (batch first).
    t_cur: current noise level (scalar).
    t_next: next noise level (scalar).
    afs: use the analytical first step d = x / sqrt(1 + t_cur^2) instead of calling `denoise`.

  Returns:
    The point at t_next, same shape and dtype as x.
  """
  return x + (t_next - t_cur) * ode_direction(denoise, x, t_cur, afs=afs)


def dynamic_threshold(x0, quantile=THRESHOLD_QUANTILE):
  """The official DPM-Solver++ dynamic thresholding of a batch of x0 predictions.

  Per sample, s = max(quantile of |x0| (linear interpolation, as torch.quantile), 1) and
  x0 <- clip(x0, -s, s) / s. Where at most 0.5% of a sample's values lie beyond +-1, s = 1:
  those few values are clipped to +-1 and nothing is rescaled.

  Args:
    x0: `[batch, ...]` denoised predictions.
    quantile: the quantile of |x0| taken as the threshold.

  Returns:
    The thresholded x0, same shape and dtype.
  """
  return _apply_threshold(x0, threshold_scale(x0, quantile))


def threshold_scale(x0, quantile=THRESHOLD_QUANTILE):
  """Per-sample scale s = max(quantile(|x0|), 1) of `dynamic_threshold`, shape `[batch]`."""
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  n = flat.shape[1]
  # torch.quantile's rank arithmetic, in the data's precision; the rank is static.
  dtype = np.dtype(x0.dtype)
  rank = dtype.type(quantile) * dtype.type(n - 1)
  below, above = int(np.floor(rank)), int(np.ceil(rank))
  weight = rank - dtype.type(below)
  # Only the top of the sorted values is needed: the (n - below) largest, in descending order.
  top = jax.lax.top_k(flat, n - below)[0]
  v_below, v_above = top[:, n - 1 - below], top[:, n - 1 - above]
  # torch.lerp's two-sided formula, so the interpolation rounds as the reference does.
  if weight < 0.5:
    s = v_below + weight * (v_above - v_below)
  else:
    s = v_above - (v_above - v_below) * (1 - weight)
  return jnp.maximum(s, 1)


def _apply_threshold(x0, s):
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


# ----------------------------------------------------------------------------------------
# Solvers. Each is a step function `step(denoise, carry, per_step, *, afs) -> carry` whose
# carry starts with the current point x (multistep solvers add fixed-size history buffers),
# plus the per-step values it scans over; `_integrate` drives it over all intervals.


def _is_traced(x):
  """Whether x is being traced (jit, grad, vmap...) rather than computed eagerly."""
  return isinstance(x, jax.core.Tracer)


def _integrate(step, denoise, carry, per_step, *, afs, keep_points):
  """Applies `step` once per interval and returns the `[num_steps, ...]` points (or the last).

  Traced, the steps after the (static) AFS first step run as one `lax.scan`, so the denoiser
  is traced and compiled once per distinct step body instead of once per step. Eagerly the
  steps run as a Python loop over the same step function: there is nothing to compile, and a
  denoiser with Python side effects (call counting, replayed outputs) sees every step.

  Args:
    step: `step(denoise, carry, per_step_i, *, afs) -> carry`, carry[0] the point x.
    denoise: the denoiser handed to `step`.
    carry: the initial carry.
    per_step: a tuple of arrays (or of tuples of arrays) with one leading entry per interval.
    afs: the first step uses the analytical first step.
    keep_points: return all points (else only the last one).
  """
  num_intervals = jax.tree.leaves(per_step)[0].shape[0]
  at = lambda i: jax.tree.map(lambda a: a[i], per_step)
  points = [carry[0]]
  first = 0
  if afs:
    carry = step(denoise, carry, at(0), afs=True)
    points.append(carry[0])
    first = 1
  if first == num_intervals or not _is_traced(carry[0]):
    for i in range(first, num_intervals):
      carry = step(denoise, carry, at(i), afs=False)
      points.append(carry[0])
    return jnp.stack(points) if keep_points else points[-1]

  def body(carry, values):
    carry = step(denoise, carry, values, afs=False)
    return carry, carry[0] if keep_points else None

  rest = jax.tree.map(lambda a: a[first:], per_step)
  carry, scanned = jax.lax.scan(body, carry, rest)
  if not keep_points:
    return carry[0]
  return jnp.concatenate([jnp.stack(points), scanned])


def _by_order(order, branches, *operands):
  """branches[order - 1](*operands): a plain call for a static order, `lax.switch` if traced.

  Each branch is the official arithmetic of one order, so the operations stay those of the
  unrolled solver whichever way the order is chosen.
  """
  if _is_traced(order):
    return jax.lax.switch(order - 1, branches, *operands)
  return branches[int(order) - 1](*operands)


def _push(buffer, value):
  """Drops the oldest entry of a `[k, ...]` history buffer (newest last) and appends value."""
  return jnp.concatenate([buffer[1:], value[None]])


def _euler(denoise, carry, per_step, *, afs):
  (x,), (t_cur, t_next) = carry, per_step
  return (euler_step(denoise, x, t_cur, t_next, afs=afs),)


def _heun(denoise, carry, per_step, *, afs):
  """EDM's Heun: Euler predictor, then the trapezoid of d at both ends (every step)."""
  (x,), (t_cur, t_next) = carry, per_step
  d_cur = ode_direction(denoise, x, t_cur, afs=afs)
  x_pred = x + (t_next - t_cur) * d_cur
  d_prime = ode_direction(denoise, x_pred, t_next)
  return (x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime),)


def _dpm2(denoise, carry, per_step, *, afs):
  """DPM-Solver-2: Euler to the geometric midpoint, then a full step with d there."""
  r = DPM2_R
  (x,), (t_cur, t_next) = carry, per_step
  d_cur = ode_direction(denoise, x, t_cur, afs=afs)
  t_mid = (t_next ** r) * (t_cur ** (1 - r))
  x_mid = x + (t_mid - t_cur) * d_cur
  d_prime = ode_direction(denoise, x_mid, t_mid)
  return (x + (t_next - t_cur) * ((1 / (2 * r)) * d_prime + (1 - 1 / (2 * r)) * d_cur),)


def _ipndm_update(order, x, d_cur, history, t_cur, t_next):
  """x + (t_next - t_cur) (c_0 d_cur + c_1 d_prev + ...) / divisor with `order` coefficients.

  history: `[max_order - 1, ...]` previous directions, newest last.
  """
  coeffs, divisor = _IPNDM_COEFFS[order]
  combo = coeffs[0] * d_cur
  for j, c in enumerate(coeffs[1:], start=1):
    combo = combo + c * history[-j]
  return x + (t_next - t_cur) * combo / divisor


def _ipndm(denoise, carry, per_step, *, afs):
  """iPNDM: Adams-Bashforth on d with fixed coefficients; order min(max_order, i + 1).

  carry = (x, history of the last max_order - 1 directions or None); per_step holds the order.
  """
  (x, history), (t_cur, t_next, order) = carry, per_step
  d_cur = ode_direction(denoise, x, t_cur, afs=afs)
  if history is None:  # max_order 1: Euler, no history kept
    return (_ipndm_update(1, x, d_cur, history, t_cur, t_next), None)
  branches = [functools.partial(_ipndm_update, k) for k in range(1, history.shape[0] + 2)]
  x = _by_order(order, branches, x, d_cur, history, t_cur, t_next)
  return (x, _push(history, d_cur))


def _ipndm_solver(denoise, x, t_steps, *, afs, max_order, keep_points):
  num_intervals = t_steps.shape[0] - 1
  history = jnp.zeros((max_order - 1,) + x.shape, x.dtype) if max_order > 1 else None
  orders = np.asarray([min(max_order, i + 1) for i in range(num_intervals)], np.int32)
  return _integrate(_ipndm, denoise, (x, history), (t_steps[:-1], t_steps[1:], orders),
                    afs=afs, keep_points=keep_points)


def _dpmpp_order(i, num_steps, max_order, lower_order_final):
  """Order of multistep DPM-Solver++ at step i (0-based): warm up, then lower at the end."""
  if lower_order_final:
    return i + 1 if i + 1 < max_order else min(max_order, num_steps - (i + 1))
  return min(max_order, i + 1)


def _dpmpp_coeffs(ts, t, order, predict_x0):
  """The scalar factors of one multistep DPM-Solver++ update (VE form) from ts[-1] to t.

  r = h_prev / h ratios handle the non-uniform steps in lambda = -log t. The factors are
  split from their combination with the models (`_dpmpp_apply`) so that the solver computes
  those of all steps before its scan over steps: from a constant schedule they are folded at
  compile time, as in an unrolled loop, rather than computed by the scan's runtime kernels.

  Kept as in the official code although its third-order term is off by a factor 2: D2 =
  (D1_0 - D1_1) / (r0 + r1) approximates h^2 D''/2 where the expansion needs h^2 D'', so
  order 3 converges at order 2 (tests/test_solvers.py measures it). SFD's targets are
  defined by this arithmetic.

  Args:
    ts: the times of the last `order` models, oldest first (scalars, or arrays with one
      entry per step: the factors of all steps are then computed at once).
    t: the time stepped to.
    order: 1, 2 or 3.
    predict_x0: data-prediction form.

  Returns:
    A tuple of scalars (or per-step arrays) that `_dpmpp_apply` combines with the models.
  """
  lambda_t = -jnp.log(t)
  lambdas = [-jnp.log(s) for s in ts]
  h = lambda_t - lambdas[-1]
  phi_1 = jnp.expm1(-h) if predict_x0 else jnp.expm1(h)
  c = [t / ts[-1], phi_1] if predict_x0 else [t * phi_1]
  if order == 1:
    return tuple(c)
  r0 = (lambdas[-1] - lambdas[-2]) / h
  c += [1. / r0, 0.5 * phi_1 if predict_x0 else 0.5 * t * phi_1]
  if order == 2:
    return tuple(c)
  r1 = (lambdas[-2] - lambdas[-3]) / h
  c += [1. / r1, r0 / (r0 + r1), 1. / (r0 + r1)]
  if predict_x0:
    phi_2 = phi_1 / h + 1.
    phi_3 = phi_2 / h - 0.5
    return tuple(c + [phi_2, phi_3])
  phi_2 = phi_1 / h - 1.
  phi_3 = phi_2 / h - 0.5
  return tuple(c + [t * phi_2, t * phi_3])


def _dpmpp_apply(x, models, coeffs, order, predict_x0):
  """One DPM-Solver++ update: x and the last `order` models (newest last) with the factors.

  The models are thresholded x0 predictions (predict_x0) or directions d (= eps). The
  operations and their order are the official ones, with the scalar products precomputed.
  """
  m0 = models[-1]
  if predict_x0:
    ratio, phi_1 = coeffs[:2]
    x_t = ratio * x - phi_1 * m0
    coeffs = coeffs[2:]
  else:
    x_t = x - coeffs[0] * m0
    coeffs = coeffs[1:]
  if order == 1:
    return x_t
  inv_r0, half_phi_1 = coeffs[:2]
  d1_0 = inv_r0 * (m0 - models[-2])
  if order == 2:
    return x_t - half_phi_1 * d1_0
  inv_r1, w1, w2, phi_2, phi_3 = coeffs[2:]
  d1_1 = inv_r1 * (models[-2] - models[-3])
  d1 = d1_0 + w1 * (d1_0 - d1_1)
  d2 = w2 * (d1_0 - d1_1)
  if predict_x0:
    return x_t + phi_2 * d1 - phi_3 * d2
  return x_t - phi_2 * d1 - phi_3 * d2


def _dpmpp(denoise, carry, per_step, *, afs, predict_x0, thresholding):
  """Multistep DPM-Solver++ in the VE parameterisation (lambda = -log t).

  carry = (x, models): the last max_order models, newest last; they are thresholded x0
  (predict_x0) or d; the trajectory itself is never thresholded. With AFS the first x0 is
  x - t d_afs. per_step = (t_cur, order, factors of order 1, ..., factors of max_order).
  """
  (x, models), (t_cur, order, *coeffs) = carry, per_step
  if afs:
    d_cur = afs_direction(x, t_cur)
    denoised = x - t_cur * d_cur
  else:
    denoised = denoise(x, t_cur)
    d_cur = (x - denoised) / t_cur
  if predict_x0:
    model = dynamic_threshold(denoised) if thresholding else denoised
  else:
    model = d_cur
  models = _push(models, model)
  branches = [functools.partial(_dpmpp_branch, k, predict_x0) for k in range(1, len(coeffs) + 1)]
  return (_by_order(order, branches, x, models, coeffs), models)


def _dpmpp_branch(order, predict_x0, x, models, coeffs):
  return _dpmpp_apply(x, models, coeffs[order - 1], order, predict_x0)


def _dpmpp_solver(denoise, x, t_steps, *, afs, max_order, predict_x0, lower_order_final,
                  thresholding, keep_points):
  num_steps = t_steps.shape[0]
  steps = np.arange(num_steps - 1)
  orders = np.asarray([_dpmpp_order(i, num_steps, max_order, lower_order_final) for i in steps],
                      np.int32)
  # Factors of every order at every step; where a step has fewer models than the order, the
  # window repeats t_0 and those factors are never used.
  coeffs = tuple(
      _dpmpp_coeffs([t_steps[np.maximum(steps - j, 0)] for j in range(k - 1, -1, -1)],
                    t_steps[1:], k, predict_x0)
      for k in range(1, max_order + 1))
  models = jnp.zeros((max_order,) + x.shape, x.dtype)
  step = functools.partial(_dpmpp, predict_x0=predict_x0, thresholding=thresholding)
  return _integrate(step, denoise, (x, models), (t_steps[:-1], orders, *coeffs),
                    afs=afs, keep_points=keep_points)


def _one_step_solver(step):
  def solve(denoise, x, t_steps, *, afs, keep_points):
    return _integrate(step, denoise, (x,), (t_steps[:-1], t_steps[1:]), afs=afs,
                      keep_points=keep_points)
  return solve


class Solver(NamedTuple):
  """A registered solver."""
  fn: Callable                        # fn(denoise, x, t_steps, *, afs, keep_points, ...)
  orders: Optional[tuple]             # (lowest, highest, default) max_order; None: no order
  nfe_per_step: int                   # network calls per interval (AFS saves one in total)


SOLVERS = Registry('solver', {
    'euler': Solver(_one_step_solver(_euler), None, 1),
    'heun': Solver(_one_step_solver(_heun), None, 2),
    'dpm': Solver(_one_step_solver(_dpm2), None, 2),
    'ipndm': Solver(_ipndm_solver, (1, 4, 4), 1),
    'dpmpp': Solver(_dpmpp_solver, (1, 3, 3), 1),
})


def nfe(solver: str, num_steps: int, afs: bool = False) -> int:
  """Network calls of `solver` over `num_steps` time points (AFS replaces the first call)."""
  return SOLVERS[solver].nfe_per_step * (num_steps - 1) - int(afs)


def num_steps_for_nfe(solver: str, nfe_target: int, afs: bool = False) -> Optional[int]:
  """Time points that give exactly `nfe_target` network calls, or None if none does."""
  per_step = SOLVERS[solver].nfe_per_step
  intervals, remainder = divmod(nfe_target + int(afs), per_step)
  return intervals + 1 if remainder == 0 and intervals >= 1 else None


def validate_solver(solver, num_steps, max_order=None):
  """Checks the static solver settings; returns the effective max_order (None if unused).

  Args:
    solver: a key of `SOLVERS`.
    num_steps: number of time points (at least 2).
    max_order: the order of 'ipndm' (1-4) or 'dpmpp' (1-3); None means the official default
      (4 and 3). Ignored by the one-step solvers, as in the official code.

  Raises:
    ValueError: one line naming the bad argument.
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver: unknown solver {solver!r}; valid: {sorted(SOLVERS)}')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f'num_steps: need at least 2 time points (NFE + 1), got {num_steps!r}')
  orders = SOLVERS[solver].orders
  if orders is None:
    return None
  lowest, highest, default = orders
  if max_order is None:
    return default
  if isinstance(max_order, bool) or not isinstance(max_order, (int, np.integer)) or not (
      lowest <= max_order <= highest):
    raise ValueError(f'max_order: {solver} needs {lowest}..{highest}, got {max_order!r}')
  return int(max_order)


def sample(denoise, latents, t_steps, solver, *, afs=False, max_order=None, predict_x0=True,
           lower_order_final=True, return_trajectory=False, thresholding=True):
  """Solves the probability-flow ODE from `latents * t_steps[0]` along `t_steps`.

  Args:
    denoise: `denoise(x, sigma) -> D(x; sigma)`, sigma a scalar array.
    latents: `[batch, ...]` unit Gaussian noise.
    t_steps: `[num_steps]` descending noise levels (see `sfd_jax.schedules.get_schedule`).
    solver: 'euler', 'heun', 'dpm', 'ipndm' or 'dpmpp'.
    afs: analytical first step: the first direction is x / sqrt(1 + t_0^2), saving one NFE.
    max_order: order of 'ipndm' (1-4, default 4) or 'dpmpp' (1-3, default 3).
    predict_x0: 'dpmpp' in data-prediction form (otherwise noise prediction).
    lower_order_final: 'dpmpp' lowers its order over the last steps.
    return_trajectory: return all points instead of the last one.
    thresholding: 'dpmpp' (predict_x0) applies the official dynamic thresholding to its x0
      history (on by default, as in the official code; unlike the official code it never
      switches itself off for very large batches).

  Returns:
    The sample at t_steps[-1], shaped like latents, or with `return_trajectory` the
    `[num_steps, batch, ...]` trajectory whose index 0 is the starting point.

  Raises:
    ValueError: unknown solver, max_order out of range, fewer than 2 time points, or a
      schedule that is not one-dimensional; raised while tracing, before any compilation.
  """
  if jnp.ndim(t_steps) != 1:
    raise ValueError(f't_steps: need a 1-D schedule, got shape {jnp.shape(t_steps)}')
  num_steps = jnp.shape(t_steps)[0]
  max_order = validate_solver(solver, num_steps, max_order)
  fn, orders, _ = SOLVERS[solver]
  if solver == 'dpmpp':
    fn = functools.partial(fn, max_order=max_order, predict_x0=predict_x0,
                           lower_order_final=lower_order_final, thresholding=thresholding)
  elif orders is not None:
    fn = functools.partial(fn, max_order=max_order)
  t_steps = jnp.asarray(t_steps)
  return fn(denoise, latents * t_steps[0], t_steps, afs=afs, keep_points=return_trajectory)


def teacher_trajectory(denoise, latents, t_steps, solver, **opts):
  """The whole `[num_steps, batch, ...]` trajectory; `sample(..., return_trajectory=True)`."""
  return sample(denoise, latents, t_steps, solver, return_trajectory=True, **opts)
