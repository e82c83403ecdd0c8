"""Typed, frozen views of the distillation config.

The ml_collections ConfigDict is converted here, once, at the boundary (`from_config_dict`);
the rest of the package receives these small hashable dataclasses (or single values taken
from them), never the ConfigDict itself.
"""
import dataclasses
from typing import Any, Mapping

SOLVER_NAMES = ('euler', 'heun', 'dpm', 'dpmpp', 'ipndm')
SCHEDULE_NAMES = ('polynomial', 'logsnr', 'time_uniform')
SFDV_NUM_STEPS = (4, 5, 6, 7)  # the official SFD-v loop draws num_steps from randint(4, 7)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """What defines one SFD iteration (SPEC §5); hashable, so usable as a jit static arg."""
  num_steps: int = 4                  # student time points; NFE = num_steps - 1 (- 1 with AFS)
  M: int = 3                          # teacher steps inserted per student interval
  sampler_tea: str = 'dpmpp'          # teacher solver
  max_order: int = 3                  # teacher order (DPM-Solver++ 1..3, iPNDM 1..4)
  predict_x0: bool = True             # DPM-Solver++ data prediction
  lower_order_final: bool = True      # DPM-Solver++ lowers the order at the last steps
  thresholding: bool = True           # official dynamic thresholding of the teacher's x0 history
  schedule_type: str = 'polynomial'
  schedule_rho: float = 7.0
  afs: bool = True                    # analytical first step for the student
  sigma_min: float = 0.006            # SFD's value for EDM teachers (not EDM's 0.002)
  sigma_max: float = 80.0
  use_step_condition: bool = False    # SFD-v: num_steps drawn per iteration, fed to the network

  def with_num_steps(self, num_steps: int) -> 'DistillSettings':
    """Returns a copy for one SFD-v draw (M = 3 as the official loop forces, 2 for num_steps 3)."""
    return dataclasses.replace(self, num_steps=int(num_steps), M=2 if num_steps == 3 else 3)

  def sampling_settings(self) -> dict:
    """The settings a sampler needs, as stored with the student checkpoint."""
    return dict(num_steps=self.num_steps, schedule_type=self.schedule_type, rho=self.schedule_rho,
                afs=self.afs, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                use_step_condition=self.use_step_condition)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """Adam as torch.optim.Adam with the official SFD values."""
  lr: float = 5e-5
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  lr_drop_factor: float = 0.1         # lr multiplier once cur_kimg >= total_kimg / 2


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The loop: duration, batch, logging and checkpoint cadence."""
  batch: int = 128                    # global batch (trajectories per iteration)
  total_kimg: float = 200.0
  kimg_per_tick: float = 1.0
  checkpoint_ticks: int = 10          # save an Orbax checkpoint (and sample grid) every N ticks
  max_checkpoints: int = 3
  grid_size: int = 8                  # the sample grid is grid_size × grid_size images
  seed: int = 0
  dropout: float = -1.0               # student dropout; < 0 keeps the teacher's configured rate
  distributed: bool = False           # call jax.distributed.initialize() (multi-host)
  compilation_cache: str = ''         # persistent XLA compilation cache directory ('' = off)
  is_second_stage: bool = False       # 1-NFE second stage (LPIPS): not implemented
  demo_report: bool = False           # write sfd_jax.demo's report after training


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole run, typed."""
  teacher: str
  dataset_name: str
  img_resolution: int                 # expected teacher resolution; 0 accepts any
  label_dim: int                      # expected teacher label dimension; < 0 accepts any
  distill: DistillSettings
  optim: OptimSettings
  train: TrainSettings


def _typed(cls, section: Mapping[str, Any], where: str):
  """Builds `cls` from a mapping, with a one-line error naming the unknown or mistyped key."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in dict(section).items():
    if key not in fields:
      raise ValueError(f'config: unknown key {where}.{key} (valid: {", ".join(sorted(fields))})')
    default = fields[key].default
    try:
      kwargs[key] = type(default)(value) if not isinstance(default, bool) else _as_bool(value)
    except (TypeError, ValueError):
      raise ValueError(f'config: {where}.{key}={value!r} is not a valid {type(default).__name__}') from None
  return cls(**kwargs)


def _as_bool(value) -> bool:
  if isinstance(value, str):
    if value.lower() in ('true', '1', 'yes'):
      return True
    if value.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(value)
  return bool(value)


def validate(run: RunConfig) -> None:
  """Checks values that would otherwise fail deep inside tracing; one-line ValueErrors."""
  d, t = run.distill, run.train
  if d.sampler_tea not in SOLVER_NAMES:
    raise ValueError(f'config: distill.sampler_tea={d.sampler_tea!r} unknown (valid: {", ".join(SOLVER_NAMES)})')
  if d.schedule_type not in SCHEDULE_NAMES:
    raise ValueError(f'config: distill.schedule_type={d.schedule_type!r} unknown '
                     f'(valid: {", ".join(SCHEDULE_NAMES)})')
  if d.num_steps < 2 or d.M < 0:
    raise ValueError(f'config: distill.num_steps={d.num_steps} must be >= 2 and distill.M={d.M} >= 0')
  if not 0 < d.sigma_min < d.sigma_max:
    raise ValueError(f'config: need 0 < distill.sigma_min ({d.sigma_min}) < distill.sigma_max ({d.sigma_max})')
  if t.batch < 1 or t.total_kimg <= 0 or t.kimg_per_tick <= 0 or t.checkpoint_ticks < 1:
    raise ValueError('config: train.batch, train.total_kimg, train.kimg_per_tick and train.checkpoint_ticks '
                     'must be positive')
  if t.is_second_stage:
    raise NotImplementedError('config: train.is_second_stage=True (1-NFE stage with LPIPS) is not implemented')


def from_config_dict(config) -> RunConfig:
  """Converts the ConfigDict of configs/default.py into a validated `RunConfig`.

  Args:
    config: an ml_collections.ConfigDict (or nested mapping) with keys teacher,
      dataset_name, img_resolution, label_dim, distill, optim, train.

  Returns:
    The typed `RunConfig`.

  Raises:
    ValueError: one line naming the unknown key or bad value.
  """
  top = dict(config)
  known = {'teacher', 'dataset_name', 'img_resolution', 'label_dim', 'distill', 'optim', 'train'}
  for key in top:
    if key not in known:
      raise ValueError(f'config: unknown key {key} (valid: {", ".join(sorted(known))})')
  run = RunConfig(teacher=str(top.get('teacher', '')), dataset_name=str(top.get('dataset_name', '')),
                  img_resolution=int(top.get('img_resolution', 0)), label_dim=int(top.get('label_dim', -1)),
                  distill=_typed(DistillSettings, top.get('distill', {}), 'distill'),
                  optim=_typed(OptimSettings, top.get('optim', {}), 'optim'),
                  train=_typed(TrainSettings, top.get('train', {}), 'train'))
  validate(run)
  return run
