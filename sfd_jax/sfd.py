"""The SFD distillation iteration (SPEC §5) as pure functions and the jitted step built from them.

One iteration: the frozen teacher solves the probability-flow ODE on a fine schedule and
yields one target per student interval; the student then takes one Euler step per interval
from its OWN previous output, and each non-AFS step is followed by one Adam update on the
L1 loss. `make_step` compiles two programs: the teacher's (one per num_steps; its solver is a
`lax.scan`) and one student-interval update whose interval times are traced values, reused
for every interval and every num_steps, so compile time does not grow with num_steps. With
low precision each has a float32 twin, compiled and run only when the low-precision program
reports a non-finite value (so the low-precision program's memory is its own).
Nothing here imports Flax.
"""
import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax import cpu_devices
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
def make_plan(settings: DistillSettings, vp=None) -> Plan:
  """Builds the schedules of one SFD iteration (float32, as the official code).

  The student's step i re-derives a 2-point schedule between t_i and t_{i+1} (the official
  Euler sampler is called with num_steps=2); it equals (t_i, t_{i+1}) up to float32 rounding
  and is recomputed the same way here.

  Args:
    settings: the distillation settings.
    vp: the teacher's discrete VP table, for schedules that need one ('discrete'); else None.

  Returns:
    The `Plan` (Python floats, so it is a trace-time constant).
  """
  with jax.ensure_compile_time_eval():  # concrete values even when called while tracing
    return _make_plan(settings, vp)


def _make_plan(settings: DistillSettings, vp) -> Plan:
  n = settings.num_steps
  num_teacher = (settings.M + 1) * (n - 1) + 1
  sched = lambda k, lo, hi: np.asarray(schedules.get_schedule(
      k, lo, hi, schedule_type=settings.schedule_type, rho=settings.schedule_rho, vp=vp), np.float32)
  t_steps = sched(n, settings.sigma_min, settings.sigma_max)
  teacher_t = sched(num_teacher, settings.sigma_min, settings.sigma_max)
  inner = tuple(tuple(float(v) for v in sched(2, float(t_steps[i + 1]), float(t_steps[i])))
                for i in range(n - 1))
  return Plan(t_steps=tuple(float(v) for v in t_steps),
              teacher_t_steps=tuple(float(v) for v in teacher_t),
              tea_slice=tuple(i * (settings.M + 1) for i in range(1, n)), inner_t=inner)


PRECISIONS = {'float32': None, 'bfloat16': 'bfloat16'}  # config name -> network compute dtype
METRIC_KEYS = ('loss', 'grad_norm', 'nonfinite', 'redo')
GRAD_STATS_GROUP = 1 << 20  # values per concatenation in sanitize_grads (4 MiB of float32)


class TrainState(NamedTuple):
  """Everything one step reads and replaces (donated): the student's variables and Adam's state."""
  params: Any                         # the student's trainable parameters (float32)
  opt_state: Any                      # optax state of `make_optimizer` (float32 moments)
  buffers: Any                        # the student's constant buffers (never trained)


class Denoisers(NamedTuple):
  """`denoise(variables, x, sigma, condition, ..., train, dropout_rng)` of both networks.

  The float32 pair defines the iteration (and redoes a non-finite low-precision interval);
  the low-precision pair, when given, is what runs first (`make_denoise(config, 'bfloat16')`).
  Per-block rematerialisation (`StepOptions.remat='block'`) lives in the student networks
  themselves (`train.make_denoisers` builds them so).
  """
  student: Callable
  teacher: Callable
  student_low: Optional[Callable] = None
  teacher_low: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How a step computes, not what it computes (same update up to rounding)."""
  precision: str = 'float32'          # 'float32' (parity) | 'bfloat16' (needs Denoisers.*_low)
  micro_batches: int = 1              # gradient-accumulation rounds per interval (batch_per_device)
  num_shards: int = 1                 # devices the batch is sharded over (micro-batches keep rows local)
  remat: str = ''                     # '' | 'block': the student denoisers recompute each U-Net block in
                                      #   the backward pass (built so by train.make_denoisers) | 'full':
                                      #   the whole student forward is one jax.checkpoint (saves no memory)


def interval_times(plan: Plan) -> np.ndarray:
  """(t_cur, t'0, t'1) of each student interval, `[num_steps-1, 3]` float32: the traced inputs
  of the one compiled interval program."""
  return np.asarray([(plan.t_steps[i], *plan.inner_t[i]) for i in range(len(plan.inner_t))], np.float32)


@functools.lru_cache(maxsize=None)
def teacher_solver(settings: DistillSettings) -> Callable:
  """The teacher's `solve(denoise, latents, t_steps) -> trajectory`, chosen once from settings."""
  return functools.partial(solvers.teacher_trajectory, solver=settings.sampler_tea, max_order=settings.max_order,
                           predict_x0=settings.predict_x0, lower_order_final=settings.lower_order_final,
                           thresholding=settings.thresholding)


def all_finite(*trees):
  """Scalar bool: every value of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for tree in trees for leaf in jax.tree.leaves(tree)]
  return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def split_batch(x, opts: StepOptions):
  """`[B, ...]` → `[micro_batches, B / micro_batches, ...]`, each micro-batch holding rows of every
  shard (device d's rows stay on device d when the batch is sharded in `num_shards` blocks)."""
  if x is None:
    return None
  d, k = opts.num_shards, opts.micro_batches
  x = x.reshape(d, k, x.shape[0] // (d * k), *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(k, x.shape[0] * x.shape[2], *x.shape[3:])


def join_batch(x, opts: StepOptions):
  """Inverse of `split_batch`."""
  d, k = opts.num_shards, opts.micro_batches
  x = x.reshape(k, d, x.shape[1] // d, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(k * x.shape[1] * x.shape[2], *x.shape[3:])


def per_micro_batch(fn: Callable, opts: StepOptions, *batch):
  """`fn(*batch)` run one micro-batch at a time (`lax.map`; the teacher's share of the memory
  bound that `batch_per_device` sets). `fn` must treat rows independently and return a tree of
  `[T, b, ...]` arrays; the result is that tree at the whole batch, `[T, B, ...]`."""
  if opts.micro_batches == 1:
    return fn(*batch)
  out = jax.lax.map(lambda chunk: fn(*chunk), tuple(split_batch(x, opts) for x in batch))
  return jax.tree.map(jax.vmap(lambda t: join_batch(t, opts), in_axes=1), out)


def teacher_stage(teacher_variables, latents, condition, *, teacher_denoise: Callable, solve: Callable,
                  plan: Plan, opts: StepOptions, debug: bool = False):
  """Runs the teacher solver (eval mode, no gradients) and returns one target per interval.

  Args:
    teacher_variables: the teacher's network variables.
    latents: `[B, H, W, C]`, `sigma_max · N(0, I)` (the official latents).
    condition: `[B, ...]` per-sample condition (one-hot labels, text embeddings) or None.
    teacher_denoise: the teacher network (float32, or the low-precision one that runs first).
    solve: `teacher_solver(settings)`.
    plan: `make_plan(settings, vp)`.
    opts: micro-batching (the teacher runs one micro-batch at a time).
    debug: also return the whole trajectory.

  Returns:
    (targets: tuple of num_steps-1 `[B, H, W, C]`, trajectory `[num_teacher, B, ...]` or None,
    bad: int32, 1 when the trajectory holds a non-finite value: the step then redoes it in float32).
  """
  t_steps = jnp.asarray(plan.teacher_t_steps, jnp.float32)

  def one(z, cond):
    denoise = lambda x, sigma: teacher_denoise(teacher_variables, x, sigma, cond, train=False)
    # The official code hands the solver latents / t_steps[0]; the solver multiplies by its own t_0.
    return solve(denoise, z / jnp.float32(plan.t_steps[0]), t_steps)

  traj = jax.lax.stop_gradient(per_micro_batch(one, opts, latents, condition))  # [num_teacher, B, ...]
  bad = (~all_finite(traj)).astype(jnp.int32)
  return tuple(traj[j] for j in plan.tea_slice), (traj if debug else None), bad


def l1_sum(out, target):
  """Σ |out − target| over every element: the SFD loss before the division by the batch."""
  return jnp.sum(jnp.abs(out - target))


def student_interval(student_denoise: Callable, params, buffers, x_in, target, times, condition,
                     step_condition, dropout_rng, *, afs: bool, extra_loss: Optional[Callable] = None):
  """One student Euler step over an interval and its loss sum (no division by the batch).

  Args:
    student_denoise: `denoise(variables, x, sigma, ...)` of the student network.
    params, buffers: the student's variables split into trained and constant parts.
    x_in: `[b, H, W, C]` the start point (latents at step 0, else the previous output).
    target: `[b, H, W, C]` the teacher's point at the end of the interval.
    times: `[3]` float32 (t_cur, t'0, t'1) of the interval (`interval_times`).
    condition: `[b, ...]` or None.
    step_condition: scalar (SFD-v: num_steps) or None.
    dropout_rng: key for the student's dropout (train mode).
    afs: the analytical first step (no network call).
    extra_loss: `extra_loss(out, target) -> scalar` added to the sum (the last interval's hook).

  Returns:
    (loss_sum, aux): loss_sum = Σ|out − target| (+ extra_loss), aux = dict(out, denoised);
    with AFS `denoised` is None.
  """
  t_cur, t0, t1 = times[0], times[1], times[2]
  seen = []

  def denoise(x, sigma):
    d = student_denoise({'params': params, 'buffers': buffers}, x, sigma, condition,
                        step_condition=step_condition, train=True, dropout_rng=dropout_rng)
    seen.append(d)
    return d

  x = (x_in / t_cur) * t0
  out = solvers.euler_step(denoise, x, t0, t1, afs=afs)
  loss_sum = l1_sum(out, target)
  if extra_loss is not None:
    loss_sum = loss_sum + extra_loss(out, target)
  return loss_sum, dict(out=out, denoised=seen[0] if seen else None)


def interval_grads(student_denoise: Callable, params, buffers, x_in, target, times, condition,
                   step_condition, dropout_rng, *, opts: StepOptions, extra_loss=None):
  """Loss sum, output and gradient of Σ|out − target| / B over the whole batch, accumulated over
  `opts.micro_batches` micro-batches (each divides by the GLOBAL batch B, so the summed
  gradients are the full-batch gradient).

  Returns:
    (loss_sum, out `[B, ...]`, denoised `[B, ...]`, grads like params).
  """
  batch = x_in.shape[0]

  def loss_fn(p, x, tgt, cond, rng):
    loss_sum, aux = student_interval(student_denoise, p, buffers, x, tgt, times, cond, step_condition, rng,
                                     afs=False, extra_loss=extra_loss)
    return loss_sum / batch, (loss_sum, aux['out'], aux['denoised'])

  if opts.remat == 'full':
    loss_fn = jax.checkpoint(loss_fn)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if opts.micro_batches == 1:
    grads, (loss_sum, out, denoised) = grad_fn(params, x_in, target, condition, dropout_rng)
    return loss_sum, out, denoised, grads

  def body(acc, chunk):
    x, tgt, cond, c = chunk
    grads, (loss_sum, out, denoised) = grad_fn(params, x, tgt, cond, jax.random.fold_in(dropout_rng, c))
    acc = (acc[0] + loss_sum, jax.tree.map(jnp.add, acc[1], grads))
    return acc, (out, denoised)

  zeros = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, params))
  chunks = (split_batch(x_in, opts), split_batch(target, opts), split_batch(condition, opts),
            jnp.arange(opts.micro_batches))
  (loss_sum, grads), (out, denoised) = jax.lax.scan(body, zeros, chunks)
  return loss_sum, join_batch(out, opts), join_batch(denoised, opts), grads


def interval_update(state: TrainState, x_in, target, times, condition, step_condition, dropout_rng, lr, *,
                    student_denoise: Callable, optimizer: optax.GradientTransformation, opts: StepOptions,
                    afs: bool, extra_loss: Optional[Callable] = None, debug: bool = False, guard: bool = False):
  """One student interval: Euler step, L1 loss and (unless AFS) one Adam update.

  Non-finite gradient values are replaced as the official loop does (nan → 0, ±inf → ±1e5)
  before Adam. With `guard` (the low-precision program), a non-finite loss or gradient instead
  leaves the state as it was and sets `bad`: the step then redoes the interval with the float32
  program on that state and counts it in `redo`.

  Args:
    state: the `TrainState` (donated by `make_step`).
    x_in, target: `[B, H, W, C]`.
    times: `[3]` (t_cur, t'0, t'1), traced.
    condition: `[B, ...]` or None (sharded with the batch).
    step_condition: traced scalar or None.
    dropout_rng: this interval's dropout key.
    lr: scalar learning rate (traced).
    student_denoise: the student network of this program (float32 or low precision).
    optimizer, opts: as for `make_step`.
    afs: static; the analytical first step takes no Adam step.
    extra_loss: static hook added to this interval's loss sum (`make_step`'s `last_interval_loss`).
    debug: also return `denoised` and the gradients in the metrics.
    guard: static; keep the state when the loss or a gradient is non-finite.

  Returns:
    (state, out `[B, H, W, C]`, metrics: loss = loss_sum / B, grad_norm, nonfinite, redo (0 here:
    the step sets it where it redid the interval), bad: int32, 1 where `guard` kept the state).
  """
  batch = x_in.shape[0]
  zero_i, zero_f = jnp.int32(0), jnp.float32(0.0)
  if afs:
    loss_sum, aux = student_interval(None, None, None, x_in, target, times, None, None, None, afs=True,
                                     extra_loss=extra_loss)
    metrics = dict(loss=loss_sum / batch, grad_norm=zero_f, nonfinite=zero_i, redo=zero_i)
    if debug:
      metrics['debug'] = dict(denoised=None, grads=None)
    return state, aux['out'], metrics, zero_i

  loss_sum, out, denoised, grads = interval_grads(student_denoise, state.params, state.buffers, x_in, target, times,
                                                  condition, step_condition, dropout_rng, opts=opts,
                                                  extra_loss=extra_loss)
  bad = (~all_finite(loss_sum, grads)) if guard else jnp.bool_(False)
  grads, count, grad_norm = sanitize_grads(grads)
  # A new state rather than an in-place edit: the caller's pytree must stay untouched.
  opt_state = state.opt_state._replace(
      hyperparams={**state.opt_state.hyperparams, 'learning_rate': jnp.asarray(lr, jnp.float32)})
  updates, opt_state = optimizer.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if guard:  # the float32 redo starts from the state this interval received
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  metrics = dict(loss=loss_sum / batch, grad_norm=grad_norm, nonfinite=count, redo=zero_i)
  if debug:
    metrics['debug'] = dict(denoised=denoised, grads=grads)
  return state._replace(params=params, opt_state=opt_state), out, metrics, bad.astype(jnp.int32)

def sanitize_grads(grads):
  """nan → 0, ±inf → ±1e5 (as the official loop); also counts the non-finite values and takes the
  norm of the clean gradient.

  The count and the norm are reduced from concatenations of the gradient arrays, each of at most
  `GRAD_STATS_GROUP` values (an array larger than that alone). Reduced per array, they added
  about four XLA fusions per parameter array (495 arrays in the CIFAR-10 student) and about 7 s to
  the 34 s the student program took to compile on a 2-core Intel Xeon
  (`experiments/ab_grad_stats.py`). One concatenation of everything kept the whole gradient
  alive until all of it existed, where XLA otherwise applies Adam to each array as its gradient
  is ready: the Stable Diffusion student's interval program needed 7.22 GiB of temp that way,
  3.59 GiB with groups of 2^20 values, 4.29 GiB per array, 3.22 GiB without statistics
  (experiments/RESULTS.md, "Stable Diffusion v1.5 on this CPU").

  Returns:
    (clean grads, number of non-finite values as int32, global L2 norm of the clean grads).
  """
  clean_of = lambda g: jnp.nan_to_num(g, nan=NAN_TO, posinf=INF_TO, neginf=-INF_TO)
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return grads, jnp.int32(0), jnp.float32(0.0)
  count, sum_sq = jnp.int32(0), jnp.float32(0.0)
  for group in _size_groups(leaves, GRAD_STATS_GROUP):
    flat = group[0].ravel() if len(group) == 1 else jnp.concatenate([jnp.ravel(g) for g in group])
    count = count + jnp.sum(~jnp.isfinite(flat), dtype=jnp.int32)
    sum_sq = sum_sq + jnp.sum(jnp.square(clean_of(flat)))
  return jax.tree.map(clean_of, grads), count, jnp.sqrt(sum_sq)


def _size_groups(leaves, limit: int) -> list:
  """`leaves` in order, cut into runs of at most `limit` values (an array larger than that alone)."""
  groups, size = [[]], 0
  for leaf in leaves:
    if groups[-1] and size + leaf.size > limit:
      groups.append([])
      size = 0
    groups[-1].append(leaf)
    size += leaf.size
  return groups


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


def _custom_targets(teacher_variables, latents, condition, *, targets_fn, denoisers, plan, settings, opts,
                    debug):
  """`teacher_stage`'s outputs from a caller's `targets_fn`: float32 teacher (no redo), one
  micro-batch at a time like the teacher stage."""
  one = lambda z, cond: targets_fn(denoisers.teacher, teacher_variables, z, cond, plan, settings)
  targets, traj = per_micro_batch(one, opts, latents, condition)
  targets = jax.lax.stop_gradient(targets)
  return tuple(targets[i] for i in range(targets.shape[0])), (traj if debug else None), jnp.int32(0)


def gather_variables(denoisers: Denoisers, replicated) -> Denoisers:
  """Denoisers that first gather their (sharded) variables whole (FSDP / ZeRO-3): XLA all-gathers
  the weights where a network uses them and reduce-scatters their gradients back to the shards,
  while the batch stays sharded; without this it may shard the activations like the weights."""
  def gathered(denoise):
    if denoise is None:
      return None
    return lambda variables, *args, **kwargs: denoise(jax.lax.with_sharding_constraint(variables, replicated),
                                                      *args, **kwargs)
  return Denoisers(*(gathered(d) for d in denoisers))


class StepPrograms(NamedTuple):
  """The compiled pieces of one step (exposed for tests, benchmarks and `experiments/step_memory.py`).

  `teacher` and `interval` are the programs that run first: the low-precision ones when
  `StepOptions.precision` is low (they return a 0/1 `bad` flag as their last output, and `interval`
  keeps the state where it is 1). `teacher_redo` and `interval_redo` are the float32 programs (the
  only ones under float32, where they equal `teacher` and `interval`); with low precision they are
  compiled and run only for an interval or trajectory whose low-precision result was non-finite.
  """
  teacher: Callable                   # settings -> jitted teacher stage for that num_steps
  interval: Callable                  # jitted interval update (static: afs, last)
  teacher_redo: Callable              # settings -> jitted float32 teacher stage
  interval_redo: Callable             # jitted float32 interval update


def make_step(denoisers: Denoisers, optimizer: optax.GradientTransformation, opts: StepOptions = StepOptions(),
              *, mesh=None, data_axis: str = 'data', last_interval_loss: Optional[Callable] = None,
              targets_fn: Optional[Callable] = None, vp=None, state_sharding=None, debug: bool = False):
  """The SFD step: one donated `TrainState` in, the new state and a fixed metrics dict out.

  Two jitted programs do the work: the teacher stage (compiled once per `settings`, i.e. per
  num_steps; its solver is scanned) and one student-interval update whose times, step index
  and step condition are traced, so it compiles once for every interval of every num_steps
  (plus a tiny program for the AFS interval, which calls no network). A Python loop calls
  the interval program once per interval, as the official loop calls its loss once per step.

  With low precision the step reads one scalar per program run: a low-precision teacher
  trajectory or interval with a non-finite value is redone by the float32 program (a separate
  compiled program, so it adds nothing to the low-precision program's memory) and counted in
  `redo` / `teacher_redo`; the low-precision interval program then leaves the state it was given
  unchanged (it is donated into the output), and the float32 one starts from it.

  Args:
    denoisers: the networks (`Denoisers`).
    optimizer: from `make_optimizer`.
    opts: precision, micro-batching and rematerialisation.
    mesh: a 1-axis mesh: state replicated, batch sharded over `data_axis`; None: no shardings.
    data_axis: the mesh axis name of the batch.
    last_interval_loss: optional `fn(loss_params, out, target) -> scalar` added to every
      element of the L1 map of the LAST interval only, i.e. + value · out.size to its loss sum
      (the second stage: batch-mean LPIPS); `loss_params` is the step's last argument. It must
      be a batch mean of per-image values: each micro-batch adds its own mean · its size, which
      sums to the whole batch's mean · out.size.
    vp: the teacher's discrete VP table (`LatentTeacher.vp`) for the 'discrete' schedule; else None.
    targets_fn: optional `fn(teacher_denoise, teacher_variables, latents, condition, plan,
      settings) -> (targets [num_steps-1, b, ...], trajectory [T, b, ...])` replacing the teacher
      stage (the second stage's Euler teacher). It gets the float32 teacher in every precision
      (no bf16 teacher, no redo) and, like the teacher stage, one micro-batch of b rows at a
      time, so it must treat rows independently.
    state_sharding: with `mesh`, the `TrainState` of shardings the state keeps (`train.shard_state`:
      sharded over `data_axis`); None: replicated.
    debug: metrics also hold 'debug': targets, trajectory, out, denoised and grads per interval.

  Returns:
    `step(state, teacher_variables, latents, condition, dropout_rng, lr, settings, loss_params=None)
    -> (state, metrics)`; metrics: `loss` [num_steps-1] (Σ|out−target| / B), `grad_norm`
    (after sanitising; 0 for AFS), `nonfinite` (non-finite gradient values replaced) and
    `redo` (1 where a low-precision interval was redone in float32), each [num_steps-1], and
    `teacher_redo` (scalar). Interval i uses the dropout key fold_in(dropout_rng, i). The
    step also has `.programs` (`StepPrograms`).
  """
  if opts.precision not in PRECISIONS:
    raise ValueError(f'precision={opts.precision!r} unknown (valid: {", ".join(PRECISIONS)})')
  low = opts.precision != 'float32'
  if low and (denoisers.student_low is None or denoisers.teacher_low is None):
    raise ValueError(f'precision={opts.precision!r} needs the low-precision denoisers (Denoisers.*_low)')
  shard = lambda *spec: None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  replicated, data = shard(), shard(data_axis)
  state_out = replicated if state_sharding is None else state_sharding
  if mesh is not None and state_sharding is not None:
    denoisers = gather_variables(denoisers, replicated)

  def interval_fn(state, x_in, target, times, condition, step_condition, rng, i, lr, loss_params, *, afs, last,
                  guard):
    # The hook's value is added to every element of the L1 map: + hook · out.size to the sum.
    extra = (lambda out, tgt: last_interval_loss(loss_params, out, tgt) * out.size) if last else None
    state, out, metrics, bad = interval_update(
        state, x_in, target, times, condition, step_condition, jax.random.fold_in(rng, i), lr,
        student_denoise=denoisers.student_low if guard else denoisers.student, optimizer=optimizer, opts=opts,
        afs=afs, extra_loss=extra, debug=debug, guard=guard)
    return (state, out, metrics, bad) if guard else (state, out, metrics)

  placed = mesh is not None and not debug  # debug outputs: let XLA place them
  out_shardings = (state_out, data, dict.fromkeys(METRIC_KEYS, replicated))

  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  # Per-block remat and the low-precision network's recomputed blocks keep their barriers through
  # XLA:CPU's optimiser (cpu_devices.keep_barriers_options); the plain float32 program is untouched.
  keep_barriers = cpu_devices.keep_barriers_options(platform)

  def jit_interval(guard: bool):
    recomputes = opts.remat == 'block' or (guard and low)
    return jax.jit(functools.partial(interval_fn, guard=guard), static_argnames=('afs', 'last'), donate_argnums=0,
                   compiler_options=keep_barriers if recomputes else None,
                   **(dict(out_shardings=out_shardings + ((replicated,) if guard else ())) if placed else {}))

  interval_f32 = jit_interval(False)
  interval_low = jit_interval(True) if low else interval_f32
  teachers = {}

  def teacher(settings: DistillSettings, precision: str = opts.precision):
    """The jitted teacher stage of `settings` at `precision` (compiled on first use)."""
    key = (settings, precision)
    if key not in teachers:
      plan = make_plan(settings, vp)
      fn = functools.partial(teacher_stage, teacher_denoise=denoisers.teacher if precision == 'float32'
                             else denoisers.teacher_low, solve=teacher_solver(settings), plan=plan, opts=opts,
                             debug=debug)
      if targets_fn is not None:
        fn = functools.partial(_custom_targets, targets_fn=targets_fn, denoisers=denoisers, plan=plan,
                               settings=settings, opts=opts, debug=debug)
      n = settings.num_steps - 1
      teachers[key] = jax.jit(fn, **(dict(out_shardings=((data,) * n, None, replicated)) if placed else {}))
    return teachers[key]

  teacher_redo = lambda settings: teacher(settings, 'float32')
  # The second stage's custom targets always use the float32 teacher: nothing to redo.
  teacher_first = teacher if targets_fn is None else teacher_redo

  def interval_kinds(settings: DistillSettings):
    """(afs, last) of each interval: without a hook every interval runs the same program; with
    one, the last has its own; the AFS interval has its own (no network)."""
    n = settings.num_steps - 1
    return [(settings.afs and i == 0, last_interval_loss is not None and i == n - 1) for i in range(n)]

  def run_teacher(settings, teacher_variables, latents, condition):
    """(targets, trajectory, teacher_redo): the float32 teacher redoes a non-finite low-precision one."""
    targets, traj, bad = teacher_first(settings)(teacher_variables, latents, condition)
    if teacher_first is teacher_redo or not int(bad):  # int(): the one scalar read per teacher run
      return targets, traj, np.int32(0)
    targets, traj, _ = teacher_redo(settings)(teacher_variables, latents, condition)
    return targets, traj, np.int32(1)

  def run_interval(state, args, afs, last):
    """(state, out, metrics) of one interval; a non-finite low-precision one is redone in float32."""
    if not low or afs:
      return interval_f32(state, *args, afs=afs, last=last)
    state, out, m, bad = interval_low(state, *args, afs=afs, last=last)
    if not int(bad):  # the one scalar read per interval
      return state, out, m
    state, out, m = interval_f32(state, *args, afs=afs, last=last)  # `state` is the one the interval received
    return state, out, dict(m, redo=np.int32(1))

  def step(state: TrainState, teacher_variables, latents, condition, dropout_rng, lr, settings: DistillSettings,
           loss_params=None):
    plan = make_plan(settings, vp)
    targets, traj, teacher_redo_count = run_teacher(settings, teacher_variables, latents, condition)
    times = interval_times(plan)
    step_condition = np.float32(settings.num_steps) if settings.use_step_condition else None
    lr = np.float32(lr)
    x, per_interval, outs = latents, [], []
    for i, (afs, last) in enumerate(interval_kinds(settings)):
      args = (x, targets[i], times[i], condition, step_condition, dropout_rng, np.int32(i), lr, loss_params)
      state, x, m = run_interval(state, args, afs, last)
      per_interval.append(m)
      outs.append(x)
    metrics = {k: jnp.stack([m[k] for m in per_interval]) for k in METRIC_KEYS}
    metrics['teacher_redo'] = teacher_redo_count
    if debug:
      metrics['debug'] = dict(targets=targets, trajectory=traj, out=outs,
                              denoised=[m['debug']['denoised'] for m in per_interval],
                              grads=[m['debug']['grads'] for m in per_interval if m['debug']['grads'] is not None])
    return state, metrics

  def lower_programs(state: TrainState, teacher_variables, latents, condition, dropout_rng, lr,
                     settings: DistillSettings, loss_params=None, *, redo: bool = False):
    """{program name: lowered program} of what `step(...)` runs first for these arguments (with
    `redo`, also the float32 programs a low-precision step falls back on). Nothing runs."""
    first = teacher_first(settings)
    lowered = {f'teacher(num_steps={settings.num_steps})': first.lower(teacher_variables, latents, condition)}
    if redo and low and first is not teacher_redo(settings):
      lowered[f'teacher(num_steps={settings.num_steps}) float32 redo'] = teacher_redo(settings).lower(
          teacher_variables, latents, condition)
    targets = jax.eval_shape(first, teacher_variables, latents, condition)[0]
    times = interval_times(make_plan(settings, vp))
    step_condition = np.float32(settings.num_steps) if settings.use_step_condition else None
    for i, (afs, last) in enumerate(interval_kinds(settings)):
      name = 'interval' + (' (afs)' if afs else '') + (' (last)' if last else '')
      programs = [(name, interval_low if not afs else interval_f32)]
      if redo and low and not afs:
        programs.append((name + ' float32 redo', interval_f32))
      for program_name, program in programs:
        if program_name not in lowered:
          # `latents` stands for every interval's input: same shape, dtype and sharding.
          target = jax.ShapeDtypeStruct(targets[i].shape, targets[i].dtype,
                                        sharding=getattr(latents, 'sharding', None))
          lowered[program_name] = program.lower(state, latents, target, times[i], condition, step_condition,
                                                dropout_rng, np.int32(i), np.float32(lr), loss_params, afs=afs, last=last)
    return lowered

  def compile_programs(state: TrainState, teacher_variables, latents, condition, dropout_rng, lr,
                       settings: DistillSettings, loss_params=None, *, workers: int = 2):
    """Compiles every program `step(...)` runs for these arguments, `workers` at a time (XLA
    compiles without holding the GIL), so the first step does not compile them one after the
    other. Nothing runs and nothing is donated. The float32 redo programs of a low-precision
    step are left to their first (rare) use.

    Returns:
      {program name: seconds from the start until its compilation finished}.
    """
    lowered = lower_programs(state, teacher_variables, latents, condition, dropout_rng, lr, settings, loss_params)
    start = time.perf_counter()

    def finish(item):
      item[1].compile()
      return item[0], time.perf_counter() - start
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      return dict(pool.map(finish, lowered.items()))

  step.programs = StepPrograms(teacher_first, interval_low, teacher_redo, interval_f32)
  step.compile = compile_programs
  step.lower = lower_programs
  return step

def split_variables(variables):
  """{'params', 'buffers'} → (params, buffers); buffers may be absent."""
  return variables['params'], variables.get('buffers', {})
