"""SD v1's CLIP text encoder against the official `get_learned_conditioning` outputs of the tiny
SD fixture (tests/fixtures/ldm/sd_tiny.*, README_sd_tiny_text.md: hidden 32, 4 heads, MLP 64, 2 layers, quick GELU).

float32 tolerance: four times the official code's measured float32-vs-float64 gap on `cond`
(8.4e-7, values up to 3.6); under x64 the port must match the float64 run to rounding."""
import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import FIXTURES
from sfd_jax.clip import sd_text_encoder, weights
from sfd_jax.clip.sd_text_encoder import TextEncoderConfig

CONFIG = TextEncoderConfig(width=32, layers=2, heads=4, mlp=64)
TOL = 4 * 8.4e-7


def sd_tiny_text() -> dict:
  """The text-encoder pieces of the tiny SD fixture (README_sd_tiny_text.md): the checkpoint's
  `cond_stage_model.*` tensors, the arrays of sd_tiny.npz and the prompts of sd_tiny.json."""
  from safetensors.numpy import load_file
  ldm = FIXTURES / 'ldm'
  out = {k: v for k, v in load_file(ldm / 'sd_tiny.safetensors').items() if k.startswith('cond_stage_model.')}
  out.update(np.load(ldm / 'sd_tiny.npz'))
  out['prompts'] = np.asarray(json.loads((ldm / 'sd_tiny.json').read_text())['prompts'])
  return out


@pytest.fixture(scope='module')
def fixture():
  return sd_tiny_text()


@pytest.fixture(scope='module')
def state_dict(fixture):
  return {k: v for k, v in fixture.items() if k.startswith('cond_stage_model.')}


@pytest.fixture(scope='module')
def params(state_dict):
  return sd_text_encoder.text_encoder_params(state_dict, CONFIG, source='sd_tiny')


def test_cond_and_uncond_match_the_float64_run(fixture, params):
  cond = sd_text_encoder.encode_prompts(params, CONFIG, list(fixture['prompts']))
  uncond = sd_text_encoder.encode_prompts(params, CONFIG, 5 * [''])
  assert cond.shape == (5, 77, 32) and cond.dtype == np.float32
  np.testing.assert_allclose(cond, fixture['cond_fp64'], rtol=0, atol=TOL)
  np.testing.assert_allclose(uncond, fixture['uncond_fp64'], rtol=0, atol=TOL)


def test_zero_padding_gives_the_official_zero_padded_output(fixture, params):
  """The pad id matters: every position after EOT is read by SD's cross-attention."""
  zero = sd_text_encoder.encode(params, CONFIG, fixture['token_ids_open_clip'])
  np.testing.assert_allclose(zero, fixture['cond_with_zero_padding_fp32'], rtol=0, atol=TOL)
  assert np.abs(zero - fixture['cond_fp64']).max() > 1.0


def test_float64_forward_equals_the_float64_run(fixture, params):
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    cond = sd_text_encoder.encode(params64, CONFIG, fixture['token_ids'], dtype=np.float64)
    assert cond.dtype == np.float64
    np.testing.assert_allclose(cond, fixture['cond_fp64'], rtol=0, atol=1e-12)


def test_sizes(state_dict):
  """The tiny encoder has the README's 1,600,672 parameters; SD v1's (clip-vit-large-patch14's
  text model, 123,060,480) traces to `[N, 77, 768]`."""
  assert sum(math.prod(s) for s in sd_text_encoder.state_dict_shapes(CONFIG).values()) == 1600672
  shapes = sd_text_encoder.state_dict_shapes(sd_text_encoder.SD_V1)
  assert sum(math.prod(s) for s in shapes.values()) == 123060480
  params = traverse_util.unflatten_dict({tuple(k.split('.')): jax.ShapeDtypeStruct(v, np.float32)
                                         for k, v in shapes.items()})
  out = jax.eval_shape(lambda p, t: sd_text_encoder.encode(p, sd_text_encoder.SD_V1, t), params,
                       jax.ShapeDtypeStruct((3, 77), np.int32))
  assert out.shape == (3, 77, 768)


def test_transformers_5_names_without_text_model_give_the_same_tree(state_dict, params):
  renamed = {k.replace('transformer.text_model.', 'transformer.'): v for k, v in state_dict.items()
             if not k.endswith('position_ids')}
  other = sd_text_encoder.text_encoder_params(renamed, CONFIG)
  jax.tree.map(np.testing.assert_array_equal, other, params)


def test_tensors_outside_the_text_encoder_are_ignored(state_dict, params):
  full = dict(state_dict, **{'model.diffusion_model.out.2.bias': np.zeros(4, np.float32)})
  jax.tree.map(np.testing.assert_array_equal, sd_text_encoder.text_encoder_params(full, CONFIG), params)


@pytest.mark.parametrize('layout', ['text_model.', ''])
def test_a_missing_tensor_is_named_never_skipped(state_dict, layout):
  renamed = {k.replace('transformer.text_model.', 'transformer.' + layout): v for k, v in state_dict.items()}
  name = f'cond_stage_model.transformer.{layout}encoder.layers.1.mlp.fc2.bias'
  del renamed[name]
  with pytest.raises(weights.CLIPWeightsError, match=f"sd.ckpt: missing tensor '{name}'"):
    sd_text_encoder.text_encoder_params(renamed, CONFIG, source='sd.ckpt')


def test_wrong_sizes_and_mixed_layouts_are_refused(state_dict):
  with pytest.raises(weights.CLIPWeightsError, match=r"token_embedding.weight' has shape \(49408, 32\)"):
    sd_text_encoder.text_encoder_params(state_dict)  # SD v1's real sizes
  mixed = dict(state_dict)
  mixed['cond_stage_model.transformer.final_layer_norm.bias'] = mixed.pop(
      'cond_stage_model.transformer.text_model.final_layer_norm.bias')
  with pytest.raises(weights.CLIPWeightsError, match='both layouts mixed'):
    sd_text_encoder.text_encoder_params(mixed, CONFIG)
  with pytest.raises(weights.CLIPWeightsError, match='no text-encoder tensors'):
    sd_text_encoder.text_encoder_params({'model.x': np.zeros(1)}, CONFIG)
