r"""Sample images from an EDM teacher or a distilled SFD student: `python -m sfd_jax.sample`.

Teacher (any solver of `sfd_jax.solvers`):

  python -m sfd_jax.sample --network=edm-cifar10-32x32-uncond-vp.pkl --solver=dpmpp \
      --num_steps=6 --afs --seeds=0-63 --grid=grid.png

Student (Euler with the settings stored in its checkpoint):

  python -m sfd_jax.sample --student=runs/cifar10 --seeds=0-49999 --batch=500 --outdir=out

Each seed's latents (and class) come from `jax.random.key(seed)` alone, so an image depends
on its seed only, not on the batch size or the number of devices (bit for bit on CPU; on a
GPU the convolution algorithms, and TF32 under JAX's default matmul precision, depend on the
batch shape, so a different --batch can move a few pixels by one level; measured on an H100
with the fixture network). The importable core is `generate` / `generate_batches`.
"""
import argparse
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import images as images_lib
from sfd_jax import schedules, solvers

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


def _make_sampler(denoise_fn, shape, t_steps, solver, solver_opts, num_classes, class_idx, mesh):
  """Jitted `(variables, seeds) -> (images, classes)` with the batch sharded over `mesh`."""
  data = NamedSharding(mesh, P('data'))

  def run(variables, seeds):
    latents = seed_latents(seeds, shape)
    classes = _batch_classes(seeds, num_classes, class_idx)
    labels = None if classes is None else jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)
    denoise = lambda x, sigma: denoise_fn(variables, x, sigma, labels)
    out = solvers.sample(denoise, latents, t_steps, solver, **solver_opts)
    return out, (jnp.zeros(seeds.shape, jnp.int32) if classes is None else classes)

  return jax.jit(run, in_shardings=(NamedSharding(mesh, P()), data), out_shardings=(data, data))


def generate_batches(denoise_fn, shape, seeds, *, t_steps, solver='euler', variables=None,
                     batch_size=64, num_classes=0, class_idx=None, devices=None, progress=False,
                     **solver_opts):
  """Samples the given seeds batch by batch: an iterator of `(seeds, images, classes)`.

  Args:
    denoise_fn: `denoise_fn(variables, x, sigma, class_labels) -> D(x; sigma)`, x NHWC,
      class_labels one-hot `[N, num_classes]` float32 or None.
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
                          num_classes, class_idx, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  # Validation above runs at call time; only the sampling itself is lazy.
  return _iterate(sampler, variables, seeds, batch_size, num_classes > 0, progress)


def _iterate(sampler, variables, seeds, batch_size, conditional, progress):
  starts = range(0, len(seeds), batch_size)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm(starts, unit='batch', desc='sampling')
  for start in starts:
    chunk = seeds[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])]).astype(np.int32)
    out, classes = sampler(variables, padded)
    yield (chunk, np.asarray(out)[:len(chunk)],
           np.asarray(classes, np.int64)[:len(chunk)] if conditional else None)


def generate(denoise_fn, shape, seeds, **kwargs):
  """All images of `generate_batches(denoise_fn, shape, seeds, **kwargs)` as one float32
  `[len(seeds), H, W, C]` array, in seed order."""
  return np.concatenate([out for _, out, _ in generate_batches(denoise_fn, shape, seeds, **kwargs)])


# ------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors and exit status 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def _flags():
  p = _Parser(prog='python -m sfd_jax.sample', description=__doc__.split('\n\n')[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument('--network', help='EDM snapshot .pkl or converted teacher directory')
  src.add_argument('--student', help='distilled student: training workdir or checkpoint directory')
  p.add_argument('--seeds', default='0-63', help='e.g. 0-49999 or 1,5,10-20 (default 0-63)')
  p.add_argument('--batch', type=int, default=64, help='images per step over all devices')
  p.add_argument('--outdir', help='write PNGs as OUTDIR/000000/000123.png')
  p.add_argument('--npz', help='write all images to one .npz (arr_0: uint8 NHWC, seeds)')
  p.add_argument('--grid', help=f'write a PNG grid of the first {GRID_MAX_IMAGES} images')
  p.add_argument('--class', dest='class_idx', type=int, help='fixed class (conditional models)')
  teacher = p.add_argument_group('teacher sampling (ignored by --student, whose settings are stored)')
  teacher.add_argument('--solver', default=None, help=f'one of {sorted(solvers.SOLVERS)} (default heun)')
  teacher.add_argument('--num_steps', type=int, default=None,
                       help='time points, NFE + 1 (default 18); an SFD-v student accepts it too')
  teacher.add_argument('--schedule', default=None, help=f'one of {sorted(schedules.SCHEDULES)}')
  teacher.add_argument('--rho', type=float, default=None, help='schedule exponent (default 7)')
  teacher.add_argument('--sigma_min', type=float, default=None, help='default 0.002, at least the network\'s')
  teacher.add_argument('--sigma_max', type=float, default=None, help='default 80, at most the network\'s')
  teacher.add_argument('--afs', action=argparse.BooleanOptionalAction, default=None,
                       help='analytical first step (saves one NFE)')
  teacher.add_argument('--max_order', type=int, default=None, help='ipndm 1-4 / dpmpp 1-3')
  teacher.add_argument('--predict_x0', action=argparse.BooleanOptionalAction, default=True)
  teacher.add_argument('--lower_order_final', action=argparse.BooleanOptionalAction, default=True)
  teacher.add_argument('--thresholding', action=argparse.BooleanOptionalAction, default=True,
                       help='official dynamic thresholding in DPM-Solver++')
  p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True)
  return p


_TEACHER_DEFAULTS = dict(solver='heun', num_steps=18, schedule='polynomial', rho=7.0,
                         sigma_min=0.002, sigma_max=80.0, afs=False)


def _teacher_settings(args, config):
  """Sampling settings for a teacher: flags, else EDM's defaults; sigmas clamped to the net."""
  s = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in _TEACHER_DEFAULTS.items()}
  s['sigma_min'] = max(s['sigma_min'], config.sigma_min)
  s['sigma_max'] = min(s['sigma_max'], config.sigma_max)
  s['solver_opts'] = dict(afs=s.pop('afs'), max_order=args.max_order, predict_x0=args.predict_x0,
                          lower_order_final=args.lower_order_final, thresholding=args.thresholding)
  s['step_condition'] = None
  return s


def _student_settings(args, stored):
  """Sampling settings for a student: Euler with the stored schedule and AFS."""
  fixed = [k for k in ('solver', 'schedule', 'rho', 'sigma_min', 'sigma_max', 'afs', 'max_order')
           if getattr(args, k) is not None]
  if fixed:
    raise ValueError(f'--{fixed[0]}: a student samples with the settings stored in its checkpoint')
  num_steps = int(stored['num_steps'])
  if args.num_steps is not None:
    if not stored['use_step_condition']:
      raise ValueError(f'--num_steps: this student was distilled for {num_steps} time points only '
                       '(it has no step condition)')
    num_steps = args.num_steps
  return dict(solver='euler', num_steps=num_steps, schedule=stored['schedule_type'],
              rho=float(stored['rho']), sigma_min=float(stored['sigma_min']),
              sigma_max=float(stored['sigma_max']), solver_opts=dict(afs=bool(stored['afs'])),
              step_condition=num_steps if stored['use_step_condition'] else None)


def _load(args):
  """(config, variables, plain denoise) of the teacher or student; errors are one line."""
  from sfd_jax.networks import make_denoise  # pylint: disable=g-import-not-at-top
  if args.student:
    from sfd_jax import checkpoint  # pylint: disable=g-import-not-at-top
    config, variables, stored = checkpoint.load_student(args.student)
    return config, variables, make_denoise(config), _student_settings(args, stored)
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  teacher = load_teacher(args.network)
  return teacher.config, teacher.params, teacher.denoise, _teacher_settings(args, teacher.config)


def _check_args(args):
  """Everything that can be checked before loading a network."""
  if not (args.network or args.student):
    raise ValueError('--network or --student: give the model to sample from')
  if not (args.outdir or args.npz or args.grid):
    raise ValueError('--outdir, --npz or --grid: give at least one output')
  if args.batch < 1:
    raise ValueError(f'--batch: need at least 1, got {args.batch}')
  seeds = parse_seeds(args.seeds)
  if args.network:
    s = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in _TEACHER_DEFAULTS.items()}
    schedules.validate_schedule(s['num_steps'], s['sigma_min'], s['sigma_max'], s['schedule'], s['rho'])
    solvers.validate_solver(s['solver'], s['num_steps'], args.max_order)
  elif args.num_steps is not None and args.num_steps < 2:
    raise ValueError(f'--num_steps: need at least 2 time points (NFE + 1), got {args.num_steps}')
  return seeds


def _flag_message(e, args):
  """Names the flag for errors raised with an argument name (schedule_type, num_steps, ...)."""
  text = str(e).strip('\'"')
  renames = {'schedule_type:': '--schedule:', 'solver:': '--solver:', 'max_order:': '--max_order:',
             'num_steps:': '--num_steps:', 'rho:': '--rho:', 'sigma_min, sigma_max:': '--sigma_min, --sigma_max:',
             'class_idx:': '--class:'}
  for old, new in renames.items():
    if text.startswith(old):
      return new + text[len(old):]
  return text


def main(argv=None):
  """Runs the command line; returns 0, or exits with status 2 and a one-line error."""
  parser = _flags()
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only checkpoint directories
  try:
    seeds = _check_args(args)
    config, variables, denoise, s = _load(args)
    t_steps = schedules.get_schedule(s['num_steps'], s['sigma_min'], s['sigma_max'], s['schedule'], s['rho'])
    num_classes = config.label_dim
    if args.class_idx is not None and not 0 <= args.class_idx < max(num_classes, 1):
      raise ValueError(f'--class: need 0 <= class < {num_classes} for this model, got {args.class_idx}'
                       if num_classes else '--class: the model is unconditional')
    denoise_fn = functools.partial(_call_denoise, denoise, s['step_condition'])
    shape = (config.img_resolution, config.img_resolution, config.img_channels)
    batches = generate_batches(denoise_fn, shape, seeds, t_steps=t_steps, solver=s['solver'],
                               variables=variables, batch_size=args.batch, num_classes=num_classes,
                               class_idx=args.class_idx, progress=args.progress, **s['solver_opts'])
    _write(args, batches)
    where = ', '.join(str(p) for p in (args.outdir, args.npz, args.grid) if p)
    print(f'{len(seeds)} images from {args.network or args.student} -> {where}')
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    parser.exit(2, f'{parser.prog}: error: {_flag_message(e, args)}\n')
  return 0


def _call_denoise(denoise, step_condition, variables, x, sigma, class_labels):
  return denoise(variables, x, sigma, class_labels=class_labels, step_condition=step_condition)


def _write(args, batches):
  """Writes PNGs / .npz / grid from the `generate_batches` stream."""
  all_seeds, all_images, all_classes = [], [], []
  for seeds, out, classes in batches:
    pixels = images_lib.to_uint8(out)
    if args.outdir:
      images_lib.save_seed_images(args.outdir, seeds, pixels)
    if args.npz or (args.grid and sum(map(len, all_images)) < GRID_MAX_IMAGES):
      all_seeds.append(seeds)
      all_images.append(pixels if args.npz else pixels[:GRID_MAX_IMAGES])
      all_classes.append(classes)
  if not all_images:
    return
  pixels = np.concatenate(all_images)
  if args.grid:
    images_lib.save_grid(args.grid, pixels[:GRID_MAX_IMAGES])
  if args.npz:
    classes = None if all_classes[0] is None else np.concatenate(all_classes)
    images_lib.save_npz(args.npz, pixels, np.concatenate(all_seeds), classes)


if __name__ == '__main__':
  sys.exit(main())
