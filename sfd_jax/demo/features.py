"""Fréchet distance of digit samples in the feature space of a small digits classifier.

The demo cannot use FID's Inception network (a download, and meaningless on 8x8 digits), so
it follows FID's recipe with a feature extractor that fits the data: a two-hidden-layer
perceptron trained on the same digits (a few seconds, deterministic). Its last hidden
layer separates the ten classes (held-out accuracy is reported alongside), so the distance
between Gaussian fits of those features sees both image quality and class balance.
"""
import dataclasses
import warnings

import numpy as np
import threadpoolctl
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from sfd_jax.demo import data

HIDDEN_SIZES = (128, 64)


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """Weights of the fitted classifier, enough to compute features with numpy.

  Attributes:
    weights: per layer `[in, out]` matrices (hidden layers, then the output layer).
    biases: per layer `[out]` vectors.
    heldout_accuracy: classification accuracy on the digits not used for fitting.
  """
  weights: tuple
  biases: tuple
  heldout_accuracy: float


def fit_feature_net(seed=0, num_heldout=297):
  """Fits the digits classifier whose last hidden layer gives the features.

  Args:
    seed: seed of the train / held-out split and of the classifier's initialisation.
    num_heldout: digits kept out of fitting to measure accuracy.

  Returns:
    A `FeatureNet`.
  """
  images, labels = data.load_digits_images(8)
  x = images.reshape(len(images), -1)
  order = np.random.RandomState(seed).permutation(len(x))
  train, heldout = order[num_heldout:], order[:num_heldout]
  clf = MLPClassifier(hidden_layer_sizes=HIDDEN_SIZES, alpha=1e-3, max_iter=400,
                      random_state=seed, tol=1e-6, n_iter_no_change=20)
  # One BLAS thread: the fit is tiny, and competing with JAX's threads made it 10x slower.
  # A fixed iteration budget keeps it fast; the held-out accuracy shows it is enough.
  with threadpoolctl.threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    clf.fit(x[train], labels[train])
  accuracy = float((clf.predict(x[heldout]) == labels[heldout]).mean())
  return FeatureNet(tuple(w.astype(np.float64) for w in clf.coefs_),
                    tuple(b.astype(np.float64) for b in clf.intercepts_), accuracy)


def _hidden(net, images):
  """Last hidden ReLU layer for NHWC images in [-1, 1] (8x8 or 16x16)."""
  h = data.to_native(images).reshape(len(images), -1).astype(np.float64)
  for w, b in zip(net.weights[:-1], net.biases[:-1]):
    h = np.maximum(h @ w + b, 0.0)
  return h


def features(net, images):
  """Feature vectors `[N, HIDDEN_SIZES[-1]]` of NHWC images in [-1, 1]."""
  return _hidden(net, images)


def predict(net, images):
  """Class predictions `[N]` of NHWC images in [-1, 1]."""
  return (_hidden(net, images) @ net.weights[-1] + net.biases[-1]).argmax(axis=1)


def feature_stats(feats):
  """Mean `[F]` and covariance `[F, F]` (unbiased) of features `[N, F]`."""
  feats = np.asarray(feats, np.float64)
  if feats.shape[0] < 2:
    raise ValueError(f'Fréchet statistics need at least 2 samples, got {feats.shape[0]}')
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(matrix):
  """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
  vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2); the inner
  matrix is symmetric, so an eigendecomposition replaces a general matrix square root.
  """
  root1 = _sqrt_psd(sigma1)
  cross = _sqrt_psd(root1 @ sigma2 @ root1)
  diff = np.asarray(mu1) - np.asarray(mu2)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(cross))
