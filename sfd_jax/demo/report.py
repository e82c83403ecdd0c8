"""The demo report: how close few-step samplers and the SFD student get to the teacher's ODE.

`evaluate` samples the same evaluation noise with the teacher's converged ODE solution (Heun,
many steps), with training-free solvers at NFE 2..5 and with the SFD student; `build_report`
turns that into the report dictionary and `write_report` writes `report.json`, `report.md`
and `grid.png`. `make_report` runs the three.
Evaluation latents come from numpy's per-seed generators (EDM's convention of one
generator per seed), a different generator family from the JAX key stream that
distillation draws its training noise from, so no evaluation noise was ever trained on.
"""
import dataclasses
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from sfd_jax import networks
from sfd_jax import schedules
from sfd_jax import solvers
from sfd_jax.checkpoint import Student
from sfd_jax.config_types import SamplingSettings
from sfd_jax.demo import data
from sfd_jax.demo import features as fd
from sfd_jax.images import to_uint8
from sfd_jax.teacher import Teacher

# Training-free baselines: (row name, solver, extra solver kwargs). DPM-Solver++(3M) and
# iPNDM are the strongest training-free few-step solvers in the SFD paper's tables.
# Dynamic thresholding is off: digits saturate at +-1, so it clips good x0 predictions.
BASELINES = (
    ('Euler', 'euler', {}),
    ('iPNDM', 'ipndm', dict(max_order=4)),
    ('DPM-Solver++(3M)', 'dpmpp', dict(max_order=3, thresholding=False)),
    ('Heun', 'heun', {}),
)
EVAL_SEED_START = 100_000  # first evaluation seed; seeds are numpy RandomState seeds
GRID_COLUMNS = 12
GRID_SCALE = 4             # pixels per image pixel in grid.png (8x8 digits are tiny)
LABEL_WIDTH = 150


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Size of the evaluation.

  Attributes:
    nfes: NFEs at which every method is evaluated.
    num_samples: evaluation samples (seeds EVAL_SEED_START ...).
    reference_steps: time points of the Heun reference solution.
    check_steps: time points of a coarser Heun run whose distance to the reference is
      reported as evidence that the reference has converged.
    batch: samples per sampler call (the network batch).
    grid_columns: seeds shown in grid.png.
  """
  nfes: tuple = (2, 3, 4, 5)
  num_samples: int = 400
  reference_steps: int = 33
  check_steps: int = 17
  batch: int = 400
  grid_columns: int = GRID_COLUMNS


def eval_latents(num_samples, shape, seed_start=EVAL_SEED_START):
  """Unit Gaussian latents `[num_samples, *shape]`, one numpy generator per seed."""
  return np.stack([np.random.RandomState(seed_start + i).standard_normal(shape)
                   for i in range(num_samples)]).astype(np.float32)


def baseline_num_steps(solver, nfe, afs):
  """Time points that give `nfe` network calls, or None if the solver cannot hit that NFE."""
  return solvers.num_steps_for_nfe(solver, nfe, afs)


def _batched(fn, latents, batch):
  """Applies a jitted `fn` to `latents` in chunks of `batch` (last chunk padded)."""
  outs = []
  for start in range(0, len(latents), batch):
    chunk = latents[start:start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    outs.append(np.asarray(fn(jnp.asarray(chunk)))[:batch - pad])
  return np.concatenate(outs)


def jit_denoiser(denoise_fn, variables, **kwargs):
  """`denoise(x, sigma)` compiled once; the solvers around it run eagerly.

  Few-step solvers are cheap elementwise arithmetic around the network, and `solvers.sample`
  unrolls its loop, so jitting whole samplers would compile every (solver, NFE) pair and a
  256-call reference. Compiling only the network keeps the demo's compile time to seconds.
  """
  fn = jax.jit(lambda v, x, sigma, kw: denoise_fn(v, x, sigma, **kw))
  kwargs = {k: (None if v is None else jnp.asarray(v, jnp.float32)) for k, v in kwargs.items()}
  return lambda x, sigma: fn(variables, x, jnp.asarray(sigma, jnp.float32), kwargs)


def make_sampler(denoise, solver, num_steps, afs, schedule, **solver_kwargs):
  """A `latents -> samples` function for one solver, schedule and step count.

  Args:
    denoise: `denoise(x, sigma)` (e.g. from `jit_denoiser`).
    solver: solver name of `sfd_jax.solvers`.
    num_steps: time points.
    afs: analytical first step.
    schedule: dict(sigma_min, sigma_max, schedule_type, rho) (the report's 'schedule').
    **solver_kwargs: e.g. max_order.

  Returns:
    Function from unit latents `[B, H, W, C]` to samples.
  """
  t_steps = jnp.asarray(schedules.get_schedule(
      num_steps, schedule['sigma_min'], schedule['sigma_max'],
      schedule_type=schedule['schedule_type'], rho=schedule['rho']), jnp.float32)
  return lambda z: solvers.sample(denoise, z, t_steps, solver, afs=afs, **solver_kwargs)


def rmse(samples, reference):
  """Root mean square difference over all pixels, in image units ([-1, 1] scale)."""
  return float(np.sqrt(np.mean((np.asarray(samples, np.float64) - reference) ** 2)))


def save_grid(path, rows, scale=GRID_SCALE):
  """Writes a labelled grid: one row per (label, images `[C, H, W, 1]`), same columns everywhere."""
  height, width = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
  columns = rows[0][1].shape[0]
  pad = 2
  canvas = Image.new('L', (LABEL_WIDTH + columns * (width + pad), len(rows) * (height + pad)), 255)
  draw = ImageDraw.Draw(canvas)
  for r, (label, images) in enumerate(rows):
    top = r * (height + pad)
    draw.text((4, top + height // 2 - 5), label, fill=0)
    for c, img in enumerate(to_uint8(images)[..., 0]):
      tile = Image.fromarray(img, 'L').resize((width, height), Image.NEAREST)
      canvas.paste(tile, (LABEL_WIDTH + c * (width + pad), top))
  canvas.save(path)


def _fmt(value, digits=4):
  return '—' if value is None else f'{value:.{digits}f}'


def render_markdown(report):
  """The human-readable report.md from the report.json dictionary."""
  nfes = report['options']['nfes']
  lines = [
      '# SFD demo report', '',
      f"Machine: {report['machine']}; date: {report['date']}; "
      f"{report['num_samples']} evaluation samples (numpy seeds {report['eval_seeds'][0]}.."
      f"{report['eval_seeds'][1]}, never used in training).", '',
      f"Reference: teacher ODE solved with Heun over {report['reference']['num_steps']} time points "
      f"({report['reference']['nfe']} NFE); a {report['reference']['check_steps']}-point Heun run is "
      f"{report['reference']['check_rmse']:.2e} RMSE away from it, so the reference's own error "
      'is about a quarter of that (Heun is second order).', '',
      '## RMSE to the teacher\'s ODE solution from the same noise (lower is better)', '',
      '| method | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
      '|---|' + '---|' * len(nfes)]
  fd_lines = ['| method | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|' + '---|' * len(nfes)]
  for name in report['method_order']:
    cells = {r['nfe']: r for r in report['results'] if r['method'] == name}
    lines.append(f'| {name} | ' + ' | '.join(_fmt(cells[n]['rmse'] if n in cells else None) for n in nfes) + ' |')
    fd_lines.append(f'| {name} | ' + ' | '.join(_fmt(cells[n]['fd'] if n in cells else None, 2) for n in nfes)
                    + ' |')
  summary = report['summary']
  lines += [
      '', '## Fréchet distance to the digits data set (lower is better)', '',
      f"Features: last hidden layer (64 units) of a small MLP classifier fitted on the same digits "
      f"(held-out accuracy {report['feature_net']['heldout_accuracy']:.3f}). Inception features would "
      'be a download and mean little on 8x8 digits; a classifier of the data itself is the standard '
      'substitute (as FID uses a classifier of natural images). '
      f"Teacher reference: {report['reference']['fd']:.2f}; real digits, "
      f"{report['num_samples']} random images vs all: {report['data_fd']:.2f}.", ''] + fd_lines + [
      '', '## Verdict (NFE 2)', '',
      f"SFD student RMSE {summary['sfd_rmse']:.4f} vs best training-free solver "
      f"{summary['best_baseline']} {summary['best_baseline_rmse']:.4f}: ratio "
      f"{summary['ratio']:.3f} (target ≤ 0.5: {'met' if summary['ratio'] <= 0.5 else 'NOT met'})."
      if summary['ratio'] is not None else 'No student result at this NFE.', '',
      '![grid](grid.png)', '',
      'grid.png: top row the reference, then one row per method at NFE 2, same seeds in every column.', '',
      f"Timings (s): {json.dumps(report['timings'])}"]
  return '\n'.join(lines) + '\n'


def _machine():
  """CPU model (Linux), core count and JAX backend, for the report header."""
  cpu = platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}'


def student_denoiser(student: Student, num_steps):
  """Student `denoise(x, sigma)` in eval mode (SFD-v students get num_steps as condition)."""
  condition = float(num_steps) if student.sampling.use_step_condition else None
  return jit_denoiser(networks.make_denoise(student.config), student.variables, step_condition=condition)


def student_nfes(sampling: SamplingSettings):
  """NFEs the student can be sampled at: one for SFD, four (num_steps 4..7) for SFD-v."""
  steps = (4, 5, 6, 7) if sampling.use_step_condition else (sampling.num_steps,)
  return {solvers.nfe('euler', n, sampling.afs): n for n in steps}


DEFAULT_OPTIONS = EvalOptions()


@dataclasses.dataclass
class Evaluation:
  """What `evaluate` measured: per-method rows, the reference and the grid's images."""
  results: list
  reference: np.ndarray
  check_rmse: float
  reference_fd: float
  data_fd: float
  heldout_accuracy: float
  grid_rows: list
  timings: dict


def evaluate(teacher: Teacher, student: Student, options: EvalOptions = DEFAULT_OPTIONS) -> Evaluation:
  """Samples the evaluation seeds with the reference, every training-free baseline and the student.

  Args:
    teacher: the frozen teacher the student was distilled from.
    student: the distilled student (`checkpoint.load_student` of its workdir).
    options: the size of the evaluation.
  """
  cfg, sampling = teacher.config, student.sampling
  schedule = _schedule(sampling)
  latents = eval_latents(options.num_samples, (cfg.img_resolution, cfg.img_resolution, cfg.img_channels))
  teacher_denoise = jit_denoiser(teacher.denoise, teacher.params)
  timings = {}

  t0 = time.time()
  reference = _batched(make_sampler(teacher_denoise, 'heun', options.reference_steps, False, schedule),
                       latents, options.batch)
  check = _batched(make_sampler(teacher_denoise, 'heun', options.check_steps, False, schedule),
                   latents, options.batch)
  timings['reference'] = round(time.time() - t0, 1)

  t0 = time.time()
  feature_net = fd.fit_feature_net()
  digits, _ = data.load_digits_images(cfg.img_resolution)
  data_stats = fd.feature_stats(fd.features(feature_net, digits))
  fd_of = lambda x: fd.frechet_distance(*fd.feature_stats(fd.features(feature_net, x)), *data_stats)
  subset = np.random.RandomState(0).choice(len(digits), min(options.num_samples, len(digits)), replace=False)
  timings['feature_net'] = round(time.time() - t0, 1)

  grid_nfe = min(options.nfes)
  results, grid_rows, t0 = [], {}, time.time()

  def record(name, solver, afs, nfe, num_steps, out, training_free):
    results.append(dict(method=name, solver=solver, afs=afs, nfe=nfe, num_steps=num_steps,
                        training_free=training_free, rmse=rmse(out, reference), fd=fd_of(out)))
    if nfe == grid_nfe:
      grid_rows[name] = out[:options.grid_columns]

  for name, solver, afs, nfe, num_steps, kwargs in baseline_runs(options.nfes):
    record(name, solver, afs, nfe, num_steps, _batched(
        make_sampler(teacher_denoise, solver, num_steps, afs, schedule, **kwargs), latents, options.batch),
           training_free=True)
  timings['baselines'] = round(time.time() - t0, 1)

  t0 = time.time()
  student_name = 'SFD-v' if sampling.use_step_condition else 'SFD'
  for nfe, num_steps in sorted(student_nfes(sampling).items()):
    record(student_name, 'euler', sampling.afs, nfe, num_steps, _batched(
        make_sampler(student_denoiser(student, num_steps), 'euler', num_steps, sampling.afs, schedule),
        latents, options.batch), training_free=False)
  timings['student'] = round(time.time() - t0, 1)

  method_order = list(dict.fromkeys(r['method'] for r in results))
  rows = [('Reference (Heun)', reference[:options.grid_columns])]
  rows += [(name, grid_rows[name]) for name in method_order if name in grid_rows]
  return Evaluation(results=results, reference=reference, check_rmse=rmse(check, reference),
                    reference_fd=fd_of(reference), data_fd=fd_of(digits[subset]),
                    heldout_accuracy=feature_net.heldout_accuracy, grid_rows=rows, timings=timings)


def _schedule(sampling: SamplingSettings) -> dict:
  return dict(sigma_min=sampling.sigma_min, sigma_max=sampling.sigma_max,
              schedule_type=sampling.schedule_type, rho=sampling.schedule_rho)


def build_report(evaluation: Evaluation, sampling: SamplingSettings, options: EvalOptions = DEFAULT_OPTIONS,
                 timings=None) -> dict:
  """The report dictionary (written as report.json) from an `Evaluation`."""
  results = evaluation.results
  return dict(
      machine=_machine(), date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      num_samples=options.num_samples,
      eval_seeds=[EVAL_SEED_START, EVAL_SEED_START + options.num_samples - 1],
      options=dataclasses.asdict(options), settings=sampling.to_dict(), schedule=_schedule(sampling),
      reference=dict(solver='heun', num_steps=options.reference_steps,
                     nfe=solvers.nfe('heun', options.reference_steps), check_steps=options.check_steps,
                     check_rmse=evaluation.check_rmse, fd=evaluation.reference_fd),
      feature_net=dict(hidden_sizes=list(fd.HIDDEN_SIZES), heldout_accuracy=evaluation.heldout_accuracy),
      data_fd=evaluation.data_fd, method_order=list(dict.fromkeys(r['method'] for r in results)),
      results=results, summary=summarize(results, min(options.nfes)),
      timings={**(timings or {}), **evaluation.timings})


def make_report(workdir, teacher: Teacher, student: Student, options: EvalOptions = DEFAULT_OPTIONS,
                timings=None) -> dict:
  """`evaluate`, `build_report`, `write_report`; returns the report dictionary."""
  start = time.time()
  evaluation = evaluate(teacher, student, options)
  report = build_report(evaluation, student.sampling, options, timings)
  report['timings']['report_total'] = round(time.time() - start, 1)
  write_report(workdir, report, evaluation.grid_rows)
  return report


def baseline_runs(nfes):
  """Every training-free run: (row name, solver, afs, nfe, num_steps, solver kwargs)."""
  for label, solver, kwargs in BASELINES:
    for afs in (False, True):
      for nfe in nfes:
        num_steps = baseline_num_steps(solver, nfe, afs)
        if num_steps is not None:
          yield label + (' + AFS' if afs else ''), solver, afs, nfe, num_steps, kwargs


def summarize(results, nfe):
  """The verdict at `nfe`: best training-free RMSE, the student's, and their ratio."""
  at_nfe = [r for r in results if r['nfe'] == nfe]
  best = min((r for r in at_nfe if r['training_free']), key=lambda r: r['rmse'])
  student = next((r for r in at_nfe if not r['training_free']), None)
  return dict(nfe=nfe, best_baseline=best['method'], best_baseline_rmse=best['rmse'],
              sfd_rmse=student['rmse'] if student else None,
              ratio=student['rmse'] / best['rmse'] if student else None)


def write_report(workdir, report, rows):
  """report.json, report.md and grid.png, then the two lines the demo prints."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(render_markdown(report))
  save_grid(os.path.join(workdir, 'grid.png'), rows)
  print(f"Demo report: {os.path.join(workdir, 'report.md')} (report.json, grid.png beside it)")
  summary = report['summary']
  if summary['ratio'] is not None:
    print(f"NFE {summary['nfe']}: {report['method_order'][-1]} RMSE {summary['sfd_rmse']:.4f}, best "
          f"training-free ({summary['best_baseline']}) {summary['best_baseline_rmse']:.4f}, "
          f"ratio {summary['ratio']:.3f}")
