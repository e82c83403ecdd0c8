"""LDM / SD state dicts ↔ latent-teacher variables: a renaming, validated against the architecture.

The checkpoint's names split on '.' are the variables' nested keys. What a LatentDiffusion state
dict holds besides them:

* the DDPM buffers (`betas`, `alphas_cumprod`, ...): `alphas_cumprod` is kept (the teacher's
  VP table), the others are derived quantities and are dropped;
* `first_stage_model.encoder.*` / `quant_conv.*` (the encoder): not used, set aside;
* `cond_stage_model.transformer.(text_model.)*` (SD's CLIP text encoder): read, in either layout,
  into `params['cond_stage_model']['transformer']['text_model']` when the config has a text
  encoder (a missing tensor is an error naming it); set aside otherwise;
* LitEma shadows `model_ema.<name under 'model.' without dots>` plus `model_ema.decay` and
  `model_ema.num_updates`: returned as a second variables tree with the UNet weights replaced
  (the official teacher runs inside `ema_scope()`; the student starts from the raw weights).

SFD's step-condition layers (`nfe_embed`, `emb_nfe_layers`) are absent from released
checkpoints; they are then initialised (torch's default initialisation from `rng`), as the
official `load_state_dict(strict=False)` leaves them at their construction values.
"""
import collections
import functools
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sfd_jax.latent.config import LatentConfig
from sfd_jax.latent.model import init_variables

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
_EMA_META = ("model_ema.decay", "model_ema.num_updates")
_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights")
_SET_ASIDE = ("first_stage_model.encoder.", "first_stage_model.quant_conv.", "first_stage_model.loss.")
TEXT_PREFIX = "cond_stage_model."
TEXT_TREE = ("cond_stage_model", "transformer", "text_model")  # where the text encoder's params live
_STEP_CONDITION_LAYERS = ("nfe_embed", "emb_nfe_layers")


def flatten(tree) -> dict:
  """{'a': {'b': x}} → {'a.b': x}."""
  return traverse_util.flatten_dict(dict(tree), sep=".") if tree else {}


def nest(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep=".")


def is_step_condition_name(name: str) -> bool:
  """Whether a state-dict name belongs to SFD's step-condition layers."""
  return any(part in _STEP_CONDITION_LAYERS for part in name.split("."))


@functools.lru_cache(maxsize=None)
def expected_shapes(config: LatentConfig) -> "collections.OrderedDict[str, tuple]":
  """{state-dict name: shape} of every parameter the architecture has (nothing computed)."""
  shapes = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
  return collections.OrderedDict((name, tuple(leaf.shape)) for name, leaf in flatten(shapes["params"]).items())


def ema_name(name: str) -> str:
  """LitEma's shadow name of a UNet parameter: the name under `model.` without dots."""
  return EMA_PREFIX + name[len("model."):].replace(".", "")


def _refuse(source, message):
  raise ValueError(f"{source}: {message}")


def _check_shapes(given: dict, expected: dict, source: str, what: str = "") -> None:
  for name, value in given.items():
    if name not in expected:
      _refuse(source, f"unexpected key {what}{name!r} with shape {tuple(value.shape)}")
    if tuple(value.shape) != expected[name]:
      _refuse(source, f"{what}{name!r} has shape {tuple(value.shape)}, expected {expected[name]}")


def _split(state_dict, source):
  """(parameters, alphas_cumprod, ema shadows, text-encoder tensors) out of a LatentDiffusion state dict."""
  params, ema, buffers, text = {}, {}, {}, {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name in _DDPM_BUFFERS:
      buffers[name] = value
    elif name.startswith(TEXT_PREFIX):
      text[name] = value
    elif name in _EMA_META or name.startswith(_SET_ASIDE):
      continue
    elif name.startswith(EMA_PREFIX):
      ema[name] = value
    elif name.startswith((UNET_PREFIX, "first_stage_model.")):
      params[name] = value
    else:
      _refuse(source, f"unexpected key {name!r} with shape {tuple(value.shape)} (not part of a LatentDiffusion model)")
  if "alphas_cumprod" not in buffers:
    _refuse(source, "missing key 'alphas_cumprod' (the DDPM noise table)")
  return params, buffers["alphas_cumprod"], ema, text


def text_encoder_params(config: LatentConfig, text: dict, source: str):
  """The text encoder's float32 params (names below `text_model.`), or None without one.

  Raises:
    ValueError: one line naming `source` and the first missing, unexpected or misshapen tensor.
  """
  if config.text_encoder is None:
    return None
  from sfd_jax.clip.sd_text_encoder import text_encoder_params as read  # pylint: disable=g-import-not-at-top
  if not text:
    _refuse(source, f"no text-encoder tensors (a {config.conditioning_key} teacher with a FrozenCLIPEmbedder "
                    f"needs cond_stage_model.transformer.text_model.*)")
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), read(text, config.text_encoder, source=source))


def _fill_missing(config, given, expected, rng, source):
  missing = [name for name in expected if name not in given]
  hard = [name for name in missing if not is_step_condition_name(name)]
  if hard:
    more = f" (and {len(hard) - 1} more)" if len(hard) > 1 else ""
    _refuse(source, f"missing key {hard[0]!r} (expected shape {expected[hard[0]]}){more}")
  if not missing:
    return {}
  fresh = flatten(jax.jit(functools.partial(init_variables, config))(rng)["params"])
  return {name: fresh[name] for name in missing}


def _ema_tree(flat_params, ema, source):
  """The parameters with each UNet weight replaced by its LitEma shadow."""
  by_shadow = {ema_name(n): n for n in flat_params if n.startswith(UNET_PREFIX)}
  if len(by_shadow) != sum(n.startswith(UNET_PREFIX) for n in flat_params):
    _refuse(source, "LitEma shadow names are ambiguous for this architecture")
  for shadow, value in ema.items():
    if shadow not in by_shadow:
      _refuse(source, f"unexpected key {shadow!r} with shape {tuple(value.shape)} (no such UNet parameter)")
  out = dict(flat_params)
  for shadow, name in by_shadow.items():
    if shadow in ema:
      if tuple(ema[shadow].shape) != tuple(flat_params[name].shape):
        _refuse(source, f"{shadow!r} has shape {tuple(ema[shadow].shape)}, expected {tuple(flat_params[name].shape)}")
      out[name] = ema[shadow]
    elif not is_step_condition_name(name):
      _refuse(source, f"missing key {shadow!r} (the EMA shadow of {name!r})")
  return out


def state_dict_to_variables(config: LatentConfig, state_dict, rng=None, *, source: str = "<state dict>"):
  """A LatentDiffusion state dict (torch names and layouts) → (variables, ema_variables).

  Args:
    config: the architecture the state dict should describe.
    state_dict: {name: array}.
    rng: `jax.random.key` for step-condition layers the state dict lacks (default key 0).
    source: the file name for error messages.

  Returns:
    (variables, ema_variables): float32 trees `{'params': ..., 'buffers': {'alphas_cumprod'}}`
    (`params['cond_stage_model']['transformer']['text_model']`: the text encoder, if the config has one);
    `ema_variables` has the LitEma shadows in place of the UNet weights, or is None when the
    state dict holds no shadows.

  Raises:
    ValueError: one line naming `source` and the first unexpected, missing or misshapen key.
  """
  expected = expected_shapes(config)
  params, alphas, ema, text = _split(state_dict, source)
  _check_shapes(params, expected, source)
  if alphas.shape != (config.timesteps,):
    _refuse(source, f"'alphas_cumprod' has shape {alphas.shape}, expected ({config.timesteps},)")
  rng = jax.random.key(0) if rng is None else rng
  flat = {**params, **_fill_missing(config, params, expected, rng, source)}
  flat = {name: flat[name] for name in expected}
  text_params = text_encoder_params(config, text, source)
  buffers = {"alphas_cumprod": jnp.asarray(alphas, jnp.float32)}

  def tree(flat_params):
    params = nest({k: jnp.asarray(v, jnp.float32) for k, v in flat_params.items()})
    if text_params is not None:  # shared by the raw and the EMA trees (it has no LitEma shadow)
      params[TEXT_TREE[0]] = {TEXT_TREE[1]: {TEXT_TREE[2]: text_params}}
    return {"params": params, "buffers": buffers}

  ema_variables = tree(_ema_tree(flat, ema, source)) if ema else None
  return tree(flat), ema_variables


def variables_to_state_dict(variables) -> "collections.OrderedDict[str, np.ndarray]":
  """Variables → the checkpoint's names and layouts (numpy)."""
  flat = {**flatten(variables.get("buffers", {})), **flatten(variables["params"])}
  return collections.OrderedDict((name, np.asarray(value)) for name, value in flat.items())


def ema_state_dict(ema: dict) -> dict:
  """The LitEma entries `model_ema.*` of the UNet weights in `ema` (variables)."""
  flat = flatten(ema["params"])
  return {ema_name(n): np.asarray(v) for n, v in flat.items() if n.startswith(UNET_PREFIX)}
