"""Sampling as a library: seeds to images on all devices, the settings of a teacher or a
distilled student, and the writers; `python -m sfd_jax.sample` and `sfd_jax.fid` call it.

Each seed's latents (and class) come from `jax.random.key(seed)` alone, so an image depends
on its seed only, not on the batch size or the number of devices, up to float32 rounding where
the compiled network's arithmetic depends on the per-device batch shape: on a GPU the
convolution algorithms and TF32 under JAX's default matmul precision (a different batch moved a
few pixels by one level on an H100 with the fixture network), on the CPU the latent teachers'
networks (batch 8 vs 64: 3e-6, one pixel by one level). The EDM fixture networks and the test
denoisers give bit-identical images on the CPU.
"""
import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import images as images_lib
from sfd_jax import schedules, solvers
from sfd_jax.config_types import LDM4_SIGMA_MAX, SamplingSettings

_MAX_SEED = 2 ** 31 - 1
# `--grid` shows at most this many images (the first seeds).
GRID_MAX_IMAGES = 256


def parse_seeds(text):
  """Parses '0-49999', '7' or '1,5,10-20' (inclusive ranges) into a list of ints.

  Raises:
    ValueError: one line naming `--seeds` if the text is malformed.
  """
  seeds = []
  for part in str(text).split(','):
    bounds = part.strip().split('-')
    if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
      raise ValueError(f'--seeds: malformed part {part!r} in {text!r} (use e.g. 0-49999 or 1,5,10-20)')
    lo, hi = int(bounds[0]), int(bounds[-1])
    if lo > hi or hi > _MAX_SEED:
      raise ValueError(f'--seeds: bad range {part!r} in {text!r} (need low <= high <= {_MAX_SEED})')
    seeds.extend(range(lo, hi + 1))
  return seeds


def seed_latents(seeds, shape):
  """Unit Gaussian latents `[len(seeds), *shape]` float32, each from `jax.random.key(seed)`."""
  return jax.vmap(lambda s: jax.random.normal(jax.random.split(jax.random.key(s))[0], shape))(seeds)


def seed_classes(seeds, num_classes):
  """One class index per seed, uniform on [0, num_classes), independent of the latents."""
  return jax.vmap(lambda s: jax.random.randint(jax.random.split(jax.random.key(s))[1], (), 0,
                                               num_classes))(seeds)


def _batch_classes(seeds, num_classes, class_idx):
  if num_classes == 0:
    return None
  if class_idx is not None:
    return jnp.full(seeds.shape, class_idx, jnp.int32)
  return seed_classes(seeds, num_classes)


def _identity(variables, x):
  del variables
  return x


def _make_sampler(denoise_fn, shape, t_steps, solver, solver_opts, num_classes, class_idx, mesh, decode_fn,
                  condition_fn):
  """Jitted `(variables, seeds, inputs) -> (images, classes)` with the batch sharded over `mesh`."""
  data = NamedSharding(mesh, P('data'))

  def run(variables, seeds, inputs):
    latents = seed_latents(seeds, shape)
    classes = _batch_classes(seeds, num_classes, class_idx)
    if condition_fn is not None:
      condition = condition_fn(variables, inputs)
    else:
      condition = None if classes is None else jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)
    denoise = lambda x, sigma: denoise_fn(variables, x, sigma, condition)
    out = decode_fn(variables, solvers.sample(denoise, latents, t_steps, solver, **solver_opts))
    return out, (jnp.zeros(seeds.shape, jnp.int32) if classes is None else classes)

  return jax.jit(run, in_shardings=(NamedSharding(mesh, P()), data, data), out_shardings=(data, data))


def generate_batches(denoise_fn, shape, seeds, *, t_steps, solver='euler', variables=None,
                     batch_size=64, num_classes=0, class_idx=None, devices=None, progress=False,
                     decode_fn=None, condition_fn=None, condition_inputs=None, **solver_opts):
  """Samples the given seeds batch by batch: an iterator of `(seeds, images, classes)`.

  Args:
    denoise_fn: `denoise_fn(variables, x, sigma, condition) -> D(x; sigma)`, x NHWC; condition
      the one-hot class labels `[N, num_classes]` float32, None (unconditional), or what
      `condition_fn` returns.
    shape: one image's shape `(H, W, C)`.
    seeds: iterable of non-negative ints; seed s gives latents from `jax.random.key(s)`.
    t_steps: `[num_steps]` schedule (see `sfd_jax.schedules.get_schedule`).
    solver: a key of `sfd_jax.solvers.SOLVERS`.
    variables: network variables passed to `denoise_fn` (replicated on every device).
    batch_size: images per jitted call, rounded up to a multiple of the device count; the
      last batch is padded, so everything is traced once.
    num_classes: number of classes of a conditional model; 0 for unconditional.
    class_idx: a fixed class for every image; None draws one per seed (from its key).
    devices: devices to shard the batch over; default all local devices.
    progress: show a tqdm progress bar.
    decode_fn: `decode_fn(variables, x) -> images` applied to the solver's output in the same
      program (a latent model's first stage); None: the output is the image.
    condition_fn: `condition_fn(variables, inputs) -> condition` in the same program (e.g. a text
      encoder on token ids), replacing the class labels; inputs come from `condition_inputs`.
    condition_inputs: `condition_inputs(seeds) -> [n, ...]` numpy array on the host, one row
      per seed of a (padded) batch (e.g. the token ids of seed i's caption), sharded like it.
    **solver_opts: `afs`, `max_order`, `predict_x0`, `lower_order_final`, `thresholding`.

  Returns:
    An iterator of per-batch numpy tuples (seeds int64 `[n]`, images float32 `[n, H, W, C]`
    (unclipped), classes int64 `[n]` or None); batches are sampled as it is consumed.

  Raises:
    ValueError: bad solver settings, class_idx out of range or an empty seed list, before
      anything is compiled.
  """
  seeds = np.asarray(list(seeds), np.int64)
  if seeds.size == 0:
    raise ValueError('seeds: empty seed list')
  if seeds.min() < 0 or seeds.max() > _MAX_SEED:
    raise ValueError(f'seeds: need 0 <= seed <= {_MAX_SEED}, got {seeds.min()}..{seeds.max()}')
  solvers.validate_solver(solver, int(np.shape(t_steps)[0]), solver_opts.get('max_order'))
  if class_idx is not None and not 0 <= class_idx < num_classes:
    raise ValueError(f'class_idx: need 0 <= class < {num_classes} for this model, got {class_idx}')
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.asarray(devices), ('data',))
  batch_size = math.ceil(max(1, batch_size) / len(devices)) * len(devices)
  sampler = _make_sampler(denoise_fn, tuple(shape), jnp.asarray(t_steps), solver, solver_opts,
                          num_classes, class_idx, mesh, decode_fn or _identity, condition_fn)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  # Validation above runs at call time; only the sampling itself is lazy.
  return _iterate(sampler, variables, seeds, batch_size, num_classes > 0, progress, condition_inputs)


def _iterate(sampler, variables, seeds, batch_size, conditional, progress, condition_inputs=None):
  starts = range(0, len(seeds), batch_size)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm(starts, unit='batch', desc='sampling')
  for start in starts:
    chunk = seeds[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])]).astype(np.int32)
    inputs = None if condition_inputs is None else condition_inputs(padded)
    out, classes = sampler(variables, padded, inputs)
    yield (chunk, np.asarray(out)[:len(chunk)],
           np.asarray(classes, np.int64)[:len(chunk)] if conditional else None)


def generate(denoise_fn, shape, seeds, **kwargs):
  """All images of `generate_batches(denoise_fn, shape, seeds, **kwargs)` as one float32
  `[len(seeds), H, W, C]` array, in seed order."""
  return np.concatenate([out for _, out, _ in generate_batches(denoise_fn, shape, seeds, **kwargs)])



# ------------------------------------------------------------------------------------------
# Which settings a model samples with.

# EDM's sampler defaults for a teacher (its generate.py: Heun, 18 points, sigma 0.002..80).
TEACHER_DEFAULTS = SamplingSettings(solver='heun', num_steps=18, schedule_type='polynomial', schedule_rho=7.0,
                                    afs=False, sigma_min=0.002, sigma_max=80.0)
# A latent (LDM / Stable Diffusion) teacher's defaults, chosen here (the official sample.py leaves
# them to its command line): DPM-Solver++ with 10 NFE on the `discrete` schedule with rho 1 (the
# schedule the LDM configs distil on), and the teacher's own sigma range (`create_model`: sigma_min
# 0.006 for LDM, 0.1 for SD; sigma_max = sigma(1)). The sigmas here are LDM-4's, for checking flags
# before a network loads; the loaded teacher's replace them.
LATENT_TEACHER_DEFAULTS = SamplingSettings(solver='dpmpp', num_steps=11, schedule_type='discrete', schedule_rho=1.0,
                                           afs=False, sigma_min=0.006, sigma_max=LDM4_SIGMA_MAX)
# Command-line flag of each setting (EDM's generate.py names), for error messages.
FLAG_NAMES = dict(solver='--solver', num_steps='--num_steps', schedule_type='--schedule', schedule_rho='--rho',
                  sigma_min='--sigma_min', sigma_max='--sigma_max', afs='--afs', max_order='--max_order')


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """Options of the higher-order teacher solvers (a student samples with Euler)."""
  max_order: Optional[int] = None     # ipndm 1-4 / dpmpp 1-3; None: the official default
  predict_x0: bool = True             # DPM-Solver++ in data-prediction form
  lower_order_final: bool = True      # DPM-Solver++ lowers its order at the final steps
  thresholding: bool = True           # official dynamic thresholding in DPM-Solver++


def _flag_message(error: Exception) -> str:
  """'schedule_type: ...' (a library argument) -> '--schedule: ...' (the flag a user typed)."""
  text = str(error).strip('\'"')
  renames = {'sigma_min, sigma_max:': '--sigma_min, --sigma_max:', 'rho:': '--rho:',
             **{f'{k}:': f'{v}:' for k, v in FLAG_NAMES.items()}}
  for old, new in renames.items():
    if text.startswith(old):
      return new + text[len(old):]
  return text


def validate(settings: SamplingSettings, options: SolverOptions = SolverOptions()) -> None:
  """One-line ValueError naming the flag at fault, before anything is loaded or compiled."""
  try:
    schedules.validate_schedule(settings.num_steps, settings.sigma_min, settings.sigma_max,
                                settings.schedule_type, settings.schedule_rho)
    solvers.validate_solver(settings.solver, settings.num_steps, options.max_order)
  except ValueError as e:
    raise ValueError(_flag_message(e)) from None


def teacher_settings(network_config=None, latent=False, **overrides) -> SamplingSettings:
  """A teacher's defaults with the given (non-None) overrides; sigmas clamped to the network's range.

  Args:
    network_config: the teacher's `NetworkConfig` (None: no clamping, for early validation).
    latent: start from `LATENT_TEACHER_DEFAULTS` (an LDM / SD teacher) instead of EDM's.
    **overrides: fields of `SamplingSettings`.
  """
  settings = _overridden(LATENT_TEACHER_DEFAULTS if latent else TEACHER_DEFAULTS, overrides)
  if network_config is not None:
    settings = dataclasses.replace(settings, sigma_min=max(settings.sigma_min, network_config.sigma_min),
                                   sigma_max=min(settings.sigma_max, network_config.sigma_max))
  return settings


def latent_teacher_settings(teacher, **overrides) -> SamplingSettings:
  """`LATENT_TEACHER_DEFAULTS` with the teacher's sigma range, then the (non-None) overrides;
  sigma_max clamped to sigma(1), the end of the teacher's VP table."""
  defaults = dataclasses.replace(LATENT_TEACHER_DEFAULTS, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max)
  settings = _overridden(defaults, overrides)
  return dataclasses.replace(settings, sigma_max=min(settings.sigma_max, teacher.sigma_max))


def _overridden(defaults: SamplingSettings, overrides: dict) -> SamplingSettings:
  """`defaults` with the overrides that were given (None: not given, the default stays)."""
  return dataclasses.replace(defaults, **{k: v for k, v in overrides.items() if v is not None})


def student_settings(stored: SamplingSettings, num_steps=None, **fixed) -> SamplingSettings:
  """The stored settings of a distilled student; only an SFD-v student accepts another num_steps.

  Raises:
    ValueError: a fixed setting was given (`fixed` holds the other, non-None flags), or
      num_steps for a student distilled for one num_steps only.
  """
  given = [k for k, v in fixed.items() if v is not None]
  if given:
    raise ValueError(f'{FLAG_NAMES.get(given[0], "--" + given[0])}: a student samples with the settings '
                     'stored in its checkpoint')
  if num_steps is None or num_steps == stored.num_steps:
    return stored
  if stored.second_stage:
    raise ValueError(f'--num_steps: this student is a second-stage '
                     f'{stored.num_steps - 1 - int(stored.afs)}-NFE model (num_steps {stored.num_steps} only)')
  if not stored.use_step_condition:
    raise ValueError(f'--num_steps: this student was distilled for {stored.num_steps} time points only '
                     '(it has no step condition)')
  return dataclasses.replace(stored, num_steps=int(num_steps))


class TextConditions(NamedTuple):
  """How a text-conditioned model turns captions into conditions (Stable Diffusion's CLIP text encoder)."""
  tokenize: Callable  # tokenize(prompts) -> [n, 77] int32 token ids (host)
  encode: Callable    # encode(variables, token_ids) -> [n, 77, D] float32 (traced)


# The official SD sampling guidance (the rate sfd-main's sample.py reads from the training run's
# --guidance_rate; 7.5 is Stable Diffusion's usual rate and the fixture's guided case).
DEFAULT_GUIDANCE = 7.5


class Model(NamedTuple):
  """A network ready to sample: config, variables, `denoise_fn(variables, x, sigma, condition)`, settings,
  and what sampling it needs beyond them (a latent model: latent shape, VP table, decoder; a
  text-conditioned one: its text encoder and the guidance)."""
  config: Any
  variables: dict
  denoise_fn: Callable
  settings: SamplingSettings
  shape: tuple = ()                   # (H, W, C) the solver runs on; () = the config's image shape
  vp: Any = None                      # discrete VP table ('discrete' schedules)
  decode_fn: Optional[Callable] = None  # decode_fn(variables, x) -> images; None: x are the images
  text: Optional[TextConditions] = None  # a text-conditioned model's tokenizer and encoder
  guidance: float = 1.0               # classifier-free guidance (text models); 1: conditional pass only

  @property
  def guided(self) -> bool:
    """Whether each step runs the conditional and unconditional passes (one batch of 2N)."""
    return self.text is not None and self.guidance != 1.0

  @property
  def nfe(self) -> int:
    """Network evaluations per image, both passes counted when guided (as the official sample.py)."""
    s = self.settings
    return solvers.nfe(s.solver, s.num_steps, s.afs) * (2 if self.guided else 1)


def load_model(network=None, student=None, guidance=None, tokenizer=None, arch=None, **overrides) -> Model:
  """Loads a teacher (`network`) or a distilled student and resolves its sampling settings.

  Args:
    network: EDM snapshot .pkl, converted directory or SFD workdir, sampled as a teacher; or a
      latent teacher (an LDM / SD `.ckpt` / `.safetensors` with `arch`, or a converted latent
      directory), sampled with its LitEma weights and decoded by its first stage.
    student: a training workdir or checkpoint directory, sampled with its stored settings.
    guidance: classifier-free guidance of a text-conditioned model (None: `DEFAULT_GUIDANCE`).
    tokenizer: a text-conditioned model's CLIP tokenizer folder (`vocab.json` + `merges.txt`); None:
      the vocabulary in the installed open_clip_torch wheel (the same ids).
    arch: a latent teacher checkpoint's architecture (a preset or an LDM yaml path; see
      `sfd_jax.teacher.load_teacher`).
    **overrides: `SamplingSettings` fields (None = default / stored).

  Raises:
    ValueError: `guidance` for a model without text conditions, `arch` for a student, or a bad
      setting (one line).
  """
  from sfd_jax.networks import make_denoise  # pylint: disable=g-import-not-at-top
  if student and arch is not None:
    raise ValueError('--arch: a student names its own architecture (give --arch with a --network checkpoint)')
  if network:
    from sfd_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
    if teacher_lib.is_latent(network, arch):
      from sfd_jax.latent import student as latent_student  # pylint: disable=g-import-not-at-top
      teacher = teacher_lib.load_teacher(network, arch)
      # Laid out as a student's variables (UNet as params, first stage / VP table / text encoder
      # as buffers), the teacher samples through the same CFGPrecond, decoder and text path.
      return _latent_student_model(teacher.config, latent_student.student_variables(teacher.params),
                                   latent_teacher_settings(teacher, **overrides), guidance, tokenizer)
  if student:
    from sfd_jax import checkpoint  # pylint: disable=g-import-not-at-top
    config, variables, stored = checkpoint.load_student(student)
    settings = student_settings(stored, **overrides)
    from sfd_jax.latent.config import LatentConfig  # pylint: disable=g-import-not-at-top
    if isinstance(config, LatentConfig):  # a latent teacher's student
      return _latent_student_model(config, variables, settings, guidance, tokenizer)
  else:
    from sfd_jax.io import load_network  # pylint: disable=g-import-not-at-top
    config, variables = load_network(network)
    settings = teacher_settings(config, **overrides)
  _check_guidance(guidance, text=False)
  _check_tokenizer(tokenizer, text=False)
  step_condition = settings.num_steps if settings.use_step_condition else None
  denoise = make_denoise(config)

  def denoise_fn(variables, x, sigma, class_labels):
    return denoise(variables, x, sigma, class_labels=class_labels, step_condition=step_condition)
  return Model(config, variables, denoise_fn, settings)


def _check_guidance(guidance, text: bool) -> float:
  """The guidance to sample with; a one-line ValueError naming `--guidance` when it cannot apply."""
  if guidance is None:
    return DEFAULT_GUIDANCE if text else 1.0
  if not text:
    raise ValueError('--guidance: the model is not text-conditioned (classifier-free guidance needs the '
                     'unconditional text condition)')
  if not math.isfinite(guidance):
    raise ValueError(f'--guidance: need a finite number, got {guidance}')
  return float(guidance)


def _check_tokenizer(tokenizer, text: bool) -> None:
  if tokenizer is not None and not text:
    raise ValueError('--tokenizer: the model is not text-conditioned')


def _latent_student_model(config, variables, settings: SamplingSettings, guidance=None, tokenizer=None) -> Model:
  """A latent student: CFGPrecond over its UNet with the VP table, first stage (and for Stable
  Diffusion the text encoder) it carries as buffers."""
  from sfd_jax.latent import student as latent_student  # pylint: disable=g-import-not-at-top
  vp = latent_student.student_vp(variables)
  denoise = latent_student.make_student_denoise(config, vp)
  step_condition = settings.num_steps if settings.use_step_condition else None
  text = None
  if config.text_encoder is not None:
    from sfd_jax.clip import tokenizer as clip_tokenizer  # pylint: disable=g-import-not-at-top
    vocab = None if tokenizer is None else clip_tokenizer.load_vocabulary(tokenizer)
    text = TextConditions(latent_student.make_tokenize(config, vocab), latent_student.make_student_encode(config))
  guidance = _check_guidance(guidance, text is not None)
  _check_tokenizer(tokenizer, text is not None)

  def denoise_fn(variables, x, sigma, condition):
    condition, uncondition = condition if text is not None else (None, None)
    return denoise(variables, x, sigma, condition, step_condition=step_condition, uncondition=uncondition,
                   guidance=guidance)
  return Model(config, variables, denoise_fn, settings, latent_student.latent_shape(config), vp,
               latent_student.make_student_decode(config), text, guidance)


def text_conditions(model: Model, captions, captions_source: str = '--prompts'):
  """`(condition_fn, condition_inputs)` of a text model for `generate_batches`: seed i takes
  caption i (the official sample.py; one str: every seed's); the unconditional condition is the
  encoding of "" (only when guided)."""
  from sfd_jax.clip import prompts  # pylint: disable=g-import-not-at-top
  text, guided = model.text, model.guided
  empty = np.asarray(text.tokenize(['']))

  def condition_inputs(seeds):
    return np.asarray(text.tokenize(prompts.captions_at(captions, seeds, captions_source, what='seed')))

  def condition_fn(variables, token_ids):
    condition = text.encode(variables, token_ids)
    if not guided:
      return condition, None
    return condition, jnp.broadcast_to(text.encode(variables, empty), condition.shape)
  return condition_fn, condition_inputs


def model_batches(model: Model, seeds, *, options: SolverOptions = SolverOptions(), batch_size=64,
                  class_idx=None, devices=None, progress=False, captions=None, captions_source='--prompts'):
  """`generate_batches` for a loaded `Model` with its settings.

  Args:
    captions: a text-conditioned model's captions (seed i takes caption i), or one str for every
      seed; None for other models.
    captions_source: how the captions were given, named in errors (the prompts file).
  """
  s, config = model.settings, model.config
  validate(s, options)
  num_classes = getattr(config, 'label_dim', 0)
  if class_idx is not None and not 0 <= class_idx < max(num_classes, 1):
    raise ValueError(f'--class: need 0 <= class < {num_classes} for this model, got {class_idx}'
                     if num_classes else '--class: the model is unconditional')
  conditions = {}
  if model.text is None and captions is not None:
    raise ValueError('--prompts / --prompt: the model is not text-conditioned')
  if model.text is not None:
    if captions is None:
      raise ValueError('--prompts or --prompt: a text-conditioned model samples from captions (seed i takes '
                       'caption i of --prompts)')
    from sfd_jax.clip import prompts  # pylint: disable=g-import-not-at-top
    prompts.captions_at(captions, seeds, captions_source, what='seed')  # every seed has its caption
    conditions = dict(zip(('condition_fn', 'condition_inputs'), text_conditions(model, captions, captions_source)))
  try:
    t_steps = schedules.get_schedule(s.num_steps, s.sigma_min, s.sigma_max, s.schedule_type, s.schedule_rho,
                                     vp=model.vp)
  except ValueError as e:  # e.g. 'discrete' without a VP table or with rho != 1: name the flag
    raise ValueError(_flag_message(e)) from None
  solver_opts = dict(afs=s.afs)
  if s.solver != 'euler':
    solver_opts.update(dataclasses.asdict(options))
  shape = model.shape or (config.img_resolution, config.img_resolution, config.img_channels)
  return generate_batches(model.denoise_fn, shape, seeds, t_steps=t_steps, solver=s.solver,
                          variables=model.variables, batch_size=batch_size, num_classes=num_classes,
                          class_idx=class_idx, devices=devices, progress=progress, decode_fn=model.decode_fn,
                          **conditions, **solver_opts)


def write_outputs(batches, *, outdir=None, npz=None, grid=None):
  """Writes PNGs (EDM's folder layout) / one .npz / a grid from the `generate_batches` stream."""
  all_seeds, all_images, all_classes = [], [], []
  for seeds, out, classes in batches:
    pixels = images_lib.to_uint8(out)
    if outdir:
      images_lib.save_seed_images(outdir, seeds, pixels)
    if npz or (grid and sum(map(len, all_images)) < GRID_MAX_IMAGES):
      all_seeds.append(seeds)
      all_images.append(pixels if npz else pixels[:GRID_MAX_IMAGES])
      all_classes.append(classes)
  if not all_images:
    return
  pixels = np.concatenate(all_images)
  if grid:
    images_lib.save_grid(grid, pixels[:GRID_MAX_IMAGES])
  if npz:
    classes = None if all_classes[0] is None else np.concatenate(all_classes)
    images_lib.save_npz(npz, pixels, np.concatenate(all_seeds), classes)
