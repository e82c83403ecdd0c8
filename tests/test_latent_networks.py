"""The LDM UNet (with SFD's step condition) and the VQ-f4 decoder against the official code
(tests/fixtures/ldm/ldm_bedroom_tiny.*).

Tolerances: 2 × the official code's own float32-vs-float64 gap g for the same output (computed
here from the fixture's `*_fp32` / `*_fp64` pairs; README "Observed fp32 vs fp64"). A faithful
float32 port is within g of the exact value too, so within 2g of the official float32 result.

Measured (this port, CPU, 2026-12-07): eps 2.7e-6 (2g 3.5e-6), eps with step condition 2.6e-6
(2g 3.6e-6), decoded 4.8e-6 (2g 6.6e-6), unquantised 5.1e-6 (2g 7.0e-6), z_q within 2g
(1.2e-7), codes identical.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, nchw, nhwc
from sfd_jax.latent import model as latent_model
from sfd_jax.latent.autoencoder import quantize
from sfd_jax.latent.state_dict import flatten, is_step_condition_name
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"


def gap(fx, key):
  """The official code's max |fp32 − fp64| for `key`."""
  return float(np.abs(fx[key + "_fp32"].astype(np.float64) - fx[key + "_fp64"]).max())


@pytest.fixture(scope="module")
def fx():
  return np.load(LDM / "ldm_bedroom_tiny.npz")


@pytest.fixture(scope="module")
def teacher():
  return load_teacher(LDM / "ldm_bedroom_tiny.ckpt", arch=LDM / "ldm_bedroom_tiny.yaml")


@pytest.fixture(scope="module")
def unet(teacher):
  return jax.jit(latent_model.make_unet(teacher.config))


def test_parameter_counts(teacher):
  """The fixture JSON's counts: UNet 776,899 of which 74,400 in the step-condition layers."""
  unet_params = {k: v for k, v in flatten(teacher.params["params"]).items() if k.startswith("model.diffusion_model.")}
  assert sum(v.size for v in unet_params.values()) == 776_899
  assert sum(v.size for k, v in unet_params.items() if is_step_condition_name(k)) == 74_400


def test_unet_eps(fx, teacher, unet):
  """`apply_model(x, t)` for three pairs of float timesteps, incl. t = 0 and negative t."""
  tol = 2 * gap(fx, "eps")
  x = nhwc(fx["in_x_eps"])
  for i, t in enumerate(fx["in_t_eps"]):
    eps = nchw(unet(teacher.params, x, jnp.asarray(t)))
    np.testing.assert_allclose(eps, fx["eps_fp32"][i], rtol=0, atol=tol, err_msg=f"timesteps {t}")


def test_unet_step_condition(fx, teacher, unet):
  """SFD-v's path (nfe_embed, emb_nfe_layers) for step conditions 4..7; and it changes eps."""
  tol = 2 * gap(fx, "eps_step")
  x, t = nhwc(fx["in_x_eps"]), jnp.asarray(fx["in_t_step"])
  for i, s in enumerate([4, 5, 6, 7]):
    eps = nchw(unet(teacher.params, x, t, None, jnp.full([2], s, jnp.float32)))
    np.testing.assert_allclose(eps, fx["eps_step_fp32"][i], rtol=0, atol=tol, err_msg=f"step condition {s}")
  plain = nchw(unet(teacher.params, x, t))
  assert np.abs(plain - fx["eps_step_fp32"][0]).max() > 100 * tol


def test_decode_quantised(fx, teacher):
  """decode_first_stage(z): the same codes as the official quantiser, then post_quant_conv and decoder."""
  z = nhwc(fx["in_z"])
  codebook = teacher.params["params"]["first_stage_model"]["quantize"]["embedding"]["weight"]
  np.testing.assert_array_equal(codebook, fx["codebook"])
  z_q, codes = jax.jit(quantize)(jnp.asarray(z), codebook)
  np.testing.assert_array_equal(np.asarray(codes), fx["codes_fp32"])
  np.testing.assert_allclose(nchw(z_q), fx["z_q_fp32"], rtol=0, atol=2 * gap(fx, "z_q"))
  images = nchw(jax.jit(teacher.decode)(teacher.params, z))
  assert images.shape == (2, 3, 64, 64)
  np.testing.assert_allclose(images, fx["decoded_fp32"], rtol=0, atol=2 * gap(fx, "decoded"))


def test_decode_unquantised(fx, teacher):
  """decode_first_stage(z, force_not_quantize=True): the decoder alone."""
  decode = jax.jit(teacher.decode, static_argnums=2)
  images = nchw(decode(teacher.params, nhwc(fx["in_z"]), True))
  np.testing.assert_allclose(images, fx["decoded_unquantized_fp32"], rtol=0, atol=2 * gap(fx, "decoded_unquantized"))
