"""CLIP score parity with the official `clip_score.py` path (fixture T1: a tiny member of open_clip's
ViT-g-14 family with random weights; tests/fixtures/clip/README.md).

Tolerances are four times the fixture's measured float32-vs-float64 gaps of the official code
(json → `fp32_vs_fp64_max_abs`): image features 1.25e-6, text features 1.78e-6, scores 1.24e-5,
mean 2.6e-6. Under x64 the port must match the float64 run to rounding (the README's numpy
float64 re-implementation reaches 2.4e-15 on features, 5e-14 on scores)."""
import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import FIXTURES
from sfd_jax import fid
from sfd_jax.clip import open_clip_model, preprocess, score, weights
from sfd_jax.fid import sources
from sfd_jax.io import torch_files

CLIP = FIXTURES / 'clip'
GAPS = json.loads((CLIP / 'clip_T1.json').read_text())['fp32_vs_fp64_max_abs']
TOL = {'image': 4 * GAPS['image_features'], 'text': 4 * GAPS['text_features'], 'scores': 4 * GAPS['scores'],
       'mean': 4 * GAPS['mean_score']}


@pytest.fixture(scope='module')
def t1():
  return np.load(CLIP / 'clip_T1.npz')


@pytest.fixture(scope='module')
def config():
  return open_clip_model.OpenCLIPConfig.from_open_clip_json(
      json.loads((CLIP / 'clip_T1.json').read_text())['open_clip_model_config'])


@pytest.fixture(scope='module')
def model(config):
  return score.load_open_clip(CLIP / 'clip_T1.safetensors', config)


def images(t1):
  return [t1[f'image_{i}'] for i in range(6)]


def test_config_of_the_family(config):
  sizes = (config.vision_heads, config.vision_mlp, config.text_heads, config.text_mlp, config.grid)
  assert sizes == (3, 209, 2, 128, 4)
  real = open_clip_model.OpenCLIPConfig.from_open_clip_json(open_clip_model.VIT_G_14)
  assert (real.vision_heads, real.vision_mlp, real.text_heads, real.text_mlp, real.grid) == (16, 6144, 16, 4096, 16)


def _abstract_tree(shapes):
  flat = {tuple(k.split('.')): jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
  return traverse_util.unflatten_dict(flat)


def test_the_real_vit_g_14_sizes():
  """Its tensors add up to the parameter count open_clip reports (json → vit_g_14_verified), and
  both towers trace at its sizes."""
  verified = json.loads((CLIP / 'clip_T1.json').read_text())['vit_g_14_verified']
  config = open_clip_model.OpenCLIPConfig.from_open_clip_json(open_clip_model.VIT_G_14)
  shapes = open_clip_model.state_dict_shapes(config)
  assert sum(math.prod(s) for s in shapes.values()) == verified['n_params'] == 1366678273
  params = _abstract_tree(shapes)
  image = jax.eval_shape(lambda p, x: open_clip_model.encode_image(p, config, x), params,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32))
  text = jax.eval_shape(lambda p, t: open_clip_model.encode_text(p, config, t), params,
                        jax.ShapeDtypeStruct((2, 77), np.int32))
  assert image.shape == text.shape == (2, 1024)


def test_crops_are_bit_exact(t1):
  """Pillow's bicubic resize (uint8 between passes), round-half-even crop offsets, RGB after the crop."""
  crops = np.stack([preprocess.crop_uint8(image, 32) for image in images(t1)])
  np.testing.assert_array_equal(crops, t1['crop_uint8'])


def test_pixels_are_bit_exact(t1):
  pixels = preprocess.preprocess(images(t1), 32)
  assert pixels.dtype == np.float32
  np.testing.assert_array_equal(pixels.transpose(0, 3, 1, 2), t1['pixel_values_f32'])


def test_crop_offsets_round_half_to_even():
  assert preprocess.resized_size(48, 80, 32) == (32, 53) and preprocess.resized_size(100, 60, 32) == (53, 32)
  ramp = np.tile(np.arange(53, dtype=np.uint8), (32, 1))
  assert np.asarray(preprocess.center_crop(preprocess.to_pil(ramp), 32))[0, 0] == 10  # round(10.5) = 10


def test_features_match_the_float64_run(t1, model):
  params, config = model
  image = score.image_features(params, config, t1['pixel_values_f32'].transpose(0, 2, 3, 1))
  text = score.text_features(params, config, t1['token_ids'])
  np.testing.assert_allclose(image, t1['image_features_f64'], rtol=0, atol=TOL['image'])
  np.testing.assert_allclose(text, t1['text_features_f64'], rtol=0, atol=TOL['text'])


def test_float64_forward_equals_the_float64_run(t1, model):
  params, config = model
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype == np.float32 else a, params)
    image = open_clip_model.encode_image(params64, config, t1['pixel_values_f64'].transpose(0, 2, 3, 1))
    text = open_clip_model.encode_text(params64, config, t1['token_ids'], dtype=np.float64)
    assert image.dtype == text.dtype == np.float64
    np.testing.assert_allclose(image, t1['image_features_f64'], rtol=0, atol=1e-12)
    np.testing.assert_allclose(text, t1['text_features_f64'], rtol=0, atol=1e-12)
    np.testing.assert_allclose(score.pair_scores(image, text), t1['scores_f64'], rtol=0, atol=1e-11)


def test_clip_score_from_raw_images_and_captions(t1, model):
  """The whole official path: PNG arrays and raw captions in, per-pair scores and their mean out."""
  result = score.clip_score(images(t1), list(t1['captions']), *model)
  assert result.scores.shape == (6,)
  np.testing.assert_allclose(result.scores, t1['scores_f64'], rtol=0, atol=TOL['scores'])
  assert abs(result.mean - float(t1['mean_score_f64'])) <= TOL['mean']


def test_the_last_batch_is_padded_not_recompiled(t1, model):
  """Seven pairs in batches of 3 (3, 3, 1): one compiled program per tower, not two."""
  before = score.image_features._cache_size(), score.text_features._cache_size()
  pairs = list(range(6)) + [2]
  result = score.clip_score([t1[f'image_{i}'] for i in pairs], [t1['captions'][i] for i in pairs], *model,
                            batch_size=3)
  assert (score.image_features._cache_size(), score.text_features._cache_size()) == (before[0] + 1, before[1] + 1)
  np.testing.assert_allclose(result.scores, t1['scores_f64'][pairs], rtol=0, atol=TOL['scores'])


def test_bin_and_safetensors_give_the_same_tree(tmp_path, model):
  """open_clip's `.bin` format (torch zip, read by the restricted unpickler) is a second source."""
  state_dict = weights.read_state_dict(CLIP / 'clip_T1.safetensors')
  torch_files.save_state_dict(state_dict, tmp_path / 'open_clip_pytorch_model.bin')
  params, config = score.load_open_clip(tmp_path / 'open_clip_pytorch_model.bin', model[1])
  jax.tree.map(np.testing.assert_array_equal, params, model[0])


@pytest.mark.torch_reference
def test_a_torch_saved_bin_reads_as_the_safetensors(tmp_path, model):
  """`torch.save(model.state_dict())`, as open_clip's `open_clip_pytorch_model.bin` was written
  (an OrderedDict carrying `_metadata`), read by the restricted unpickler."""
  import collections
  import torch
  state_dict = collections.OrderedDict(
      (k, torch.from_numpy(v)) for k, v in weights.read_state_dict(CLIP / 'clip_T1.safetensors').items())
  state_dict._metadata = collections.OrderedDict({'': {'version': 1}, 'visual': {'version': 1}})
  torch.save(state_dict, tmp_path / 'open_clip_pytorch_model.bin')
  params, _ = score.load_open_clip(tmp_path / 'open_clip_pytorch_model.bin', model[1])
  jax.tree.map(np.testing.assert_array_equal, params, model[0])


def test_a_wrong_config_names_the_first_mismatched_tensor():
  with pytest.raises(weights.CLIPWeightsError, match=r"clip_T1.safetensors: 'positional_embedding' has shape"):
    score.load_open_clip(CLIP / 'clip_T1.safetensors')  # the real ViT-g-14's sizes


def test_missing_weights_file_is_one_line(tmp_path):
  with pytest.raises(weights.CLIPWeightsError, match='no such file'):
    score.load_open_clip(tmp_path / 'open_clip_pytorch_model.bin')


def test_folder_score_pairs_the_kth_chosen_image_with_caption_k(tmp_path, t1, model):
  """A folder of the six 32x32 crops (the resize and crop are then identities): all of them score
  as the fixture pairs; a random 4 of them (EDM's subset) pair with captions 0..3, as the official
  code pairs them, expected here from the fixture's float64 features."""
  from PIL import Image
  for i, crop in enumerate(t1['crop_uint8']):
    Image.fromarray(crop).save(tmp_path / f'{i:06d}.png')
  captions = list(t1['captions'])
  result = fid.folder_clip_score(tmp_path, captions, *model)
  np.testing.assert_allclose(result.scores, t1['scores_f64'], rtol=0, atol=TOL['scores'])
  chosen = sources.subset(6, 4, seed=1)
  assert chosen.tolist() != [0, 1, 2, 3]
  expected = score.pair_scores(t1['image_features_f64'][chosen], t1['text_features_f64'][:4])
  subset = fid.folder_clip_score(tmp_path, captions, *model, num=4, seed=1, batch_size=3)
  np.testing.assert_allclose(subset.scores, expected, rtol=0, atol=TOL['scores'])
  assert abs(subset.mean - float(np.mean(expected))) <= TOL['mean']
