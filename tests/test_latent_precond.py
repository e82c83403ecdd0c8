"""SFD's `CFGPrecond` (VP, discrete time) against the official code (tests/fixtures/ldm), and
classifier-free guidance against a second path through the UNet.

Tolerances are 2 × the official fp32-vs-fp64 gap g of each output (computed from the fixture's
pairs; for D(x; σ) per σ, since the gap grows with σ). σ(t) is also held to 1 ulp of the official
float32 value.

Measured (this port, CPU, 2026-12-07): σ(t) ≤ 1 ulp (7.6e-6 at σ = 83.8; 2g 2.0e-5), σ⁻¹ and
c_noise bit-equal, D per σ = 0.006 … 83.8: 1.2e-7, 2.4e-7, 1.2e-6, 5.2e-6, 4.6e-5, 2.3e-4 (2g
2.3e-7, 2.8e-7, 1.9e-6, 1.3e-5, 1.9e-4, 3.4e-4), D with step condition 8.1e-6 (2g ≥ 3.2e-5).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, nchw, nhwc
from sfd_jax.latent import config as latent_config
from sfd_jax.latent import model as latent_model
from sfd_jax.latent.state_dict import expected_shapes, nest
from sfd_jax.latent.vp import VPDiscrete
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"


def gap(a32, a64):
  return float(np.abs(np.asarray(a32, np.float64) - a64).max())


def ulps(ours, ref):
  ref = np.asarray(ref, np.float32)
  return np.abs(np.asarray(ours, np.float64) - ref) / np.spacing(ref)


@pytest.fixture(scope="module")
def fx():
  return np.load(LDM / "ldm_bedroom_tiny.npz")


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(LDM / "ldm_bedroom_tiny.ckpt", arch=LDM / "ldm_bedroom_tiny.yaml")


@pytest.fixture(scope="module")
def denoise(teacher):
  return jax.jit(teacher.denoise)


def test_sigma_of_t(fx, teacher):
  """σ(t) on t ∈ [1e-5, 1] (extrapolated below t = 1e-3), traced and on the host."""
  ref, tol = fx["sigma_of_t_fp32"], 2 * gap(fx["sigma_of_t_fp32"], fx["sigma_of_t_fp64"])
  for ours in (jax.jit(teacher.vp.sigma_jnp)(fx["in_t_grid"]), teacher.vp.sigma_np(fx["in_t_grid"])):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    assert ulps(ours, ref).max() <= 1


def test_sigma_inv_and_c_noise(fx, teacher):
  """σ⁻¹(σ) and c_noise = M·σ⁻¹(σ) − 1 for σ from 0.006 (below the table) to 1.01·σ_max."""
  sigma = fx["in_sigma_grid"]
  for t_of_sigma in (np.asarray(jax.jit(teacher.vp.sigma_inv_jnp)(sigma)), teacher.vp.sigma_inv_np(sigma)):
    np.testing.assert_allclose(t_of_sigma, fx["t_of_sigma_fp32"], rtol=0,
                               atol=2 * gap(fx["t_of_sigma_fp32"], fx["t_of_sigma_fp64"]))
  c_noise = np.asarray(jax.jit(lambda s: teacher.vp.M * teacher.vp.sigma_inv_jnp(s) - 1)(sigma))
  np.testing.assert_allclose(c_noise, fx["c_noise_of_sigma_fp32"], rtol=0,
                             atol=2 * gap(fx["c_noise_of_sigma_fp32"], fx["c_noise_of_sigma_fp64"]))
  assert c_noise[0] < 0  # σ = 0.006 lies below the table: extrapolated to c_noise ≈ −0.971


def test_sigma_range(fx, teacher):
  """σ_max = σ(1) (1 ulp), the constructed σ_min = σ(1e-3), and the official σ_min 0.006."""
  assert ulps(teacher.sigma_max, fx["sigma_max_fp32"]) <= 1
  assert teacher.sigma_min == 0.006
  constructed = float(teacher.vp.sigma_np(np.float32(1e-3)))
  assert abs(constructed - float(fx["sigma_min_constructed_fp32"])) <= 2 * gap(
      fx["sigma_min_constructed_fp32"], fx["sigma_min_constructed_fp64"])


def test_denoise(fx, teacher, denoise):
  """D(x; σ) = x − σ·ε(c_in·x, c_noise) for six σ (a 0-d σ, as the solvers call it), and the
  UNet input/noise level/output inside each call."""
  unet = jax.jit(latent_model.make_unet(teacher.config))
  for i, sigma in enumerate(fx["in_sigma_D"]):
    x = nhwc(fx["in_x_D"][i])
    d = nchw(denoise(teacher.params, x, jnp.float32(sigma)))
    tol = 2 * gap(fx["D_x_fp32"][i], fx["D_x_fp64"][i])
    np.testing.assert_allclose(d, fx["D_x_fp32"][i], rtol=0, atol=tol, err_msg=f"sigma {sigma}")
    c_noise = jnp.full([2], teacher.vp.M * teacher.vp.sigma_inv_jnp(jnp.float32(sigma)) - 1)
    np.testing.assert_allclose(c_noise, fx["c_noise_D_fp32"][i], rtol=0, atol=2 * gap(fx["c_noise_D_fp32"],
                                                                                    fx["c_noise_D_fp64"]))
    f_x = nchw(unet(teacher.params, nhwc(fx["unet_in_D_fp32"][i]), c_noise))
    np.testing.assert_allclose(f_x, fx["F_x_fp32"][i], rtol=0, atol=2 * gap(fx["F_x_fp32"], fx["F_x_fp64"]))


def test_denoise_per_sample_sigma(fx, teacher, denoise):
  """A σ per sample gives each sample its own D (the official code needs a scalar σ here)."""
  i, j = 2, 4  # σ = 0.5 and 20
  x = np.stack([fx["in_x_D"][i][0], fx["in_x_D"][j][1]])
  d = nchw(denoise(teacher.params, nhwc(x), jnp.asarray(fx["in_sigma_D"][[i, j]])))
  for row, k in enumerate((i, j)):
    tol = 2 * gap(fx["D_x_fp32"][k], fx["D_x_fp64"][k])
    np.testing.assert_allclose(d[row], fx["D_x_fp32"][k][row], rtol=0, atol=tol)


def test_denoise_step_condition(fx, teacher, denoise):
  """`net(x, 3.0, step_condition=s)` for s = 4..7 (a Python int, as the SFD loss passes it)."""
  x = nhwc(fx["in_x_D_step"])
  for i, s in enumerate([4, 5, 6, 7]):
    d = nchw(denoise(teacher.params, x, jnp.float32(fx["in_sigma_D_step"]), step_condition=s))
    tol = 2 * gap(fx["D_x_step_fp32"][i], fx["D_x_step_fp64"][i])
    np.testing.assert_allclose(d, fx["D_x_step_fp32"][i], rtol=0, atol=tol, err_msg=f"step condition {s}")


# A tiny cross-attention LDM (random weights): classifier-free guidance against a second path.
_TEXT_PARAMS = dict(
    linear_start=0.00085, linear_end=0.012, timesteps=1000, image_size=8, channels=4, conditioning_key="crossattn",
    scale_factor=0.18215,
    unet_config=dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=1,
                     channel_mult=[1], num_heads=4, use_spatial_transformer=True, context_dim=16, legacy=False),
    first_stage_config=dict(target="AutoencoderKL", embed_dim=4, ddconfig=dict(
        double_z=True, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1], num_res_blocks=1,
        attn_resolutions=[])))


def random_variables(config, seed):
  """Random weights of every parameter `config` has (as the fixtures draw them: randn/sqrt(fan_in),
  vectors 0.1·randn, norm weights around 1), without running Flax's initialiser."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in expected_shapes(config).items():
    if len(shape) > 1:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    else:
      value = (1 if "norm" in name and name.endswith("weight") else 0) + 0.1 * rng.standard_normal(shape)
    flat[name] = value.astype(np.float32)
  return {"params": nest(flat), "buffers": {"alphas_cumprod": latent_model.alphas_cumprod(config)}}


def test_classifier_free_guidance():
  """guidance w: D = x − σ(ε_u + w(ε_c − ε_u)) from one batch of 2N (unconditional first); w = 1
  or no unconditional condition: the conditional branch only."""
  config = latent_config.config_from_params(_TEXT_PARAMS)
  assert config.guidance_type == "classifier-free" and config.sigma_min == 0.1
  variables = random_variables(config, seed=0)
  vp = VPDiscrete.from_alphas_cumprod(variables["buffers"]["alphas_cumprod"])
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 8, 8, 4))
  cond, uncond = (jax.random.normal(k, (2, 5, 16)) for k in keys[1:])
  sigma, w = jnp.float32(2.0), 7.5
  guided = latent_model.make_denoise(config, vp, guidance_rate=w)
  plain = latent_model.make_denoise(config, vp)
  unet = latent_model.make_unet(config)

  @jax.jit
  def outputs(variables):
    c_in, c_noise = 1 / jnp.sqrt(sigma ** 2 + 1), jnp.full([2], vp.M * vp.sigma_inv_jnp(sigma) - 1)
    return dict(eps_c=unet(variables, c_in * x, c_noise, cond), eps_u=unet(variables, c_in * x, c_noise, uncond),
                guided=guided(variables, x, sigma, cond, unconditional_condition=uncond),
                guided_no_uncond=guided(variables, x, sigma, cond),
                plain=plain(variables, x, sigma, cond, unconditional_condition=uncond))

  out = outputs(variables)
  eps_c, eps_u = out["eps_c"], out["eps_u"]
  assert float(jnp.abs(eps_c - eps_u).max()) > 0.1  # the condition matters
  want = x - sigma * (eps_u + w * (eps_c - eps_u))
  np.testing.assert_allclose(out["guided"], want, rtol=0, atol=1e-5 * w * (1 + sigma))
  np.testing.assert_allclose(out["guided_no_uncond"], x - sigma * eps_c, rtol=0, atol=1e-5 * (1 + sigma))
  np.testing.assert_allclose(out["plain"], x - sigma * eps_c, rtol=0, atol=1e-5 * (1 + sigma))
