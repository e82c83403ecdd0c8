"""Training-free ODE solvers for the EDM probability-flow ODE dx/dt = (x - D(x, t)) / t.

Pure functions of a `denoise(x, sigma)` callable, the latents and a schedule; no Flax, no
state. The arithmetic follows the official SFD code (zju-pi/diff-sampler, `sfd-main/`)
operation by operation, so that a float32 teacher trajectory matches the reference data to
rounding. Loops over steps are Python loops (the schedule length is static), so everything
here can be traced once under `jax.jit`.

Solvers (`SOLVERS`): 'euler', 'heun' (EDM's 2nd order), 'dpm' (DPM-Solver-2), 'ipndm'
(improved PNDM, orders 1-4) and 'dpmpp' (multistep DPM-Solver++, orders 1-3). Any of them
can start with the analytical first step (AFS), which replaces the first denoiser call by
d = x / sqrt(1 + t^2).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

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
# Solvers: each returns the list of all N points, starting point first.


def _euler(denoise, x, t_steps, *, afs):
  points = [x]
  for i in range(t_steps.shape[0] - 1):
    x = euler_step(denoise, x, t_steps[i], t_steps[i + 1], afs=afs and i == 0)
    points.append(x)
  return points


def _heun(denoise, x, t_steps, *, afs):
  """EDM's Heun: Euler predictor, then the trapezoid of d at both ends (every step)."""
  points = [x]
  for i in range(t_steps.shape[0] - 1):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    d_cur = ode_direction(denoise, x, t_cur, afs=afs and i == 0)
    x_pred = x + (t_next - t_cur) * d_cur
    d_prime = ode_direction(denoise, x_pred, t_next)
    x = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    points.append(x)
  return points


def _dpm2(denoise, x, t_steps, *, afs):
  """DPM-Solver-2: Euler to the geometric midpoint, then a full step with d there."""
  r = DPM2_R
  points = [x]
  for i in range(t_steps.shape[0] - 1):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    d_cur = ode_direction(denoise, x, t_cur, afs=afs and i == 0)
    t_mid = (t_next ** r) * (t_cur ** (1 - r))
    x_mid = x + (t_mid - t_cur) * d_cur
    d_prime = ode_direction(denoise, x_mid, t_mid)
    x = x + (t_next - t_cur) * ((1 / (2 * r)) * d_prime + (1 - 1 / (2 * r)) * d_cur)
    points.append(x)
  return points


def _ipndm(denoise, x, t_steps, *, afs, max_order):
  """iPNDM: Adams-Bashforth on d with fixed coefficients; order min(max_order, i + 1)."""
  points = [x]
  history = []  # previous directions, newest last
  for i in range(t_steps.shape[0] - 1):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    d_cur = ode_direction(denoise, x, t_cur, afs=afs and i == 0)
    coeffs, divisor = _IPNDM_COEFFS[min(max_order, i + 1)]
    combo = coeffs[0] * d_cur
    for c, d_prev in zip(coeffs[1:], reversed(history)):
      combo = combo + c * d_prev
    x = x + (t_next - t_cur) * combo / divisor
    points.append(x)
    history = (history + [d_cur])[-(max_order - 1):] if max_order > 1 else []
  return points


def _dpmpp_order(i, num_steps, max_order, lower_order_final):
  """Order of multistep DPM-Solver++ at step i (0-based): warm up, then lower at the end."""
  if lower_order_final:
    return i + 1 if i + 1 < max_order else min(max_order, num_steps - (i + 1))
  return min(max_order, i + 1)


def _dpmpp_update(x, models, ts, t, order, predict_x0):
  """One multistep DPM-Solver++ update (VE form) from ts[-1] to t with the last `order` models.

  With predict_x0 the models are thresholded x0 predictions, otherwise directions d (= eps).
  r = h_prev / h ratios handle the non-uniform steps in lambda = -log t.

  Kept as in the official code although its third-order term is off by a factor 2: D2 =
  (D1_0 - D1_1) / (r0 + r1) approximates h^2 D''/2 where the expansion needs h^2 D'', so
  order 3 converges at order 2 (tests/test_solvers.py measures it). SFD's targets are
  defined by this arithmetic.
  """
  lambda_t = -jnp.log(t)
  lambdas = [-jnp.log(s) for s in ts[-order:]]
  h = lambda_t - lambdas[-1]
  phi_1 = jnp.expm1(-h) if predict_x0 else jnp.expm1(h)
  m0 = models[-1]
  if predict_x0:
    x_t = (t / ts[-1]) * x - phi_1 * m0
  else:
    x_t = x - t * phi_1 * m0
  if order == 1:
    return x_t
  r0 = (lambdas[-1] - lambdas[-2]) / h
  d1_0 = (1. / r0) * (m0 - models[-2])
  if order == 2:
    return x_t - 0.5 * phi_1 * d1_0 if predict_x0 else x_t - 0.5 * t * phi_1 * d1_0
  r1 = (lambdas[-2] - lambdas[-3]) / h
  d1_1 = (1. / r1) * (models[-2] - models[-3])
  d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
  d2 = (1. / (r0 + r1)) * (d1_0 - d1_1)
  if predict_x0:
    phi_2 = phi_1 / h + 1.
    phi_3 = phi_2 / h - 0.5
    return x_t + phi_2 * d1 - phi_3 * d2
  phi_2 = phi_1 / h - 1.
  phi_3 = phi_2 / h - 0.5
  return x_t - t * phi_2 * d1 - t * phi_3 * d2


def _dpmpp(denoise, x, t_steps, *, afs, max_order, predict_x0, lower_order_final,
           thresholding):
  """Multistep DPM-Solver++ in the VE parameterisation (lambda = -log t).

  The history holds thresholded x0 (predict_x0) or d; the trajectory itself is never
  thresholded. With AFS the first x0 is x - t d_afs.
  """
  num_steps = t_steps.shape[0]
  points = [x]
  models, ts = [], []
  for i in range(num_steps - 1):
    t_cur, t_next = t_steps[i], t_steps[i + 1]
    if afs and i == 0:
      d_cur = afs_direction(x, t_cur)
      denoised = x - t_cur * d_cur
    else:
      denoised = denoise(x, t_cur)
      d_cur = (x - denoised) / t_cur
    if predict_x0:
      models.append(dynamic_threshold(denoised) if thresholding else denoised)
    else:
      models.append(d_cur)
    ts.append(t_cur)
    order = _dpmpp_order(i, num_steps, max_order, lower_order_final)
    x = _dpmpp_update(x, models, ts, t_next, order, predict_x0)
    points.append(x)
    models, ts = models[-3:], ts[-3:]
  return points


class _Registry(dict):
  """A name -> implementation dict whose KeyError lists the valid names."""

  def __missing__(self, key):
    raise KeyError(f'{key!r}: unknown solver; valid: {sorted(self)}')


# name -> (solver, (lowest, highest, default) max_order or None when the solver has no order).
SOLVERS = _Registry({
    'euler': (_euler, None),
    'heun': (_heun, None),
    'dpm': (_dpm2, None),
    'ipndm': (_ipndm, (1, 4, 4)),
    'dpmpp': (_dpmpp, (1, 3, 3)),
})


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
  orders = SOLVERS[solver][1]
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
  fn, orders = SOLVERS[solver]
  if solver == 'dpmpp':
    fn = functools.partial(fn, max_order=max_order, predict_x0=predict_x0,
                           lower_order_final=lower_order_final, thresholding=thresholding)
  elif orders is not None:
    fn = functools.partial(fn, max_order=max_order)
  t_steps = jnp.asarray(t_steps)
  points = fn(denoise, latents * t_steps[0], t_steps, afs=afs)
  return jnp.stack(points) if return_trajectory else points[-1]


def teacher_trajectory(denoise, latents, t_steps, solver, **opts):
  """The whole `[num_steps, batch, ...]` trajectory; `sample(..., return_trajectory=True)`."""
  return sample(denoise, latents, t_steps, solver, return_trajectory=True, **opts)
