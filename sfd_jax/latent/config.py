"""Latent-teacher architectures: the CompVis LDM configuration as frozen dataclasses.

`resolve_arch(name_or_path)` gives a `LatentConfig` from a preset name (`ldm-lsun-bedroom`,
`ldm-ffhq`, `sd-v1`; the values of the official yaml files) or from an LDM yaml file (read
with PyYAML; only `model.params` is used).

A `FrozenCLIPEmbedder` cond stage (Stable Diffusion v1) gives the config a text encoder: CLIP
ViT-L/14's text model, or the sizes in `cond_stage_config.params.text_config` (transformers'
`CLIPTextConfig` names; an sfd_jax extension, since the official yaml names a downloaded folder).
"""
import dataclasses
import os
from typing import Any, Optional

# Values of the official configs (CompVis latent-diffusion / stable-diffusion yaml files, as
# shipped in sfd-main/models/ldm/configs). Only what the networks and CFGPrecond need.
_VQ_F4 = dict(target="VQModelInterface", embed_dim=3, n_embed=8192,
              ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
                            ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0))
_LDM4_UNET = dict(image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
                  num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32)
_LDM4 = dict(linear_start=0.0015, linear_end=0.0195, timesteps=1000, image_size=64, channels=3,
             unet_config=_LDM4_UNET, first_stage_config=_VQ_F4, cond_stage_config="__is_unconditional__")
PRESETS = {
    "ldm-lsun-bedroom": _LDM4,
    "ldm-ffhq": _LDM4,
    "sd-v1": dict(
        linear_start=0.00085, linear_end=0.012, timesteps=1000, image_size=64, channels=4,
        conditioning_key="crossattn", scale_factor=0.18215, cond_stage_config="FrozenCLIPEmbedder",
        unet_config=dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                         attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                         use_spatial_transformer=True, transformer_depth=1, context_dim=768, use_checkpoint=True,
                         legacy=False),
        first_stage_config=dict(target="AutoencoderKL", embed_dim=4,
                                ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                              ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                              dropout=0.0))),
}

# UNetModel arguments that do not change the inference network (memory/speed options).
_UNET_IGNORED = ("image_size", "use_checkpoint", "use_fp16", "dropout")
# sigma_min as the official create_model sets it: LDM 0.006, Stable Diffusion 0.1.
SIGMA_MIN_UNCOND, SIGMA_MIN_TEXT = 0.006, 0.1


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The arguments of CompVis' `UNetModel` (openaimodel.py) that shape the network."""

  in_channels: int
  out_channels: int
  model_channels: int
  num_res_blocks: int
  attention_resolutions: tuple
  channel_mult: tuple = (1, 2, 4, 8)
  conv_resample: bool = True
  num_heads: int = -1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  context_dim: Optional[int] = None
  legacy: bool = True

  def __post_init__(self):
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("unet: either num_heads or num_head_channels has to be set")
    if self.use_spatial_transformer != (self.context_dim is not None):
      raise ValueError("unet: use_spatial_transformer needs context_dim and vice versa")

  def attention_heads(self, ch: int, upsample: bool = False) -> tuple:
    """(heads, channels per head) of the attention layer at width `ch`, as UNetModel derives them."""
    if self.num_head_channels != -1:
      heads = ch // self.num_head_channels
      dim_head = self.num_head_channels
    else:
      heads = self.num_heads_upsample if upsample and self.num_heads_upsample != -1 else self.num_heads
      dim_head = ch // heads
    if self.use_spatial_transformer:
      # SpatialTransformer(ch, n_heads, d_head): legacy configs use d_head = ch // n_heads.
      return heads, (ch // heads if self.legacy else dim_head)
    return heads, ch // heads


@dataclasses.dataclass(frozen=True)
class FirstStageConfig:
  """The first-stage autoencoder: 'vq' (VQModelInterface) or 'kl' (AutoencoderKL), and its decoder."""

  kind: str
  embed_dim: int
  z_channels: int
  ch: int
  out_ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_resolutions: tuple
  resolution: int
  n_embed: Optional[int] = None

  def __post_init__(self):
    if self.kind not in ("vq", "kl"):
      raise ValueError(f"first stage: unknown kind {self.kind!r} (expected 'vq' or 'kl')")
    if self.kind == "vq" and not self.n_embed:
      raise ValueError("first stage: a VQ first stage needs n_embed")


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  """A latent diffusion teacher: UNet, first stage, DDPM table and CFGPrecond settings."""

  unet: UNetConfig
  first_stage: FirstStageConfig
  latent_resolution: int
  latent_channels: int
  linear_start: float
  linear_end: float
  timesteps: int
  scale_factor: float = 1.0
  conditioning_key: Optional[str] = None   # None (unconditional) or 'crossattn'
  sigma_min: float = SIGMA_MIN_UNCOND
  name: str = ""
  text_encoder: Any = None                 # `clip.TextEncoderConfig` of a FrozenCLIPEmbedder (SD), else None

  @property
  def guidance_type(self) -> str:
    return "classifier-free" if self.conditioning_key else "uncond"


def _unet_config(params: dict) -> UNetConfig:
  params = {k: v for k, v in params.items() if k not in _UNET_IGNORED}
  for key, why in (("dims", "only 2-D UNets"), ("num_classes", "no class-conditional LDMs"),
                   ("n_embed", "no codebook-predicting UNets")):
    if key in params and not (key == "dims" and params[key] == 2) and params[key] is not None:
      raise ValueError(f"unet_config.params.{key}={params[key]!r} is not supported ({why})")
  params.pop("dims", None)
  known = {f.name for f in dataclasses.fields(UNetConfig)}
  unknown = sorted(set(params) - known)
  if unknown:
    raise ValueError(f"unet_config.params: unknown key {unknown[0]!r}")
  for key in ("attention_resolutions", "channel_mult"):
    if key in params:
      params[key] = tuple(params[key])
  return UNetConfig(**params)


def _first_stage_config(cfg: dict) -> FirstStageConfig:
  target = str(cfg.get("target", ""))
  params = cfg.get("params", cfg)
  dd = params["ddconfig"]
  if target.endswith(("VQModelInterface", "VQModel")):
    kind = "vq"
  elif target.endswith("AutoencoderKL"):
    kind = "kl"
  else:
    raise ValueError(f"first_stage_config.target {target!r} is not supported (VQModelInterface or AutoencoderKL)")
  return FirstStageConfig(kind=kind, embed_dim=int(params["embed_dim"]), z_channels=int(dd["z_channels"]),
                          ch=int(dd["ch"]), out_ch=int(dd["out_ch"]), ch_mult=tuple(dd["ch_mult"]),
                          num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=tuple(dd["attn_resolutions"]),
                          resolution=int(dd["resolution"]), n_embed=params.get("n_embed"))


# transformers' CLIPTextConfig names -> TextEncoderConfig fields.
_TEXT_CONFIG_NAMES = dict(vocab_size="vocab_size", hidden_size="width", num_hidden_layers="layers",
                          num_attention_heads="heads", intermediate_size="mlp", max_position_embeddings="positions",
                          hidden_act="activation", layer_norm_eps="eps")
_TEXT_CONFIG_IGNORED = ("bos_token_id", "eos_token_id", "pad_token_id", "projection_dim")


def _text_encoder_config(cond_stage, context_dim):
  """The text encoder of a `FrozenCLIPEmbedder` cond stage (None for any other cond stage)."""
  target = cond_stage if isinstance(cond_stage, str) else str((cond_stage or {}).get("target", ""))
  if not target.endswith("FrozenCLIPEmbedder"):
    return None
  from sfd_jax.clip.sd_text_encoder import SD_V1  # pylint: disable=g-import-not-at-top
  given = dict(((cond_stage if isinstance(cond_stage, dict) else {}).get("params") or {}).get("text_config") or {})
  unknown = sorted(set(given) - set(_TEXT_CONFIG_NAMES) - set(_TEXT_CONFIG_IGNORED))
  if unknown:
    raise ValueError(f"cond_stage_config.params.text_config: unknown key {unknown[0]!r}")
  config = dataclasses.replace(SD_V1, **{_TEXT_CONFIG_NAMES[k]: v for k, v in given.items() if k in _TEXT_CONFIG_NAMES})
  if context_dim != config.width:
    raise ValueError(f"unet_config.params.context_dim={context_dim} but the text encoder's width is {config.width}")
  return config


def config_from_params(params: dict, name: str = "") -> LatentConfig:
  """A `LatentConfig` from LatentDiffusion's `model.params` (a yaml's values, as a dict)."""
  unet_params = params["unet_config"].get("params", params["unet_config"])
  key = params.get("conditioning_key")
  if params.get("parameterization", "eps") != "eps":
    raise ValueError(f"parameterization {params['parameterization']!r} is not supported (eps only)")
  if key not in (None, "crossattn"):
    raise ValueError(f"conditioning_key {key!r} is not supported (None or 'crossattn')")
  unet = _unet_config(dict(unet_params))
  return LatentConfig(
      unet=unet, first_stage=_first_stage_config(params["first_stage_config"]),
      latent_resolution=int(params["image_size"]), latent_channels=int(params["channels"]),
      linear_start=float(params["linear_start"]), linear_end=float(params["linear_end"]),
      timesteps=int(params.get("timesteps", 1000)), scale_factor=float(params.get("scale_factor", 1.0)),
      conditioning_key=key, sigma_min=SIGMA_MIN_TEXT if key else SIGMA_MIN_UNCOND, name=name,
      text_encoder=_text_encoder_config(params.get("cond_stage_config"), unet.context_dim) if key else None)


def load_yaml_config(path) -> LatentConfig:
  """A `LatentConfig` from an LDM yaml file (its `model.params`)."""
  import yaml  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    data = yaml.safe_load(f)
  try:
    return config_from_params(data["model"]["params"], name=os.path.basename(path))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not an LDM config (missing {e})") from None
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def resolve_arch(arch) -> LatentConfig:
  """A preset name, a yaml path or a `LatentConfig` → `LatentConfig`.

  Raises:
    ValueError: one line naming the unknown preset (with the valid names) or the bad yaml.
  """
  if isinstance(arch, LatentConfig):
    return arch
  arch = os.fspath(arch)
  if arch in PRESETS:
    return config_from_params(PRESETS[arch], name=arch)
  if arch.endswith((".yaml", ".yml")) or os.path.sep in arch:
    if not os.path.isfile(arch):
      raise FileNotFoundError(f"{arch}: no such file")
    return load_yaml_config(arch)
  raise ValueError(f"arch: unknown preset {arch!r}; valid: {sorted(PRESETS)} or an LDM yaml path")


def config_to_dict(config: LatentConfig) -> dict:
  """A JSON-ready dict of `config` (inverse: `config_from_dict`)."""
  return dataclasses.asdict(config)


def config_from_dict(data: dict) -> LatentConfig:
  """The `LatentConfig` that `config_to_dict` wrote.

  Raises:
    ValueError: unknown or missing fields (one line).
  """
  def build(cls, fields):
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**tuples)

  try:
    data = dict(data)
    unet, first_stage = build(UNetConfig, data.pop("unet")), build(FirstStageConfig, data.pop("first_stage"))
    text = data.pop("text_encoder", None)
    if text is not None:
      from sfd_jax.clip.sd_text_encoder import TextEncoderConfig  # pylint: disable=g-import-not-at-top
      text = TextEncoderConfig(**text)
    return LatentConfig(unet=unet, first_stage=first_stage, text_encoder=text, **data)
  except (KeyError, TypeError) as e:
    raise ValueError(f"not a latent teacher config ({e})") from None
