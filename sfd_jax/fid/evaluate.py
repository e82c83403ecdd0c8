"""FID pipelines: features of an image source or of samples, streamed into EDM's statistics."""
import numpy as np

from sfd_jax import images as images_lib
from sfd_jax.fid import detector as detector_lib
from sfd_jax.fid import metrics, sources


def _progress(iterable, total, desc, enabled):
  if not enabled:
    return iterable
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, unit='batch', desc=desc)


def stats_of_batches(detector, batches, keep=0, batch_size=detector_lib.DEFAULT_BATCH):
  """Streams uint8 image batches through the detector into EDM's statistics.

  Args:
    detector: a `Detector`.
    batches: iterable of uint8 `[n, H, W, C]` arrays.
    keep: also return the features of the first `keep` images (for precision / recall).
    batch_size: detector batch size.

  Returns:
    `(mu, sigma, kept)`: float64 statistics and float32 `[min(keep, N), 2048]` features.
  """
  acc, kept, num_kept = metrics.RunningStats(), [], 0
  for batch in batches:
    feats = detector_lib.features(detector, batch, batch_size)
    acc.update(feats)
    if num_kept < keep:
      kept.append(feats[:keep - num_kept])
      num_kept += len(kept[-1])
  mu, sigma = acc.result()
  kept = np.concatenate(kept) if kept else np.zeros((0, acc.dim), np.float32)
  return mu, sigma, kept


def source_batches(source, indices, batch_size, progress=False, desc='features'):
  """uint8 batches of `source` at `indices`, in order."""
  starts = range(0, len(indices), batch_size)
  for start in _progress(starts, len(starts), desc, progress):
    yield source.load(indices[start:start + batch_size])


def source_stats(detector, path, num=None, seed=0, batch_size=detector_lib.DEFAULT_BATCH, keep=0,
                 progress=False, tfds_data_dir=None):
  """EDM's `calculate_inception_stats` on an image folder, zip, `.npz` or `tfds:NAME`.

  Args:
    num: use a random `num` of the images (EDM's `max_size` with `random_seed=seed`) when the
      source holds more; None uses all.
    keep: also return the features of a random `keep` of the images (RandomState(seed)).

  Returns:
    `(mu, sigma, kept_features, image_count)`.
  """
  source = sources.open_source(path, tfds_data_dir)
  if num is not None and source.count < num:
    raise sources.SourceError(f'{path}: found {source.count} images, but expected at least {num}')
  indices = sources.subset(source.count, num, seed)
  if len(indices) < 2:
    raise sources.SourceError(f'{path}: found {len(indices)} images, need at least 2 for statistics')
  if keep and keep < len(indices):  # Move the kept subset to the front; statistics ignore order.
    chosen = np.zeros(len(indices), bool)
    chosen[sources.subset(len(indices), keep, seed)] = True
    indices = np.concatenate([indices[chosen], indices[~chosen]])
  mu, sigma, kept = stats_of_batches(detector, source_batches(source, indices, batch_size, progress),
                                     keep, batch_size)
  return mu, sigma, kept, len(indices)


def sample_batches(generated, on_batch=None):
  """uint8 batches from `sfd_jax.sample.generate_batches`, quantised as the PNG writer does.

  Args:
    generated: the `(seeds, images, classes)` stream.
    on_batch: called as `on_batch(seeds, pixels)` with each batch before it is yielded (e.g. a
      CLIP score taken on the same samples).
  """
  for seeds, out, _ in generated:
    pixels = images_lib.to_uint8(out)
    if on_batch is not None:
      on_batch(seeds, pixels)
    yield pixels
