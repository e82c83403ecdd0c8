"""The pure denoiser of a `NetworkConfig`: module construction, initialisation and `make_denoise`."""
from typing import Callable

import jax
import jax.numpy as jnp

from sfd_jax.networks.config import NetworkConfig
from sfd_jax.networks.precond import build_precond


def build_module(config: NetworkConfig, dtype=None, remat: bool = False):
  """The (unbound) Flax preconditioner module for `config`; `dtype` ('bfloat16' or None) is the
  U-Net's compute dtype for convolutions and attention (parameters stay float32); `remat`
  recomputes each U-Net block in the backward pass (same variables, same numbers)."""
  pk = config.precond_kwargs_dict
  model_kwargs = dict(config.model_kwargs_dict, **({"dtype": dtype} if dtype is not None else {}),
                      **({"remat": True} if remat else {}))
  return build_precond(config.precond, config.img_resolution, config.img_channels, config.label_dim,
                       pk, model_kwargs, config.use_step_condition, model_type=config.model_type)


def _init_inputs(config: NetworkConfig):
  """Dummy inputs that reach every layer (labels, augment labels, step condition)."""
  x = jnp.zeros([1, config.img_resolution, config.img_resolution, config.img_channels], jnp.float32)
  class_labels = jnp.zeros([1, config.label_dim], jnp.float32) if config.label_dim else None
  augment = jnp.zeros([1, config.augment_dim], jnp.float32) if config.augment_dim else None
  step = 1.0 if config.use_step_condition else None
  return x, jnp.ones([1], jnp.float32), class_labels, augment, step


def initialiser(config: NetworkConfig) -> Callable:
  """rng → {'params', 'buffers'}: EDM's init modes, not jitted (`init_variables` jits it)."""
  module = build_module(config)
  x, sigma, class_labels, augment, step = _init_inputs(config)

  def init(rng):
    # Parameters are drawn from an RngBitGenerator key derived from `rng`: one threefry
    # stream per tensor makes XLA compile the initialiser ~4x slower.
    rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
    variables = module.init({"params": rbg}, x, sigma, class_labels, augment, step)
    return {"params": _as_dict(variables["params"]), "buffers": _as_dict(variables.get("buffers", {}))}

  return init


def init_variables(config: NetworkConfig, rng) -> dict:
  """Freshly initialised variables with EDM's init modes.

  Args:
    config: the network.
    rng: a `jax.random.key`.

  Returns:
    {'params': ..., 'buffers': ...}, nested by EDM state-dict names, float32.
  """
  return jax.jit(initialiser(config))(rng)


def _as_dict(tree):
  if hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _check_x(config: NetworkConfig, x):
  want = (config.img_resolution, config.img_resolution, config.img_channels)
  if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != want:
    raise ValueError(f"denoise: x has shape {tuple(jnp.shape(x))}, expected [N, {want[0]}, {want[1]}, "
                     f"{want[2]}] (NHWC)")


def dropout_key(key):
  """The key the network's dropout masks are drawn from: an `rbg` key (XLA's RngBitGenerator)
  derived from `key`, a threefry key or raw key data.

  Why not `key` itself: threefry bits for every dropped activation are inlined hash rounds that
  XLA has to compile and run for each dropout layer, forward and backward; with RngBitGenerator
  the student's training program compiles about twice as fast (`experiments/RESULTS.md`). The
  masks are a deterministic function of `key` and do not depend on how the batch is sharded
  (tests/test_sfd_step.py checks 1 against 8 devices with dropout active). They cannot match
  torch's dropout masks in any case.
  """
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(key)) == "rbg":
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def _make_apply(config: NetworkConfig, return_model_output: bool, dtype=None, remat: bool = False) -> Callable:
  module = build_module(config, dtype, remat)
  needs_rng = config.dropout > 0 or float(config.model_kwargs_dict.get("label_dropout", 0)) > 0

  def apply(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None, *,
            train=False, dropout_rng=None):
    _check_x(config, x)
    if step_condition is not None and not config.use_step_condition:
      raise ValueError("denoise: step_condition given but the network has no step-condition layers "
                       "(config.use_step_condition is False)")
    if train and needs_rng and dropout_rng is None:
      raise ValueError("denoise: train=True with dropout needs dropout_rng")
    rngs = {"dropout": dropout_key(dropout_rng)} if dropout_rng is not None else {}
    out = module.apply({"params": variables["params"], "buffers": variables.get("buffers", {})},
                       x, sigma, class_labels, augment_labels, step_condition, train=train,
                       return_model_output=return_model_output, rngs=rngs)
    return out[1] if return_model_output else out

  return apply


def make_denoise(config: NetworkConfig, dtype=None, remat: bool = False) -> Callable:
  """The denoiser D(x; σ) of `config` as a pure, jit-able function.

  Args:
    config: the network.
    dtype: None (float32, EDM parity) or 'bfloat16': the U-Net's convolutions and attention
      products run with bfloat16 operands, their float32 results are rounded to bfloat16 and
      continue in float32; the embedding MLP (as in EDM's fp16 mode), preconditioning, GroupNorm
      and the output stay float32; parameters are float32. A gradient keeps only each block's
      input and its products' bfloat16 results and recomputes the float32 rest
      (`layers.low_precision_blocks`).
    remat: recompute each U-Net block in the backward pass (`layers.sequential_remat`): a gradient
      then keeps only the blocks' inputs, not their inner activations.

  Returns:
    `denoise(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None,
    *, train=False, dropout_rng=None) -> D` with x and D NHWC [N, H, W, C], sigma a scalar or
    [N]. Runs in float32 (float64 if x is float64 under x64); convolutions and matmuls
    use JAX's default precision, so on GPU/TPU wrap calls in
    `jax.default_matmul_precision('highest')` for EDM's float32 numbers.
  """
  return _make_apply(config, return_model_output=False, dtype=dtype, remat=remat)


def make_raw_model(config: NetworkConfig) -> Callable:
  """Like `make_denoise`, but returns the inner U-Net's raw output F_x (NHWC; iDDPM has
  2·img_channels channels)."""
  return _make_apply(config, return_model_output=True)
