"""The first stages' decode path (CompVis `VQModelInterface` / `AutoencoderKL`) in Flax, NHWC.

`FirstStage` holds `post_quant_conv`, the `decoder` and, for VQ models, `quantize.embedding`;
the names are the checkpoint's `first_stage_model.*` names without that prefix. The encoder is
not built: sampling and distillation only decode.
"""
import flax.linen as nn
import jax.numpy as jnp

from sfd_jax.latent.config import FirstStageConfig
from sfd_jax.latent.layers import Conv, ModuleDict, attention, kw, make_group_norm, silu, upsample_nearest

_EPS = 1e-6  # `Normalize` in the first stage


class ResnetBlock(nn.Module):
  """norm1, SiLU, conv1, norm2, SiLU, conv2, plus a 1×1 `nin_shortcut` when the width changes."""

  in_channels: int
  out_channels: int

  def setup(self):
    cin, cout = self.in_channels, self.out_channels
    self.norm1 = make_group_norm(cin, _EPS)
    self.conv1 = Conv(cin, cout, kernel=3, padding=1)
    self.norm2 = make_group_norm(cout, _EPS)
    self.conv2 = Conv(cout, cout, kernel=3, padding=1)
    self.nin_shortcut = Conv(cin, cout, kernel=1) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(silu(self.norm1(x)))
    h = self.conv2(silu(self.norm2(h)))
    return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
  """Single-head self-attention with 1×1 convs q, k, v, proj_out."""

  channels: int

  def setup(self):
    c = self.channels
    self.norm = make_group_norm(c, _EPS)
    self.q, self.k, self.v, self.proj_out = (Conv(c, c, kernel=1) for _ in range(4))

  def __call__(self, x):
    n, hh, ww, c = x.shape
    h = self.norm(x)
    q, k, v = (layer(h).reshape(n, hh * ww, 1, c) for layer in (self.q, self.k, self.v))
    a = attention(q, k, v, 1.0, c ** -0.5).reshape(n, hh, ww, c)
    return x + self.proj_out(a)


class UpLevel(nn.Module):
  """One decoder resolution: `block.*`, optional `attn.*` (one per block), `upsample.conv`."""

  blocks: tuple      # ((in, out), ...)
  with_attn: bool
  with_upsample: bool

  def setup(self):
    self.block = ModuleDict(specs=tuple((str(i), ResnetBlock, kw(in_channels=a, out_channels=b))
                                        for i, (a, b) in enumerate(self.blocks)))
    if self.with_attn:
      self.attn = ModuleDict(specs=tuple((str(i), AttnBlock, kw(channels=b)) for i, (_, b) in enumerate(self.blocks)))
    if self.with_upsample:
      c = self.blocks[-1][1]
      self.upsample = ModuleDict(specs=(("conv", Conv, kw(in_channels=c, out_channels=c, kernel=3, padding=1)),))

  def __call__(self, h):
    for i in range(len(self.blocks)):
      h = self.block[str(i)](h)
      if self.with_attn:
        h = self.attn[str(i)](h)
    if self.with_upsample:
      h = self.upsample["conv"](upsample_nearest(h))
    return h


class Decoder(nn.Module):
  """conv_in, mid (ResnetBlock, AttnBlock, ResnetBlock), the `up` levels from the lowest
  resolution, GroupNorm, SiLU, conv_out."""

  config: FirstStageConfig

  def setup(self):
    cfg = self.config
    levels = len(cfg.ch_mult)
    block_in = cfg.ch * cfg.ch_mult[-1]
    res = cfg.resolution // 2 ** (levels - 1)
    self.conv_in = Conv(cfg.z_channels, block_in, kernel=3, padding=1)
    self.mid = ModuleDict(specs=(("block_1", ResnetBlock, kw(in_channels=block_in, out_channels=block_in)),
                                 ("attn_1", AttnBlock, kw(channels=block_in)),
                                 ("block_2", ResnetBlock, kw(in_channels=block_in, out_channels=block_in))))
    specs = {}
    for i_level in reversed(range(levels)):
      block_out = cfg.ch * cfg.ch_mult[i_level]
      blocks = []
      for _ in range(cfg.num_res_blocks + 1):
        blocks.append((block_in, block_out))
        block_in = block_out
      specs[i_level] = kw(blocks=tuple(blocks), with_attn=res in cfg.attn_resolutions,
                           with_upsample=i_level != 0)
      if i_level != 0:
        res *= 2
    self.up = ModuleDict(specs=tuple((str(i), UpLevel, specs[i]) for i in range(levels)))
    self.norm_out = make_group_norm(block_in, _EPS)
    self.conv_out = Conv(block_in, cfg.out_ch, kernel=3, padding=1)

  def __call__(self, z):
    h = self.conv_in(z)
    for name in ("block_1", "attn_1", "block_2"):
      h = self.mid[name](h)
    for i_level in reversed(range(len(self.config.ch_mult))):
      h = self.up[str(i_level)](h)
    return self.conv_out(silu(self.norm_out(h)))


class Codebook(nn.Module):
  """`quantize.embedding.weight` [n_embed, embed_dim]."""

  n_embed: int
  embed_dim: int

  @nn.compact
  def __call__(self):
    return self.param("weight", nn.initializers.normal(1.0), (self.n_embed, self.embed_dim), jnp.float32)


def quantize(z, codebook):
  """Nearest codebook entries (argmin of |z|² + |e|² − 2 z·e, the official expression).

  Args:
    z: [..., D] latents; codebook: [K, D].

  Returns:
    (z_q, codes): the straight-through value `z + (e − z)` and the code indices.
  """
  codebook = codebook.astype(z.dtype)
  d = (jnp.sum(z ** 2, axis=-1, keepdims=True) + jnp.sum(codebook ** 2, axis=-1)
       - 2 * jnp.einsum("...d,kd->...k", z, codebook))
  codes = jnp.argmin(d, axis=-1)
  return z + (codebook[codes] - z), codes


class FirstStage(nn.Module):
  """decode(z): (VQ: quantise), post_quant_conv, decoder; z NHWC latents already divided by
  the scale factor. Returns NHWC images in about [-1, 1], unclamped."""

  config: FirstStageConfig

  def setup(self):
    cfg = self.config
    self.post_quant_conv = Conv(cfg.embed_dim, cfg.z_channels, kernel=1)
    self.decoder = Decoder(cfg)
    if cfg.kind == "vq":
      self.quantize = ModuleDict(specs=(("embedding", Codebook, kw(n_embed=cfg.n_embed, embed_dim=cfg.embed_dim)),))

  def __call__(self, z, force_not_quantize: bool = False):
    if self.config.kind == "vq":
      codebook = self.quantize["embedding"]()
      if not force_not_quantize:
        z = quantize(z, codebook)[0]
    return self.decoder(self.post_quant_conv(z))
