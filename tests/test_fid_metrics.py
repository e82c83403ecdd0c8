"""Tests for sfd_jax.fid.metrics: EDM's statistics and Fréchet distance, the official prdc."""
import inspect
import warnings

import numpy as np
import pytest
import scipy.linalg
import sklearn.metrics

from sfd_jax.fid import metrics


def _random_spd(rng, d, rank=None):
  a = rng.standard_normal((d, rank or 2 * d))
  return a @ a.T / a.shape[1]


def _edm_sqrtm(a):
  """scipy's sqrtm as EDM calls it, `disp=False` (the matrix and an error estimate). SciPy 1.18
  removed `disp`; its plain call returns the same matrix (disp only chose what else to return)."""
  if 'disp' not in inspect.signature(scipy.linalg.sqrtm).parameters:
    return scipy.linalg.sqrtm(a)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    return scipy.linalg.sqrtm(a, disp=False)[0]


def _edm_fid(mu, sigma, mu_ref, sigma_ref):
  """EDM fid.py's `calculate_fid_from_inception_stats`."""
  m = np.square(mu - mu_ref).sum()
  s = _edm_sqrtm(np.dot(sigma, sigma_ref))
  return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def _eigen_fid(mu1, s1, mu2, s2):
  """Independent route: tr sqrtm(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), all SPD."""
  w, v = np.linalg.eigh(s1)
  r = (v * np.sqrt(np.maximum(w, 0))) @ v.T
  ev = np.linalg.eigvalsh(r @ s2 @ r)
  return float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.maximum(ev, 0)).sum())


@pytest.mark.parametrize('d, rank', [(16, None), (64, None), (64, 70), (128, 40)])
def test_frechet_distance_is_edms_formula(d, rank):
  # rank < d: singular sigmas (fewer samples than dimensions), the near-singular case of FID.
  rng = np.random.default_rng(d + (rank or 0))
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
  s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d, rank)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _edm_fid(mu1, s1, mu2, s2), rtol=1e-6)
  np.testing.assert_allclose(got, _eigen_fid(mu1, s1, mu2, s2), rtol=1e-6)


def test_frechet_distance_of_identical_stats_is_zero_and_dims_checked():
  rng = np.random.default_rng(0)
  s = _random_spd(rng, 32)
  assert abs(metrics.frechet_distance(np.ones(32), s, np.ones(32), s)) < 1e-9
  with pytest.raises(ValueError, match=r'^statistics have mismatched dimensions: mu \[32\] / \[16\]'):
    metrics.frechet_distance(np.ones(32), s, np.ones(16), s[:16, :16])


def test_stats_match_numpy_and_do_not_depend_on_chunking():
  f = np.random.default_rng(1).standard_normal((300, 24)).astype(np.float32) * 3 + 1
  mu, sigma = metrics.stats(f)
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
  acc = metrics.RunningStats(24)
  for chunk in np.array_split(f, 7):
    acc.update(chunk)
  np.testing.assert_allclose(acc.result()[1], sigma, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match=r'^features: need at least 2 images'):
    metrics.stats(f[:1])


def test_stats_files_round_trip_and_errors(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  metrics.save_stats(tmp_path / 'ref.npz', mu, sigma)
  got = metrics.load_stats(tmp_path / 'ref.npz')
  np.testing.assert_array_equal(got[0], mu)
  np.testing.assert_array_equal(got[1], sigma)
  np.savez(tmp_path / 'bad.npz', mu=mu)
  with pytest.raises(metrics.StatsError, match=r'bad.npz: no sigma in the statistics file \(has mu\)$'):
    metrics.load_stats(tmp_path / 'bad.npz')
  np.savez(tmp_path / 'shape.npz', mu=mu, sigma=np.eye(4))
  with pytest.raises(metrics.StatsError, match=r'shape.npz: mu \[3\] and sigma \[4, 4\]'):
    metrics.load_stats(tmp_path / 'shape.npz')
  (tmp_path / 'text.npz').write_text('hello')
  with pytest.raises(metrics.StatsError, match=r'text.npz: not a readable .npz'):
    metrics.load_stats(tmp_path / 'text.npz')


def _official_prdc(real, fake, k):
  """The official prdc.py's computation (sklearn distances, argpartition k-th value)."""
  def radii(x):
    d = sklearn.metrics.pairwise_distances(x, x)
    idx = np.argpartition(d, k + 1, axis=-1)[..., :k + 1]
    return np.take_along_axis(d, idx, axis=-1).max(axis=-1)
  rr, fr = radii(real), radii(fake)
  d = sklearn.metrics.pairwise_distances(real, fake)
  return dict(precision=(d < rr[:, None]).any(axis=0).mean(), recall=(d < fr[None, :]).any(axis=1).mean(),
              density=(1 / k) * (d < rr[:, None]).sum(axis=0).mean(), coverage=(d.min(axis=1) < rr).mean())


@pytest.mark.parametrize('k', [3, 5])
def test_prdc_matches_the_official_computation(k):
  rng = np.random.default_rng(k)
  real = rng.standard_normal((200, 16))
  fake = rng.standard_normal((150, 16)) * 1.3 + 0.2
  got, want = metrics.prdc(real, fake, k), _official_prdc(real, fake, k)
  assert got.keys() == want.keys()
  for key in got:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  assert 0 < got['precision'] < 1 and 0 < got['recall'] < 1
  # Identical sets: every fake point lies inside its own real ball.
  same = metrics.prdc(real, real, k)
  assert same['precision'] == 1.0 and same['coverage'] == 1.0
