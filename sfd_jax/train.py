"""The SFD distillation loop: mesh, sharding, logging, checkpoints and sample grids.

`train(run, workdir)` composes the pure iteration of `sfd_jax.sfd` with data-parallel
sharding (batch over a 1-axis mesh of all devices, state replicated and donated), Orbax
checkpoints that make the run resume by itself, per-tick progress lines, a JSONL metrics
file and a sample grid per checkpoint. Each iteration's randomness derives from
`fold_in(key(seed), iteration)`, so an interrupted and resumed run equals an uninterrupted one.
"""
import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import checkpoint
from sfd_jax import conditions
from sfd_jax import images as images_lib
from sfd_jax import sfd
from sfd_jax import solvers
from sfd_jax.config_types import SFDV_NUM_STEPS, DistillSettings, RunConfig, TrainSettings

DATA_AXIS = 'data'
METRICS_FILE = 'metrics.jsonl'


class Family(NamedTuple):
  """What differs between network families (EDM pixels, latent teachers), so the loop has one path."""
  shape: tuple                        # (H, W, C) of what the networks denoise: images or latents
  condition: conditions.ConditionSource  # the step's per-sample condition (labels, text) and its draw
  network_meta: dict                  # checkpoint meta entries `load_student` rebuilds the student from
  decode: Callable                    # decode(student_variables, x) -> NHWC images in about [-1, 1]
  vp: Any = None                      # the teacher's discrete VP table ('discrete' schedule), else None


class Models(NamedTuple):
  """The frozen teacher and the student's starting point."""
  teacher_denoise: Callable
  teacher_variables: Any
  student_config: Any
  student_denoise: Callable
  student_variables: Any
  teacher_config: Any = None          # for the low-precision teacher (train.precision)
  family: Any = None                  # a `Family`; None: EDM's, from student_config (`family_of`)


def edm_family(config) -> Family:
  """The pixel-space family of an EDM `NetworkConfig`: images are what the network denoises."""
  return Family(shape=(config.img_resolution, config.img_resolution, config.img_channels),
                condition=conditions.one_hot_labels(config.label_dim),
                network_meta=dict(network=config.to_dict()), decode=lambda variables, x: x)


def family_of(models: Models) -> Family:
  """`models.family`, or EDM's for Models built without one."""
  return models.family if models.family is not None else edm_family(models.student_config)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-axis mesh over every device of every process.

  Auto axis type: the networks are written as single-device code and XLA propagates the
  batch sharding (Explicit mode would demand shardings on every reshape).
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def init_distributed(settings: TrainSettings) -> None:
  """Joins JAX's multi-process runtime (`config.train.distributed`); must run before any device use.

  Every process runs the same program on its local devices; the mesh spans the devices of all
  processes. Empty / -1 fields are auto-detected by JAX (SLURM, Open MPI, Cloud TPU, ...). On
  CPU the processes exchange collectives through gloo.
  """
  if not settings.distributed or jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address or None,
      num_processes=settings.num_processes if settings.num_processes >= 0 else None,
      process_id=settings.process_id if settings.process_id >= 0 else None)


def to_host(tree):
  """Numpy copy of a tree of arrays, also of global arrays that span other processes.

  `jax.device_get` refuses arrays with shards on another process; a replicated one is read
  from a local shard, a sharded one is gathered from all processes (a collective: every
  process must call this together).
  """
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def check_teacher_path(path: str) -> None:
  """One-line FileNotFoundError before anything heavy happens."""
  if not path:
    raise FileNotFoundError('config.teacher is empty: pass --config.teacher=PATH (EDM pickle or converted dir)')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.teacher={path}: no such file or directory')


def student_config_for(teacher_config, dropout: float):
  """The student network: the teacher's, with step-condition layers and the chosen dropout."""
  config = dataclasses.replace(teacher_config, use_step_condition=True)
  return config.replace_model(dropout=dropout) if dropout >= 0 else config


def load_models(run: RunConfig) -> Models:
  """Loads the teacher and builds the student from its weights (fresh step-condition layers).

  An LDM / SD checkpoint (`config.teacher_arch`, a `.ckpt` / `.safetensors` file) or a converted
  latent teacher gives a latent student (`_latent_models`); anything else an EDM one.

  Raises:
    FileNotFoundError / ValueError: one line, for a missing teacher or one that does not fit
      the config's image resolution or label dimension.
  """
  from sfd_jax import teacher as teacher_lib  # Flax lives behind this module
  check_teacher_path(run.teacher)
  if teacher_lib.is_latent(run.teacher, run.teacher_arch or None):
    return _latent_models(run)
  return _edm_models(run)


def _check_fit(run: RunConfig, resolution: int, label_dim: int) -> None:
  if run.img_resolution and resolution != run.img_resolution:
    raise ValueError(f'config.teacher={run.teacher}: resolution {resolution} but '
                     f'config.img_resolution={run.img_resolution}')
  if run.label_dim >= 0 and label_dim != run.label_dim:
    raise ValueError(f'config.teacher={run.teacher}: label_dim {label_dim} but config.label_dim={run.label_dim}')


def _edm_models(run: RunConfig) -> Models:
  from sfd_jax import networks, teacher as teacher_lib  # Flax lives behind these modules
  teacher = teacher_lib.load_teacher(run.teacher)
  tc = teacher.config
  _check_fit(run, tc.img_resolution, tc.label_dim)
  student_config = student_config_for(tc, run.train.dropout)
  state_dict = networks.variables_to_state_dict(teacher.params)
  student_variables = networks.state_dict_to_variables(
      student_config, state_dict, rng=jax.random.key(run.train.seed), source=run.teacher)
  return Models(teacher.denoise, teacher.params, student_config, networks.make_denoise(student_config),
                student_variables, tc, edm_family(student_config))


def _check_latent_settings(run: RunConfig, teacher) -> None:
  """The official LDM run takes sigma_min / sigma_max from the teacher; no dropout."""
  d, t = run.distill, run.train
  for name, value, want in (('sigma_min', d.sigma_min, teacher.sigma_min),
                            ('sigma_max', d.sigma_max, teacher.sigma_max)):
    if value != want:
      raise ValueError(f'config.distill.{name}={value!r} but the latent teacher {run.teacher} has {name} {want!r} '
                       f'(the official value); set --config.distill.{name}={want!r}')
  if t.dropout > 0:
    raise ValueError(f'config.train.dropout={t.dropout}: latent (LDM) students have no dropout; use -1 or 0')


def _latent_models(run: RunConfig) -> Models:
  """A latent teacher (LitEma weights if any) and its student: the raw UNet weights plus the
  step-condition layers (fresh from `train.seed` where the checkpoint lacks them); a Stable
  Diffusion teacher's prompts as the condition source (`prompt_source`)."""
  from sfd_jax.latent import student as latent_student  # Flax lives behind these modules
  from sfd_jax.latent.config import config_to_dict, resolve_arch
  from sfd_jax.latent.teacher import load_latent_teacher
  if not run.teacher_arch and not os.path.isdir(run.teacher):
    raise ValueError(f'config.teacher={run.teacher}: an LDM / SD checkpoint needs --config.teacher_arch '
                     '(a preset: ldm-lsun-bedroom, ldm-ffhq, sd-v1; or an LDM yaml path)')
  if run.teacher_arch and os.path.isdir(run.teacher):
    raise ValueError(f'config.teacher={run.teacher}: a converted teacher directory names its own architecture; '
                     f'pass --config.teacher_arch= (empty) instead of {run.teacher_arch!r}')
  if run.teacher_arch and resolve_arch(run.teacher_arch).text_encoder is not None:
    _check_prompts_given(run)  # before reading a multi-GB checkpoint
  teacher = load_latent_teacher(run.teacher, run.teacher_arch or None, rng=jax.random.key(run.train.seed))
  config = teacher.config
  if config.conditioning_key and config.text_encoder is None:
    raise ValueError(f'config.teacher={run.teacher}: a {config.conditioning_key} teacher without a FrozenCLIPEmbedder '
                     'text encoder is not supported (Stable Diffusion v1 only)')
  _check_fit(run, latent_student.image_shape(config)[0], 0)
  _check_latent_settings(run, teacher)
  source = conditions.unconditional() if config.text_encoder is None else prompt_source(run, teacher)
  variables = latent_student.student_variables(teacher.raw_params)
  family = Family(shape=latent_student.latent_shape(config), condition=source,
                  network_meta=dict(latent_network=config_to_dict(config)),
                  decode=latent_student.make_student_decode(config), vp=teacher.vp)
  # The step's teacher is its UNet: the condition source holds the text encoder, the student's
  # buffers the first stage.
  return Models(teacher.denoise, teacher.denoiser_variables(), config,
                latent_student.make_student_denoise(config, teacher.vp), variables, config, family)


def _check_prompts_given(run: RunConfig) -> None:
  if not run.prompts:
    raise ValueError(f'config.teacher={run.teacher}: a text-conditioned (Stable Diffusion) teacher needs prompts: '
                     'pass --config.prompts=PATH.csv (a CSV with a text column, e.g. the MS-COCO captions)')


def prompt_source(run: RunConfig, teacher) -> conditions.ConditionSource:
  """Text conditions of a Stable Diffusion teacher: the prompts of `config.prompts`, tokenised once
  here, drawn distinct within each batch and encoded by the teacher's frozen text encoder inside
  the jitted batch function. Training uses the conditional branch only (guidance 1), as the
  official loop does.

  Raises:
    ValueError: one line: no prompts file given, the file unreadable / without a `text` column /
      empty, fewer prompts than a batch, or no tokenizer vocabulary.
  """
  from sfd_jax.clip.prompts import read_prompts
  _check_prompts_given(run)
  prompts = read_prompts(run.prompts)
  if len(prompts) < run.train.batch:
    raise ValueError(f'config.prompts={run.prompts}: {len(prompts)} prompts, fewer than config.train.batch='
                     f'{run.train.batch} (the prompts of a batch are distinct)')
  token_ids = teacher.tokenize(prompts, run.tokenizer or None)
  return conditions.text_prompts(token_ids, teacher.encode_tokens, teacher.text_encoder_variables())


def step_options(train_settings, num_devices: int) -> sfd.StepOptions:
  """The step's precision / accumulation / remat options; one-line error for a batch that does not split.

  Raises:
    ValueError: batch not divisible by devices (× batch_per_device).
  """
  batch, per = train_settings.batch, train_settings.batch_per_device
  if batch % num_devices:
    raise ValueError(f'config.train.batch={batch} is not divisible by the {num_devices} devices')
  if per and (batch // num_devices) % per:
    raise ValueError(f'config.train.batch={batch} is not divisible by {num_devices} devices x '
                     f'config.train.batch_per_device={per}')
  micro = (batch // num_devices) // per if per else 1
  return sfd.StepOptions(precision=train_settings.precision, micro_batches=micro, num_shards=num_devices,
                         remat=train_settings.remat_policy if train_settings.remat else '')


def make_denoisers(models: Models, precision: str, remat: str = '') -> sfd.Denoisers:
  """The float32 denoisers, plus bfloat16-compute ones when `precision` asks for them; with
  `remat='block'` the students recompute each U-Net block in their backward pass.

  The networks are rebuilt from `models.student_config` / `teacher_config` where needed: an EDM
  `NetworkConfig` or a latent teacher's `LatentConfig` (then `models.family.vp` is its VP table).
  """
  block = remat == 'block'
  if precision == 'float32' and not block:
    return sfd.Denoisers(models.student_denoise, models.teacher_denoise)
  if models.student_config is None or (precision != 'float32' and models.teacher_config is None):
    what = f'config.train.precision={precision!r}' if precision != 'float32' else "config.train.remat_policy='block'"
    raise ValueError(f'{what} needs the network configs to build the denoisers: Models.student_config and '
                     'Models.teacher_config must be set')
  build = _denoiser_builder(models)
  student = build(models.student_config, None, block, True) if block else models.student_denoise
  if precision == 'float32':
    return sfd.Denoisers(student, models.teacher_denoise)
  dtype = sfd.PRECISIONS[precision]
  return sfd.Denoisers(student, models.teacher_denoise, build(models.student_config, dtype, block, True),
                       build(models.teacher_config, dtype, False, False))


def _denoiser_builder(models: Models) -> Callable:
  """`build(config, dtype, remat, student) -> denoise` for the family of `models` (EDM or latent)."""
  from sfd_jax import networks  # Flax lives behind these modules
  if isinstance(models.student_config, networks.NetworkConfig):
    return lambda config, dtype, remat, student: networks.make_denoise(config, dtype, remat=remat)
  from sfd_jax.latent import student as latent_student
  from sfd_jax.latent.model import make_denoise as make_latent_denoise
  vp = family_of(models).vp

  def build(config, dtype, remat, student):
    if student:
      return latent_student.make_student_denoise(config, vp, dtype=dtype, remat=remat)
    return make_latent_denoise(config, vp, dtype=dtype)
  return build


def fsdp_spec(shape, num_devices: int) -> P:
  """The PartitionSpec `shard_state` gives an array: its largest axis that the device count
  divides, sharded over the data axis (the first such axis on a tie); replicated if none does."""
  axes = [i for i, d in enumerate(shape) if d % num_devices == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * axis + [DATA_AXIS]))


def state_shardings(tree, mesh, shard: bool):
  """NamedShardings of a tree of arrays (or ShapeDtypeStructs): `fsdp_spec` per leaf with
  `shard` (`config.train.shard_state`), else replicated."""
  n = mesh.devices.size
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(jnp.shape(x), n) if shard else P()), tree)


def place_state(mesh, params, buffers, optimizer, shard: bool) -> sfd.TrainState:
  """The initial `TrainState` on `mesh` (host copies in, so donating it leaves the caller's arrays
  intact), replicated or, with `shard`, FSDP-sharded (`state_shardings`); Adam's moments follow
  their parameters' shardings."""
  params = jax.device_put(params, state_shardings(params, mesh, shard))
  buffers = jax.device_put(buffers, state_shardings(buffers, mesh, shard))
  opt_shardings = state_shardings(jax.eval_shape(optimizer.init, params), mesh, shard)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  return sfd.TrainState(params, opt_state, buffers)


def make_step(models: Models, optimizer, opts: sfd.StepOptions, mesh, second_stage=None, **kwargs) -> Callable:
  """The SFD step on `mesh`: state replicated (or sharded: `state_sharding`) and donated, batch
  sharded (see `sfd.make_step`).

  Returns:
    `step(state, teacher_variables, latents, condition, dropout_rng, lr, settings, loss_params=None)
    -> (state, metrics)`; one student-interval program serves every num_steps.
  """
  if second_stage is not None:  # [second stage] Euler teacher, LPIPS hook
    kwargs.update(targets_fn=second_stage.targets_fn, last_interval_loss=second_stage.last_interval_loss)
  vp = models.family.vp if models.family is not None else None  # EDM's family has none (and may lack a config)
  return sfd.make_step(make_denoisers(models, opts.precision, opts.remat), optimizer, opts, mesh=mesh,
                       data_axis=DATA_AXIS, vp=vp, **kwargs)


def make_batch_fn(mesh, shape, source: conditions.ConditionSource, sigma_max: float, shard: bool = False) -> Callable:
  """Returns `draw(key) -> (latents, condition)`: `sigma_max · N(0, I)` latents of `shape` and the
  source's conditions, both batch-sharded, drawn in one jitted program.

  Random bits do not depend on the sharding (threefry is partitionable), so the global
  batch is the same on any number of devices. The source's variables (SD's text encoder and
  prompt table) are placed as the state is (`state_shardings`): with `shard` (`shard_state`)
  each device holds a slice and XLA gathers them where the encoder runs; `draw.variables`.
  """
  data = NamedSharding(mesh, P(DATA_AXIS))
  has_condition = jax.eval_shape(lambda k: source.draw(source.variables, k, shape[0]), jax.random.key(0)) is not None
  variables = jax.device_put(source.variables, state_shardings(source.variables, mesh, shard))

  @functools.partial(jax.jit, out_shardings=(data, data if has_condition else None))
  def draw_batch(variables, key):
    k_lat, k_cond = jax.random.split(key)
    latents = sigma_max * jax.random.normal(k_lat, shape, jnp.float32)
    return latents, source.draw(variables, k_cond, shape[0])
  draw = lambda key: draw_batch(variables, key)
  draw.variables = variables
  return draw


def iteration_keys(base_key, iteration: int):
  """(batch key, dropout key, num_steps key) of one iteration."""
  return jax.random.split(jax.random.fold_in(base_key, iteration), 3)


def draw_num_steps(settings: DistillSettings, key, second_stage: bool = False) -> DistillSettings:
  """SFD-v: num_steps uniform in {4,5,6,7} per iteration; otherwise (and in the second stage,
  whose step condition comes from an SFD-v teacher) the configured settings."""
  if not settings.use_step_condition or second_stage:
    return settings
  choice = int(jax.random.randint(key, (), 0, len(SFDV_NUM_STEPS)))
  return settings.with_num_steps(SFDV_NUM_STEPS[choice])


def make_grid_writer(models: Models, settings: DistillSettings, grid_size: int, seed: int) -> Callable:
  """Returns `write(variables, path)`: a PNG grid of student samples (Euler, AFS as trained),
  decoded to images by the family (latent teachers: their first stage).

  The seeds are fixed, so grids of successive checkpoints show the same latents.
  """
  family = family_of(models)
  plan = sfd.make_plan(settings, family.vp)
  n, source = grid_size * grid_size, family.condition
  z = jax.random.normal(jax.random.key(seed), (n, *family.shape))
  condition = source.grid(source.variables, n)
  step_condition = float(settings.num_steps) if settings.use_step_condition else None
  t_steps = jnp.asarray(plan.t_steps, jnp.float32)

  @jax.jit
  def sample(variables):
    denoise = lambda x, sigma: models.student_denoise(variables, x, sigma, condition, step_condition=step_condition)
    return family.decode(variables, solvers.sample(denoise, z, t_steps, 'euler', afs=settings.afs))

  def write(variables, path):
    x = jax.device_get(sample(to_host(variables)))
    images_lib.save_grid(path, images_lib.to_uint8(x), num_cols=grid_size)
  return write


@dataclasses.dataclass
class TickStats:
  """Metrics accumulated over one tick (host side)."""
  start_time: float
  start_nimg: int
  metrics: list = dataclasses.field(default_factory=list)

  def summary(self, nimg: int, lr: float, tick: int) -> dict:
    """Per-interval means for each num_steps seen in the tick."""
    fetched = to_host(self.metrics)
    out = dict(tick=tick, kimg=nimg / 1000, lr=lr,
               sec_per_kimg=(time.time() - self.start_time) / max(nimg - self.start_nimg, 1) * 1000)
    by_len = {}
    for m in fetched:
      by_len.setdefault(len(m['loss']) + 1, []).append(m)
    for num_steps, ms in sorted(by_len.items()):
      suffix = '' if len(by_len) == 1 else f'_n{num_steps}'
      for name in ('loss', 'grad_norm'):
        out[name + suffix] = np.mean([m[name] for m in ms], axis=0).tolist()
    out['nonfinite'] = int(sum(int(np.sum(m['nonfinite'])) for m in fetched))
    # Low-precision intervals (and teacher runs) redone in float32 after a non-finite value.
    out['redo'] = int(sum(int(np.sum(m['redo'])) + int(m['teacher_redo']) for m in fetched))
    return out


def format_tick(s: dict) -> str:
  """The per-tick progress line."""
  losses = ' '.join(f'{k} [{", ".join(f"{v:.4f}" for v in s[k])}]' for k in s if k.startswith('loss'))
  return (f"tick {s['tick']:<5d} kimg {s['kimg']:<9.3f} sec/kimg {s['sec_per_kimg']:<8.2f} "
          f"lr {s['lr']:.2e} {losses} nonfinite {s['nonfinite']} redo {s.get('redo', 0)}")


def check_resume(meta: dict, run: RunConfig, workdir) -> None:
  """A checkpoint only resumes the run that wrote it: same distillation settings."""
  saved = meta.get('distill', {})
  for key, value in dataclasses.asdict(run.distill).items():
    if key in saved and saved[key] != value:
      raise ValueError(f'{checkpoint.checkpoint_dir(workdir)}: checkpoint has distill.{key}={saved[key]!r} but '
                       f'the config says {value!r}; use another --workdir')


def truncate_metrics(path: pathlib.Path, nimg: int) -> None:
  """Drops JSONL lines written after the checkpoint a run resumes from (they are redone)."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  kept = [l for l in lines if round(json.loads(l)['kimg'] * 1000) <= nimg]
  path.write_text(''.join(l + '\n' for l in kept))


def train(run: RunConfig, workdir, *, log: Callable[[str], None] = print):
  """Runs (or resumes) SFD distillation until `total_kimg`; returns the final student variables.

  Args:
    run: the typed config.
    workdir: output directory (checkpoints, metrics.jsonl, sample grids).
    log: where progress lines go (process 0 only; the metrics file and sample grids too).

  Returns:
    (Models, final student variables as host numpy arrays, DistillSettings).
  """
  init_distributed(run.train)
  if run.train.compilation_cache:
    # The full iteration is one large program; caching it makes a resumed run start at once.
    jax.config.update('jax_compilation_cache_dir', run.train.compilation_cache)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda _: None)
  second_stage = None
  if run.train.is_second_stage:  # [second stage] teacher checks, inherited schedule, LPIPS weights
    from sfd_jax import stage2
    check_teacher_path(run.teacher)
    second_stage = stage2.prepare(run, log)
    run = second_stage.run
  mesh = make_mesh()
  opts = step_options(run.train, jax.device_count())
  models = load_models(run)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  replicated = NamedSharding(mesh, P())
  shard = run.train.shard_state
  # Host copies: the step donates its state, and the loaded student (whose arrays a latent teacher
  # shares) must stay intact. device_put(may_alias=False) still aliases the first device's shard to
  # a single-device source on CPU (jax 0.10.2), so donating it deleted the teacher's weights.
  optimizer = sfd.make_optimizer(run.optim)
  state = place_state(mesh, jax.tree.map(np.array, models.student_variables['params']),
                      jax.tree.map(np.array, models.student_variables.get('buffers', {})), optimizer, shard)
  teacher_variables = jax.device_put(models.teacher_variables,
                                     state_shardings(models.teacher_variables, mesh, shard))
  loss_params = None if second_stage is None else jax.device_put(second_stage.loss_params, replicated)

  manager = checkpoint.make_manager(workdir, run.train.max_checkpoints)
  base_key, nimg, iteration = jax.random.key(run.train.seed), 0, 0
  # The checkpoint holds the TrainState's three fields as items (params, buffers, opt_state).
  restored = checkpoint.restore_latest(manager, state.params, state.buffers, state.opt_state)
  if restored is not None:
    params, buffers, opt_state, meta = restored
    state = sfd.TrainState(params, opt_state, buffers)
    check_resume(meta, run, workdir)
    nimg, iteration = meta['nimg'], meta['iteration']
    base_key = jax.random.wrap_key_data(np.asarray(meta['rng_key_data'], np.uint32))
    log(f'Resuming from {checkpoint.checkpoint_dir(workdir)}/{iteration} at kimg {nimg / 1000:.3f}')

  family = family_of(models)
  draw = make_batch_fn(mesh, (run.train.batch, *family.shape), family.condition, run.distill.sigma_max, shard)
  state_sharding = jax.tree.map(lambda x: x.sharding, state) if shard else None
  # teacher compiled per num_steps, student interval once
  step = make_step(models, optimizer, opts, mesh, second_stage, state_sharding=state_sharding)
  total_nimg = int(round(run.train.total_kimg * 1000))
  tick_nimg = int(round(run.train.kimg_per_tick * 1000))
  tick = nimg // tick_nimg if tick_nimg else 0
  stats = TickStats(time.time(), nimg)
  meta_of = lambda: dict(nimg=nimg, iteration=iteration, kimg=nimg / 1000,
                         rng_key_data=np.asarray(jax.random.key_data(base_key)).tolist(),
                         **family.network_meta, settings=(run.distill.sampling().to_dict() if second_stage is None
                                                          else stage2.sampling_settings(run.distill)),
                         distill=dataclasses.asdict(run.distill), dataset_name=run.dataset_name)
  write_grid = make_grid_writer(models, run.distill, run.train.grid_size, run.train.seed) if is_main else None
  log(f'Training for {run.train.total_kimg} kimg on {jax.device_count()} device(s)...')
  metrics_path = workdir / METRICS_FILE
  if is_main:
    truncate_metrics(metrics_path, nimg)

  while nimg < total_nimg:
    k_batch, k_drop, k_steps = iteration_keys(base_key, iteration)
    settings = draw_num_steps(run.distill, k_steps, second_stage is not None)
    lr = sfd.learning_rate(run.optim, nimg, run.train.batch, run.train.total_kimg)
    latents, condition = draw(k_batch)
    state, metrics = step(state, teacher_variables, latents, condition, k_drop, np.float32(lr), settings,
                          loss_params)
    stats.metrics.append(metrics)
    nimg += run.train.batch
    iteration += 1
    done = nimg >= total_nimg
    if not done and nimg < stats.start_nimg + tick_nimg:
      continue
    summary = stats.summary(nimg, lr, tick)
    log(format_tick(summary))
    if is_main:
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(dict(summary, timestamp=time.time())) + '\n')
    tick += 1
    if done or tick % run.train.checkpoint_ticks == 0:
      checkpoint.save(manager, iteration, state.params, state.buffers, state.opt_state, meta_of())
      if is_main:
        write_grid({'params': state.params, 'buffers': state.buffers}, workdir / f'samples-{iteration:08d}.png')
    stats = TickStats(time.time(), nimg)

  manager.wait_until_finished()
  manager.close()
  final = to_host({'params': state.params, 'buffers': state.buffers})
  return models, final, run.distill


def run(config, workdir, *, log: Callable[[str], None] = print):
  """`train` for a ConfigDict of configs/*.py (validated and typed first); what the CLI and notebook call."""
  from sfd_jax import config_types  # pylint: disable=g-import-not-at-top
  return train(config_types.from_config_dict(config), workdir, log=log)
