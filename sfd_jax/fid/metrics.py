"""FID statistics, the Fréchet distance, and precision / recall / density / coverage.

All in numpy float64, as EDM's `fid.py` (statistics and distance) and the official SFD
repo's `prdc.py` (k-NN manifolds, Naeem et al. 2020) compute them.
"""
import dataclasses
import os

import numpy as np
import scipy.linalg


class StatsError(ValueError):
  """A statistics file is unreadable or lacks `mu` / `sigma`."""


@dataclasses.dataclass
class RunningStats:
  """EDM's streaming accumulation: sum of features and of their outer products, float64."""

  dim: int = 2048
  count: int = 0
  total: np.ndarray = None
  outer: np.ndarray = None

  def __post_init__(self):
    self.total = np.zeros([self.dim], np.float64)
    self.outer = np.zeros([self.dim, self.dim], np.float64)

  def update(self, features):
    """Adds a `[n, dim]` batch of features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f'features: need [n, {self.dim}], got {list(f.shape)}')
    self.count += len(f)
    self.total += f.sum(0)
    self.outer += f.T @ f

  def result(self):
    """`(mu [dim], sigma [dim, dim])`: mean and unbiased covariance, EDM's formula."""
    if self.count < 2:
      raise ValueError(f'features: need at least 2 images for statistics, got {self.count}')
    mu = self.total / self.count
    sigma = (self.outer - np.outer(mu, mu) * self.count) / (self.count - 1)
    return mu, sigma


def stats(features):
  """`(mu, sigma)` of `[N, D]` features: mean and unbiased covariance in float64 (EDM's way)."""
  f = np.asarray(features)
  acc = RunningStats(f.shape[-1] if f.ndim == 2 else 0)
  acc.update(f)
  return acc.result()


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)).

  EDM's `calculate_fid_from_inception_stats`: scipy's `sqrtm` of the product, real part,
  float64. (EDM passes `disp=False`, which SciPy 1.17 deprecates; without it `sqrtm`
  returns the same matrix.)

  Raises:
    ValueError: mismatched dimensions, naming both.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[-1] if mu1.ndim else 0
  if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'statistics have mismatched dimensions: mu {list(mu1.shape)} / {list(mu2.shape)}, '
                     f'sigma {list(sigma1.shape)} / {list(sigma2.shape)}')
  m = np.square(mu1 - mu2).sum()
  s = scipy.linalg.sqrtm(sigma1 @ sigma2)
  return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


def save_stats(path, mu, sigma, **extra):
  """Writes EDM's reference format: an `.npz` with `mu` and `sigma` (and any `extra` arrays,
  e.g. `features` for precision / recall; EDM's reader ignores them)."""
  path = os.fspath(path)
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma, **extra)


def load_stats(path):
  """Reads `mu`, `sigma` from an `.npz` (EDM's published reference files load too).

  Raises:
    FileNotFoundError: no such file.
    StatsError: one line naming the file if it is not an `.npz` or lacks `mu` / `sigma`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in ('mu', 'sigma') if k not in data.files]
      if missing:
        raise StatsError(f'{path}: no {" / ".join(missing)} in the statistics file '
                         f'(has {", ".join(data.files) or "nothing"})')
      mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, StatsError):
      raise
    raise StatsError(f'{path}: not a readable .npz statistics file ({e})') from None
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise StatsError(f'{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]')
  return mu, sigma


def load_features(path):
  """The `features` a reference file made with `ref --metrics=fid,prdc` holds (for prdc).

  Raises:
    StatsError: one line naming the file if it has none.
  """
  with np.load(path, allow_pickle=False) as data:
    if 'features' not in data.files:
      raise StatsError(f'{path}: no reference features for prdc (make it with '
                       '`python -m sfd_jax.fid ref --metrics=fid,prdc ...`)')
    return np.asarray(data['features'])


# ----------------------------------------------------------------------------------------
# Precision, recall, density, coverage.


def pairwise_distances(x, y, block=2048):
  """Euclidean distances `[len(x), len(y)]` in float64, computed in row blocks."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  yy = np.square(y).sum(1)
  out = np.empty((len(x), len(y)), np.float64)
  for start in range(0, len(x), block):
    xb = x[start:start + block]
    d2 = np.square(xb).sum(1)[:, None] + yy[None, :] - 2 * xb @ y.T
    out[start:start + block] = np.sqrt(np.maximum(d2, 0))
  return out


def knn_radii(features, k):
  """Distance of each point to its k-th nearest other point (the point itself excluded)."""
  d = pairwise_distances(features, features)
  return np.partition(d, k, axis=1)[:, k]  # Index 0 is the point itself (distance 0).


def prdc(real_features, fake_features, k=5):
  """Improved precision / recall (Kynkäänniemi et al.), density / coverage (Naeem et al.).

  As the official repo's `prdc.py`: k-NN balls around real (for precision, density,
  coverage) and fake (for recall) points, strict `<` comparisons.

  Args:
    real_features: `[N, D]` reference features.
    fake_features: `[M, D]` generated features.
    k: nearest neighbour count (the official `compute_scores` uses 5).

  Returns:
    dict of floats: precision, recall, density, coverage.
  """
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'prdc: mismatched feature dimensions {list(real.shape)} / {list(fake.shape)}')
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'prdc: need more than k={k} real and fake images, got {len(real)} / {len(fake)}')
  real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
  d = pairwise_distances(real, fake)
  inside_real = d < real_radii[:, None]
  return dict(precision=float(inside_real.any(axis=0).mean()),
              recall=float((d < fake_radii[None, :]).any(axis=1).mean()),
              density=float(inside_real.sum(axis=0).mean() / k),
              coverage=float((d.min(axis=1) < real_radii).mean()))
