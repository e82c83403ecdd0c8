"""SFD's second stage: a 1-NFE student distilled from a first-stage SFD / SFD-v student.

What differs from the first stage (official sfd-main, `is_second_stage=True`):
- The teacher is a first-stage student workdir, sampled with Euler along its own trained
  schedule, with its own AFS setting and, for an SFD-v teacher, the step condition equal to
  the number of trajectory points, (M+1)(num_steps−1)+1 = 7 for the official num_steps 3, M 2.
  A plain SFD teacher must have been trained with num_steps 7; SFD-v covers 4..7.
- The student starts from the teacher's weights (num_steps 3, M 2, AFS: 1 NFE), is fed the
  teacher's step-condition setting (step condition 3 for an SFD-v teacher) and is never
  re-drawn across num_steps.
- On the last interval only, the loss adds LPIPS (`sfd_jax.lpips`, piq's quirks included):
  Σ|out − target| + out.size · mean_batch LPIPS(out, target).

With the engine's options: `train.precision=bfloat16` applies to the student only; the teacher
(`make_targets_fn`, handed the float32 network by `sfd.make_step`) and LPIPS stay float32, so
the targets carry no bf16 error. With `train.batch_per_device` the teacher runs one micro-batch
at a time, as in the first stage, and each micro-batch adds its own batch-mean LPIPS times its
size, which sums to the whole batch's term.

Schedule: the official loss object computes the student's 3-point schedule once, from the
second-stage launch arguments, and only afterwards reads the teacher's schedule type and ρ
for the teacher's 7-point trajectory. With the published commands both are polynomial ρ=7
and σ ∈ [0.006, 80], so the two schedules nest. sfd_jax takes schedule type, ρ and σ range
from the teacher's checkpoint for both, so they always nest (the official code would pair
mismatched times when the two differ); a config that says otherwise is reported in one line.
"""
import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sfd_jax import lpips as lpips_lib
from sfd_jax import solvers
from sfd_jax.config_types import SFDV_NUM_STEPS, DistillSettings, RunConfig

# Settings a second-stage student inherits from its teacher's checkpoint.
_INHERITED = (('schedule_type', 'schedule_type'), ('schedule_rho', 'schedule_rho'), ('sigma_min', 'sigma_min'),
              ('sigma_max', 'sigma_max'), ('use_step_condition', 'use_step_condition'))


class SecondStage(NamedTuple):
  """What the loop needs for a second-stage run."""
  run: RunConfig                       # the config with the second stage's distill settings
  targets_fn: Callable                 # replaces `sfd.teacher_targets`
  last_interval_loss: Optional[Callable]  # `(lpips_params, out, target) -> scalar`, or None
  loss_params: Optional[dict]          # LPIPS weights (an argument of the step, never a constant)


def trajectory_points(settings: DistillSettings) -> int:
  """Teacher trajectory points of one iteration: (M+1)(num_steps−1)+1."""
  return (settings.M + 1) * (settings.num_steps - 1) + 1


def check_teacher(path: str, stored: dict, points: int) -> None:
  """Refuses a teacher workdir that cannot give a `points`-point Euler trajectory (one line)."""
  if stored.get('second_stage'):
    raise ValueError(f'config.teacher={path}: is already a second-stage (1-NFE) student; the second stage '
                     'needs a first-stage SFD or SFD-v workdir')
  trained = int(stored['num_steps'])
  if stored.get('use_step_condition'):
    if points not in SFDV_NUM_STEPS:
      raise ValueError(f'config.teacher={path}: an SFD-v teacher covers num_steps {SFDV_NUM_STEPS[0]}..'
                       f'{SFDV_NUM_STEPS[-1]}, not the {points}-point trajectory that distill.num_steps and '
                       'distill.M ask for')
  elif trained != points:
    raise ValueError(f'config.teacher={path}: trained with num_steps={trained}, so it cannot give the '
                     f'{points}-point Euler trajectory of the second stage (needs an SFD run with '
                     f'num_steps={points} or an SFD-v run)')


def load_teacher_settings(path: str) -> dict:
  """The sampling settings stored with a first-stage student (one-line error otherwise)."""
  from sfd_jax import checkpoint  # Orbax only; networks stay unimported
  if not checkpoint.is_student_checkpoint(path):
    raise ValueError(f'config.teacher={path}: the second stage needs a first-stage SFD workdir '
                     '(a directory with checkpoints/), not an EDM pickle or converted network')
  return checkpoint.load_student(path).sampling.to_dict()


def second_stage_settings(distill: DistillSettings, stored: dict, log: Callable[[str], None] = print
                          ) -> DistillSettings:
  """The student's settings: the config's num_steps, M and AFS; schedule and step condition
  from the teacher; teacher solver Euler."""
  inherited = {field: type(getattr(distill, field))(stored[key]) for field, key in _INHERITED}
  differing = [f'distill.{f}={getattr(distill, f)!r} -> {v!r}' for f, v in inherited.items()
               if f != 'use_step_condition' and getattr(distill, f) != v]
  if differing:
    log('second stage: schedule taken from the teacher (' + ', '.join(differing) + ')')
  return dataclasses.replace(distill, sampler_tea='euler', **inherited)


def make_targets_fn(teacher_afs: bool, step_condition: Optional[float]) -> Callable:
  """`sfd.teacher_targets` for a first-stage student teacher: Euler, its AFS and step condition.

  Returns:
    `targets_fn(teacher_denoise, teacher_variables, latents, condition, plan, settings)
    -> (targets [num_steps-1, B, H, W, C], trajectory [points, B, H, W, C])`.
  """

  def targets_fn(teacher_denoise, teacher_variables, latents, condition, plan, settings):
    del settings  # Euler along the plan's teacher schedule; nothing else to choose
    denoise = lambda x, sigma: teacher_denoise(teacher_variables, x, sigma, condition,
                                               step_condition=step_condition, train=False)
    unit = latents / jnp.float32(plan.t_steps[0])
    traj = solvers.teacher_trajectory(denoise, unit, jnp.asarray(plan.teacher_t_steps, jnp.float32), 'euler',
                                      afs=teacher_afs)
    traj = jax.lax.stop_gradient(traj)
    return traj[jnp.asarray(plan.tea_slice)], traj

  return targets_fn


def lpips_last_interval_loss(lpips_params, out, target):
  """The official LPIPS term of the last interval (see `sfd_jax.lpips.second_stage_lpips`)."""
  return lpips_lib.second_stage_lpips(lpips_params, out, target)


def sampling_settings(distill: DistillSettings) -> dict:
  """What the student checkpoint records: its `SamplingSettings`, marked as a second-stage
  model (sampled at its num_steps only; 1 NFE with num_steps 3 and AFS)."""
  return dataclasses.replace(distill.sampling(), second_stage=True).to_dict()


def prepare(run: RunConfig, log: Callable[[str], None] = print) -> SecondStage:
  """Validates the teacher workdir and derives everything the second stage changes.

  Raises:
    FileNotFoundError / ValueError: one line naming the teacher or the LPIPS weights at fault.
  """
  stored = load_teacher_settings(run.teacher)
  points = trajectory_points(run.distill)
  check_teacher(run.teacher, stored, points)
  distill = second_stage_settings(run.distill, stored, log)
  step_condition = float(points) if stored.get('use_step_condition') else None
  targets_fn = make_targets_fn(bool(stored['afs']), step_condition)
  t = run.train
  loss, loss_params = None, None
  if t.lpips:
    loss_params = lpips_lib.load_params(t.lpips_vgg16 or None, t.lpips_linear or None)
    loss = lpips_last_interval_loss
  return SecondStage(dataclasses.replace(run, distill=distill), targets_fn, loss, loss_params)
