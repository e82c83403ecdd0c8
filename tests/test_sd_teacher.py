"""The Stable-Diffusion-v1 teacher read from a checkpoint through `load_teacher` against the
official code (tests/fixtures/ldm/sd_tiny.*: CLIP text encoder, UNet with cross-attention context,
CFGPrecond at guidance 1 and 7.5, KL-f8 decode; README section B).

Tolerances are 2 × the official code's own float32-vs-float64 gap g of the same output (computed
from the fixture's `*_fp32` / `*_fp64` pairs; for D per σ, as the gap grows with σ): a faithful
float32 port is within g of the exact value, so within 2g of the official float32 result.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, nchw, nhwc
from sfd_jax.clip import VocabularyError
from sfd_jax.latent import model as latent_model
from sfd_jax.latent.state_dict import flatten
from sfd_jax.latent.teacher import build_teacher, convert_latent_teacher, load_latent_teacher
from sfd_jax.io.ldm_checkpoint import read_checkpoint
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"
CKPT, YAML = LDM / "sd_tiny.safetensors", LDM / "sd_tiny.yaml"
PROMPTS = json.loads((LDM / "sd_tiny.json").read_text())["prompts"]


def gap(fx, key, index=()):
  """The official code's max |fp32 − fp64| for `key` (at `index`)."""
  return float(np.abs(fx[key + "_fp32"][index].astype(np.float64) - fx[key + "_fp64"][index]).max())


@pytest.fixture(scope="module")
def fx():
  return np.load(LDM / "sd_tiny.npz")


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(CKPT, arch=YAML)


@pytest.fixture(scope="module")
def state_dict():
  return read_checkpoint(CKPT)


def test_config_and_sizes(teacher, fx):
  """The yaml's text encoder (README: CLIP 1,600,672 parameters) and σ_max = σ(1), σ_min 0.1."""
  text = teacher.config.text_encoder
  assert (text.width, text.layers, text.heads, text.mlp) == (32, 2, 4, 64)
  clip = teacher.params["params"]["cond_stage_model"]["transformer"]["text_model"]
  assert sum(v.size for v in jax.tree.leaves(clip)) == 1_600_672
  assert teacher.sigma_min == 0.1 and teacher.config.guidance_type == "classifier-free"
  assert abs(teacher.sigma_max - float(fx["sigma_max_fp32"])) <= np.spacing(np.float32(14.6))


def test_tokens_and_text_embeddings(teacher, fx):
  """`encode_text` = `get_learned_conditioning`: exact token ids, then cond and uncond ("")."""
  np.testing.assert_array_equal(teacher.tokenize(PROMPTS), fx["token_ids"])
  cond = teacher.encode_text(teacher.params, PROMPTS)
  uncond = teacher.encode_text(teacher.params, 5 * [""])
  assert cond.shape == (5, 77, 32) and cond.dtype == jnp.float32
  np.testing.assert_allclose(cond, fx["cond_fp32"], rtol=0, atol=2 * gap(fx, "cond"))
  np.testing.assert_allclose(uncond, fx["uncond_fp32"], rtol=0, atol=2 * gap(fx, "uncond"))
  # The pure path the training loop traces gives the same numbers.
  traced = jax.jit(teacher.encode_tokens)(teacher.params, teacher.tokenize(PROMPTS))
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(cond))


def test_missing_vocabulary_is_one_line(teacher, tmp_path):
  with pytest.raises(VocabularyError, match=f"^{tmp_path / 'tokenizer'}: no such file or folder"):
    teacher.encode_text(teacher.params, ["a cat"], tokenizer=tmp_path / "tokenizer")


def test_unet_eps_with_context(teacher, fx):
  """`apply_model(x, t, cond)` at five timesteps, and with the step condition 5."""
  unet = jax.jit(latent_model.make_unet(teacher.config))
  x, t, cond = nhwc(fx["in_x_eps"]), jnp.asarray(fx["in_t_eps"]), jnp.asarray(fx["cond_fp32"])
  np.testing.assert_allclose(nchw(unet(teacher.params, x, t, cond)), fx["eps_fp32"], rtol=0, atol=2 * gap(fx, "eps"))
  eps_step = nchw(unet(teacher.params, x, t, cond, jnp.full([5], 5.0)))
  np.testing.assert_allclose(eps_step, fx["eps_step_fp32"], rtol=0, atol=2 * gap(fx, "eps_step"))
  assert np.abs(eps_step - fx["eps_fp32"]).max() > 100 * gap(fx, "eps_step")  # the step condition matters


@pytest.mark.parametrize("guidance,key", [(1.0, "D_x_g1"), (7.5, "D_x_g7p5")])
def test_denoise_with_guidance(teacher, fx, guidance, key):
  """`net(x, σ, condition=cond, unconditional_condition=uncond)` at five σ (0.1 … σ_max) through the
  public keywords; guidance 1 is the conditional branch only (training), 7.5 one batch of 2N."""
  denoise = jax.jit(teacher.denoise, static_argnames="guidance")
  cond, uncond = jnp.asarray(fx["cond_fp32"]), jnp.asarray(fx["uncond_fp32"])
  for i, sigma in enumerate(fx["in_sigma_D"]):
    d = denoise(teacher.params, nhwc(fx["in_x_D"][i]), jnp.float32(sigma), condition=cond, uncondition=uncond,
                guidance=guidance)
    np.testing.assert_allclose(nchw(d), fx[key + "_fp32"][i], rtol=0, atol=2 * gap(fx, key, i),
                               err_msg=f"sigma {sigma}")


def test_guidance_rate_at_load_and_the_older_keyword(fx):
  """`load_latent_teacher(guidance_rate=7.5)` with `unconditional_condition=` (the older name) and a
  traced guidance give the same D as the keyword interface."""
  guided = load_latent_teacher(CKPT, YAML, guidance_rate=7.5)
  cond, uncond = jnp.asarray(fx["cond_fp32"]), jnp.asarray(fx["uncond_fp32"])
  i = 2
  x, sigma = nhwc(fx["in_x_D"][i]), jnp.float32(fx["in_sigma_D"][i])
  tol = 2 * gap(fx, "D_x_g7p5", i)
  old = jax.jit(guided.denoise)(guided.params, x, sigma, cond, unconditional_condition=uncond)
  traced = jax.jit(lambda p, w: guided.denoise(p, x, sigma, condition=cond, uncondition=uncond, guidance=w))(
      guided.params, 7.5)
  for d in (old, traced):
    np.testing.assert_allclose(nchw(d), fx["D_x_g7p5_fp32"][i], rtol=0, atol=tol)


def test_denoise_step_condition(teacher, fx):
  """Guidance 1, σ = 2, step_condition 5."""
  d = jax.jit(teacher.denoise)(teacher.params, nhwc(fx["in_x_D"][2]), jnp.float32(2.0), condition=fx["cond_fp32"],
                               step_condition=5)
  np.testing.assert_allclose(nchw(d), fx["D_x_step_g1_fp32"], rtol=0, atol=2 * gap(fx, "D_x_step_g1"))


def test_denoiser_variables_are_the_unet_alone(teacher, fx):
  """What a training step holds of the teacher (`denoiser_variables`): the UNet without the first
  stage or the text encoder, and the same D bit for bit."""
  unet = teacher.denoiser_variables()
  assert set(unet) == {"params"} and set(unet["params"]) == {"model"}
  assert {"first_stage_model", "cond_stage_model"} <= set(teacher.params["params"])
  denoise = jax.jit(teacher.denoise)
  x, sigma, cond = nhwc(fx["in_x_D"][2]), jnp.float32(2.0), jnp.asarray(fx["cond_fp32"])
  assert jnp.array_equal(denoise(unet, x, sigma, cond), denoise(teacher.params, x, sigma, cond))


def test_decode(teacher, fx):
  """decode_first_stage(z) = decoder(post_quant_conv(z / 0.18215))."""
  images = nchw(jax.jit(teacher.decode)(teacher.params, nhwc(fx["in_z"])))
  assert images.shape == (2, 3, 64, 64)
  np.testing.assert_allclose(images, fx["decoded_fp32"], rtol=0, atol=2 * gap(fx, "decoded"))


def test_transformers_5_layout_reads_the_same(teacher, state_dict):
  """Names without `text_model.` (transformers 5) give the same text encoder."""
  renamed = {k.replace("transformer.text_model.", "transformer."): v for k, v in state_dict.items()}
  other = build_teacher(teacher.config, renamed, source="t5.safetensors")
  jax.tree.map(np.testing.assert_array_equal, other.params["params"]["cond_stage_model"],
               teacher.params["params"]["cond_stage_model"])


@pytest.mark.parametrize("layout", ["text_model.", ""])
def test_a_missing_text_tensor_is_named(teacher, state_dict, layout):
  renamed = {k.replace("transformer.text_model.", "transformer." + layout): v for k, v in state_dict.items()}
  name = f"cond_stage_model.transformer.{layout}encoder.layers.0.self_attn.v_proj.weight"
  del renamed[name]
  with pytest.raises(ValueError, match=f"^sd.safetensors: missing tensor '{name}'"):
    build_teacher(teacher.config, renamed, source="sd.safetensors")
  no_text = {k: v for k, v in state_dict.items() if not k.startswith("cond_stage_model.")}
  with pytest.raises(ValueError, match="^sd.safetensors: no text-encoder tensors"):
    build_teacher(teacher.config, no_text, source="sd.safetensors")


@pytest.mark.parametrize("preset", ["ldm-lsun-bedroom", "sd-v1"])
def test_a_preset_that_does_not_fit_names_the_first_mismatched_key(preset):
  """The file's first tensor (safetensors sorts names) that does not fit the preset is named."""
  with pytest.raises(ValueError, match=rf"^{CKPT}: 'first_stage_model.decoder.conv_in.bias' has shape \(32,\), "
                                       r"expected \(512,\)$"):
    load_teacher(CKPT, arch=preset)


def test_converted_directory_keeps_the_text_encoder(teacher, tmp_path):
  """`convert --arch=sd-v1`-style conversion stores the text encoder and its sizes."""
  message = convert_latent_teacher(CKPT, tmp_path / "sd", arch=YAML)
  assert "latent teacher" in message
  again = load_teacher(tmp_path / "sd")
  assert again.config == teacher.config
  jax.tree.map(np.testing.assert_array_equal, flatten(again.params["params"]), flatten(teacher.params["params"]))
  np.testing.assert_array_equal(again.encode_text(again.params, PROMPTS[:2]),
                                teacher.encode_text(teacher.params, PROMPTS[:2]))


def test_unconditional_teacher_has_no_text_encoder():
  ldm = load_teacher(LDM / "ldm_bedroom_tiny.ckpt", arch=LDM / "ldm_bedroom_tiny.yaml")
  assert ldm.config.text_encoder is None and "cond_stage_model" not in ldm.params["params"]
  with pytest.raises(ValueError, match="has no text encoder"):
    ldm.encode_text(ldm.params, ["a cat"])
