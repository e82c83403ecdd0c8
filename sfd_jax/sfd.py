"""The SFD distillation iteration (SPEC §5) as pure functions.

One iteration: the frozen teacher solves the probability-flow ODE on a fine schedule and
yields one target per student interval; the student then takes one Euler step per interval
from its OWN previous output, and each non-AFS step is followed by one Adam update on the
L1 loss. Everything here is jit-able; nothing imports Flax.
"""
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax import schedules
from sfd_jax import solvers
from sfd_jax.config_types import DistillSettings, OptimSettings

# Official code replaces non-finite gradient values like this before each Adam step.
NAN_TO = 0.0
INF_TO = 1e5


class Plan(NamedTuple):
  """Static (trace-time) schedules of one iteration; derived from settings alone."""
  t_steps: Tuple[float, ...]             # student schedule, num_steps points
  teacher_t_steps: Tuple[float, ...]     # teacher schedule, (M+1)(num_steps-1)+1 points
  tea_slice: Tuple[int, ...]             # teacher trajectory indices used as targets
  inner_t: Tuple[Tuple[float, float], ...]  # (t'0, t'1) of each student Euler step


@functools.lru_cache(maxsize=None)
def make_plan(settings: DistillSettings) -> Plan:
  """Builds the schedules of one SFD iteration (float32, as the official code).

  The student's step i re-derives a 2-point schedule between t_i and t_{i+1} (the official
  Euler sampler is called with num_steps=2); it equals (t_i, t_{i+1}) up to float32 rounding
  and is recomputed the same way here.

  Args:
    settings: the distillation settings.

  Returns:
    The `Plan` (Python floats, so it is a trace-time constant).
  """
  with jax.ensure_compile_time_eval():  # concrete values even when called while tracing
    return _make_plan(settings)


def _make_plan(settings: DistillSettings) -> Plan:
  n = settings.num_steps
  num_teacher = (settings.M + 1) * (n - 1) + 1
  sched = lambda k, lo, hi: np.asarray(schedules.get_schedule(
      k, lo, hi, schedule_type=settings.schedule_type, rho=settings.schedule_rho), np.float32)
  t_steps = sched(n, settings.sigma_min, settings.sigma_max)
  teacher_t = sched(num_teacher, settings.sigma_min, settings.sigma_max)
  inner = tuple(tuple(float(v) for v in sched(2, float(t_steps[i + 1]), float(t_steps[i])))
                for i in range(n - 1))
  return Plan(t_steps=tuple(float(v) for v in t_steps),
              teacher_t_steps=tuple(float(v) for v in teacher_t),
              tea_slice=tuple(i * (settings.M + 1) for i in range(1, n)), inner_t=inner)


def teacher_targets(teacher_denoise: Callable, teacher_variables, latents, class_labels,
                    plan: Plan, settings: DistillSettings):
  """Runs the teacher solver (eval mode, no gradients) and returns one target per interval.

  Args:
    teacher_denoise: `denoise(variables, x, sigma, class_labels=None, ...)` of the teacher.
    teacher_variables: the teacher's network variables.
    latents: `[B, H, W, C]`, `sigma_max · N(0, I)` (the official latents).
    class_labels: `[B, label_dim]` one-hot, or None.
    plan: from `make_plan(settings)`.
    settings: the distillation settings.

  Returns:
    (targets `[num_steps-1, B, H, W, C]`, whole trajectory `[num_teacher, B, H, W, C]`).
  """
  denoise = lambda x, sigma: teacher_denoise(teacher_variables, x, sigma, class_labels, train=False)
  # The official code hands the solver latents / t_steps[0]; the solver multiplies by its own t_0.
  unit = latents / jnp.float32(plan.t_steps[0])
  traj = solvers.teacher_trajectory(
      denoise, unit, jnp.asarray(plan.teacher_t_steps, jnp.float32), settings.sampler_tea,
      max_order=settings.max_order, predict_x0=settings.predict_x0,
      lower_order_final=settings.lower_order_final, thresholding=settings.thresholding)
  traj = jax.lax.stop_gradient(traj)
  return traj[jnp.asarray(plan.tea_slice)], traj


def student_step(student_denoise: Callable, params, buffers, x_in, target, step_idx: int,
                 plan: Plan, settings: DistillSettings, class_labels=None, dropout_rng=None,
                 last_interval_loss: Optional[Callable] = None, loss_params=None):
  """One student Euler step over interval `step_idx` and its L1 loss.

  Args:
    student_denoise: `denoise(variables, x, sigma, ...)` of the student network.
    params, buffers: the student's variables split into trained and constant parts.
    x_in: `[B, H, W, C]` the start point (latents at step 0, else the previous output).
    target: `[B, H, W, C]` the teacher's point at the end of the interval.
    step_idx: static interval index.
    plan, settings: as from `make_plan`.
    class_labels: `[B, label_dim]` or None.
    dropout_rng: key for the student's dropout (train mode).
    last_interval_loss: [second stage] `(loss_params, out, target) -> scalar` added to every
      element of the L1 map of the LAST interval only (official: mean LPIPS over the batch).
    loss_params: its weights, an argument (a closure would bake them into the program).

  Returns:
    (loss, aux): loss = Σ|out − target| / B (a scalar; with the hook on the last interval
    (Σ|out − target| + out.size · hook) / B), aux = dict(out, denoised, loss_sum).
    With AFS at step 0 there is no network call and `denoised` is None.
  """
  t_cur, t_next = plan.t_steps[step_idx], plan.t_steps[step_idx + 1]
  t0, t1 = plan.inner_t[step_idx]
  afs = settings.afs and step_idx == 0
  step_condition = float(settings.num_steps) if settings.use_step_condition else None
  seen = []

  def denoise(x, sigma):
    d = student_denoise({'params': params, 'buffers': buffers}, x, sigma, class_labels,
                        step_condition=step_condition, train=True, dropout_rng=dropout_rng)
    seen.append(d)
    return d

  x = (x_in / jnp.float32(t_cur)) * jnp.float32(t0)
  out = solvers.euler_step(denoise, x, jnp.float32(t0), jnp.float32(t1), afs=afs)
  loss_sum = jnp.sum(jnp.abs(out - target))
  if last_interval_loss is not None and step_idx == settings.num_steps - 2:  # [second stage]
    loss_sum = loss_sum + last_interval_loss(loss_params, out, target) * out.size
  aux = dict(out=out, denoised=seen[0] if seen else None, loss_sum=loss_sum)
  return loss_sum / x_in.shape[0], aux


def sanitize_grads(grads):
  """nan → 0, ±inf → ±1e5 (as the official loop); also counts the non-finite values.

  Returns:
    (clean grads, number of non-finite values as int32).
  """
  leaves = jax.tree.leaves(grads)
  count = sum(jnp.sum(~jnp.isfinite(g)).astype(jnp.int32) for g in leaves)
  clean = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=NAN_TO, posinf=INF_TO, neginf=-INF_TO), grads)
  return clean, count


def make_optimizer(optim: OptimSettings) -> optax.GradientTransformation:
  """Adam with torch's arithmetic and a learning rate that is a traced hyperparameter.

  optax's Adam and torch's agree: both add eps after the square root of the bias-corrected
  second moment. Parameters that never receive a gradient (torch's `grad is None`: e.g.
  `map_augment` without augment labels) get g = 0 here; with zero moments their update is
  0 / (0 + eps) = 0, so they stay put exactly as torch skips them.
  """
  return optax.inject_hyperparams(optax.adam)(learning_rate=optim.lr, b1=optim.b1, b2=optim.b2,
                                              eps=optim.eps)


def learning_rate(optim: OptimSettings, cur_nimg: int, batch: int, total_kimg: float) -> float:
  """The lr an iteration starting at `cur_nimg` images uses (official schedule).

  The official loop checks `cur_kimg >= total_kimg / 2` AFTER an iteration, before adding
  that iteration's batch, and the new lr applies from the next iteration on.
  """
  previous_nimg = cur_nimg - batch
  drop = previous_nimg >= 0 and previous_nimg / 1000 >= 0.5 * total_kimg
  return optim.lr * (optim.lr_drop_factor if drop else 1.0)


def sfd_iteration(params, opt_state, buffers, teacher_variables, latents, class_labels, dropout_rng, lr,
                  loss_params=None, *, student_denoise: Callable, teacher_denoise: Callable,
                  optimizer: optax.GradientTransformation, settings: DistillSettings,
                  return_debug: bool = False, targets_fn: Callable = None,
                  last_interval_loss: Optional[Callable] = None):
  """One full SFD iteration: teacher targets, then one student step + Adam update per interval.

  Args:
    params: the student's trainable parameters (variables['params']).
    opt_state: state of `optimizer` (from `make_optimizer`).
    buffers: the student's constant buffers (variables['buffers']).
    teacher_variables: the frozen teacher's variables.
    latents: `[B, H, W, C]` = sigma_max · N(0, I).
    class_labels: `[B, label_dim]` one-hot or None.
    dropout_rng: key for the student's dropout; step i uses fold_in(key, i).
    lr: scalar learning rate (traced, so changing it does not retrace).
    student_denoise, teacher_denoise: pure denoisers (`make_denoise` of each config).
    optimizer: the optax transformation whose state is `opt_state`.
    settings: the distillation settings (num_steps etc.; static).
    return_debug: also return targets, trajectory, outputs, denoised values and grads.
    loss_params: [second stage] weights of `last_interval_loss` (LPIPS), or None.
    targets_fn: [second stage] replaces `teacher_targets` (same signature), e.g. the Euler
      trajectory of a first-stage student (`sfd_jax.stage2.make_targets_fn`).
    last_interval_loss: [second stage] see `student_step`.

  Returns:
    (params, opt_state, metrics) and, with return_debug, a debug dict. metrics holds
    `loss` [num_steps-1] (Σ|out−target| / B per interval), `grad_norm` [num_steps-1]
    (global norm after sanitising; 0 for the AFS step) and `nonfinite` [num_steps-1].
  """
  plan = make_plan(settings)
  targets, traj = (targets_fn or teacher_targets)(teacher_denoise, teacher_variables, latents, class_labels,
                                                  plan, settings)
  # A new state rather than an in-place edit: the caller's pytree must stay untouched.
  opt_state = opt_state._replace(
      hyperparams={**opt_state.hyperparams, 'learning_rate': jnp.asarray(lr, jnp.float32)})
  x = latents
  losses, norms, nonfinite, debug = [], [], [], dict(out=[], denoised=[], grads=[])
  for i in range(settings.num_steps - 1):
    step = lambda p: student_step(student_denoise, p, buffers, x, targets[i], i, plan, settings,
                                  class_labels, jax.random.fold_in(dropout_rng, i), last_interval_loss, loss_params)
    if settings.afs and i == 0:
      loss, aux = step(params)  # the official AFS step logs a loss but takes no Adam step
      norms.append(jnp.float32(0.0))
      nonfinite.append(jnp.int32(0))
    else:
      (loss, aux), grads = jax.value_and_grad(step, has_aux=True)(params)
      grads, count = sanitize_grads(grads)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      norms.append(optax.tree.norm(grads))
      nonfinite.append(count)
      debug['grads'].append(grads)
    losses.append(loss)
    x = jax.lax.stop_gradient(aux['out'])  # the student continues from its own output
    debug['out'].append(aux['out'])
    debug['denoised'].append(aux['denoised'])
  metrics = dict(loss=jnp.stack(losses), grad_norm=jnp.stack(norms), nonfinite=jnp.stack(nonfinite))
  if not return_debug:
    return params, opt_state, metrics
  debug.update(targets=targets, trajectory=traj)
  return params, opt_state, metrics, debug


def split_variables(variables):
  """{'params', 'buffers'} → (params, buffers); buffers may be absent."""
  return variables['params'], variables.get('buffers', {})
