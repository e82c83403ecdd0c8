"""Tests of the demo teacher's pieces: digits data, EDM loss and EMA, pretraining, Fréchet distance."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from ml_collections import ConfigDict

from configs import demo_teacher
from sfd_jax.demo import data
from sfd_jax.demo import features as fd
from sfd_jax.demo import pretraining as pretrain


def test_digits_range_shape_and_upsampling():
  images8, labels = data.load_digits_images(8)
  images16, labels16 = data.load_digits_images(16)
  assert images8.shape == (1797, 8, 8, 1) and images16.shape == (1797, 16, 16, 1)
  assert images8.dtype == np.float32
  # Grey 0 -> -1 and grey 16 -> +1 both occur in the data set.
  assert images8.min() == -1.0 and images8.max() == 1.0
  np.testing.assert_array_equal(labels, labels16)
  assert set(labels.tolist()) == set(range(10))
  # Upsampling repeats pixels, so pooling back is exact.
  np.testing.assert_array_equal(data.to_native(images16), images8)
  np.testing.assert_array_equal(images16[:, ::2, ::2], images8)


def test_digits_bad_resolution_names_the_key():
  with pytest.raises(ValueError, match='data.resolution'):
    data.load_digits_images(32)


def test_edm_loss_matches_closed_form_expectation():
  # With D = 0 and clean images of ones (one pixel), the loss is E[w(sigma)] where
  # w = 1/sigma_d^2 + 1/sigma^2 and ln sigma ~ N(P_mean, P_std^2): E[1/sigma^2] = exp(-2 P_mean + 2 P_std^2).
  p_mean, p_std, sigma_data = -1.2, 1.2, 0.5
  zero_denoise = lambda variables, x, sigma, **kw: jnp.zeros_like(x)
  images = jnp.ones((200_000, 1, 1, 1))
  loss = pretrain.edm_loss(zero_denoise, {}, {}, images, jax.random.key(3), p_mean=p_mean, p_std=p_std,
                           sigma_data=sigma_data)
  expected = 1 / sigma_data ** 2 + np.exp(-2 * p_mean + 2 * p_std ** 2)
  # Monte-Carlo error of the mean: std(w)/sqrt(N) is about 1% here (heavy log-normal tail).
  assert abs(float(loss) / expected - 1) < 0.04


def test_edm_loss_is_zero_for_a_perfect_denoiser_and_passes_train_mode():
  seen = {}

  def oracle(variables, x, sigma, *, train, dropout_rng):
    seen.update(train=train, sigma=sigma)
    return images

  images = jnp.asarray(data.load_digits_images(8)[0][:16])
  loss = pretrain.edm_loss(oracle, {}, {}, images, jax.random.key(0), p_mean=-1.2, p_std=1.2, sigma_data=0.5)
  assert float(loss) == 0.0
  assert seen['train'] is True and seen['sigma'].shape == (16,)


def test_ema_beta_follows_edm_halflife_and_rampup():
  settings = pretrain.PretrainSettings.from_config(demo_teacher.get_config())
  batch = settings.batch_size
  # Early: half-life = 5% of images seen -> beta = 0.5 ** (batch / (0.05 * nimg)).
  np.testing.assert_allclose(pretrain.ema_beta(9, settings), 0.5 ** (batch / (0.05 * 10 * batch)), rtol=1e-6)
  # Late: half-life capped at ema_halflife_kimg.
  late = 10 * int(settings.ema_halflife_kimg * 1000 / batch / settings.ema_rampup_ratio)
  np.testing.assert_allclose(pretrain.ema_beta(late, settings),
                             0.5 ** (batch / (settings.ema_halflife_kimg * 1000)), rtol=1e-6)


def tiny_config(workdir_steps=6):
  config = demo_teacher.get_config()
  config.network.model_channels = 8
  config.network.num_blocks = 1
  config.network.attn_resolutions = []
  config.network.channel_mult_emb = 1
  config.train.batch_size = 8
  config.train.num_steps = workdir_steps
  config.train.log_every = 3
  config.train.save_every = 4
  return config


def test_pretrain_writes_a_loadable_teacher_with_ema_weights(tmp_path):
  from sfd_jax import networks
  from sfd_jax import teacher as teacher_lib
  config = tiny_config()
  path = pretrain.pretrain(config, str(tmp_path))
  log = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log] == [3, 6]
  assert all(np.isfinite(r['loss']) for r in log)
  assert (tmp_path / 'teacher-0000004').is_dir()
  loaded = teacher_lib.load_teacher(path)
  assert loaded.config == pretrain.network_config(config)
  # Second path: redo the same run by hand from the same seed and compare EMA weights.
  settings = pretrain.PretrainSettings.from_config(config)
  net_config = pretrain.network_config(config)
  optimizer = pretrain.make_optimizer(settings)
  key = jax.random.key(settings.seed)
  state = pretrain.init_state(net_config, optimizer, jax.random.fold_in(key, 0))
  init_params = jax.tree.map(np.array, state['params'])
  step_fn = pretrain.make_train_step(networks.make_denoise(net_config), optimizer,
                                     data.load_digits_images(8)[0], settings)
  for step in range(settings.num_steps):
    state = step_fn(state, jax.random.fold_in(jax.random.fold_in(key, 1), step))[0]
  chex.assert_trees_all_close(loaded.params['params'], jax.device_get(state['ema']), rtol=1e-6, atol=1e-7)
  # The EMA moved away from the initial weights but is not the raw weights.
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state['ema'], init_params))
  assert max(diff) > 0


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_on_identical_sets():
  rng = np.random.RandomState(0)
  a, b = rng.standard_normal((300, 6)), rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
  (m1, s1), (m2, s2) = fd.feature_stats(a), fd.feature_stats(b)
  diff = m1 - m2
  expected = diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  np.testing.assert_allclose(fd.frechet_distance(m1, s1, m2, s2), expected, rtol=1e-8)
  assert abs(fd.frechet_distance(m1, s1, m1, s1)) < 1e-9


def test_feature_net_classifies_digits_and_separates_noise():
  net = fd.fit_feature_net()
  assert net.heldout_accuracy > 0.95
  images, labels = data.load_digits_images(16)
  assert (fd.predict(net, images) == labels).mean() > 0.98
  real = fd.feature_stats(fd.features(net, images[:900]))
  other_real = fd.feature_stats(fd.features(net, images[900:]))
  noise = np.random.RandomState(1).uniform(-1, 1, images.shape)
  fake = fd.feature_stats(fd.features(net, noise))
  assert fd.frechet_distance(*real, *other_real) * 20 < fd.frechet_distance(*real, *fake)


def test_pretrain_cli_without_flags_exits_2_with_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, '-m', 'sfd_jax.demo.pretrain'], capture_output=True, text=True,
                        cwd=str(tmp_path), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('python -m sfd_jax.demo.pretrain: error: --config and --workdir are required')
  assert 'Traceback' not in proc.stderr
