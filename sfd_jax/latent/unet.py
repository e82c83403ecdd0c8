"""CompVis' LDM `UNetModel` (openaimodel.py) in Flax, with SFD's step-condition layers.

Module and parameter names are the checkpoint's (`input_blocks.1.0.in_layers.2.weight`, ...),
activations NHWC. SFD adds `nfe_embed` (the step condition's embedding MLP) and one
`emb_nfe_layers` per ResBlock, added to the hidden state right after the time embedding.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.latent.config import UNetConfig
from sfd_jax.latent.layers import (Conv, LayerNorm, Linear, ModuleDict, attention, avg_pool2, group_norm, kw,
                                   make_group_norm, silu, student_block,
                                   timestep_embedding, upsample_nearest)

_EPS_UNET = 1e-5         # GroupNorm32 in the UNet
_EPS_TRANSFORMER = 1e-6  # SpatialTransformer.norm (`Normalize`)


def _mlp_specs(cin: int, cout: int) -> tuple:
  """`Sequential(Linear, SiLU, Linear)`: its linear layers at indices 0 and 2."""
  return (("0", Linear, kw(in_features=cin, out_features=cout)), ("2", Linear, kw(in_features=cout, out_features=cout)))


def _mlp(layers: ModuleDict, x):
  return layers["2"](silu(layers["0"](x)))


class ResBlock(nn.Module):
  """ResBlock (no up/down by default), optional scale-shift norm, SFD's `emb_nfe_layers`."""

  channels: int
  emb_channels: int
  out_channels: int
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    cin, cout, dt = self.channels, self.out_channels, self.dtype
    emb_out = 2 * cout if self.use_scale_shift_norm else cout
    self.in_layers = ModuleDict(specs=(("0", *group_norm(cin, _EPS_UNET)),
                                       ("2", Conv, kw(in_channels=cin, out_channels=cout, kernel=3, padding=1,
                                                      dtype=dt))))
    # The embedding path stays float32 (as the EDM wing's bf16 mode).
    self.emb_layers = ModuleDict(specs=(("1", Linear, kw(in_features=self.emb_channels, out_features=emb_out)),))
    self.out_layers = ModuleDict(specs=(("0", *group_norm(cout, _EPS_UNET)),
                                        ("3", Conv, kw(in_channels=cout, out_channels=cout, kernel=3, padding=1,
                                                       dtype=dt))))
    self.emb_nfe_layers = ModuleDict(specs=(("1", Linear, kw(in_features=self.emb_channels, out_features=emb_out)),))
    self.skip_connection = Conv(cin, cout, kernel=1, dtype=dt) if cout != cin else None

  def _resample(self, x):
    if self.up:
      return upsample_nearest(x)
    return avg_pool2(x) if self.down else x

  def __call__(self, x, emb, emb_nfe=None):
    h = silu(self.in_layers["0"](x))
    h, x = self._resample(h), self._resample(x)
    h = self.in_layers["2"](h)
    emb_out = self.emb_layers["1"](silu(emb))[:, None, None, :]
    emb_nfe_out = None
    if emb_nfe is not None:
      emb_nfe_out = self.emb_nfe_layers["1"](silu(emb_nfe))[:, None, None, :]
    if self.use_scale_shift_norm:
      if emb_nfe_out is not None and not self.is_initializing():
        raise ValueError("ResBlock: a step condition with use_scale_shift_norm=True is not defined "
                         "(the official code refers to a missing `out_layers_nfe`)")
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = self.out_layers["0"](h) * (1 + scale) + shift
    else:
      h = h + emb_out
      if emb_nfe_out is not None:
        h = h + emb_nfe_out
      h = self.out_layers["0"](h)
    h = self.out_layers["3"](silu(h))
    skip = self.skip_connection(x) if self.skip_connection is not None else x
    return skip + h


class AttentionBlock(nn.Module):
  """The legacy self-attention block: GroupNorm, Conv1d qkv, `QKVAttentionLegacy` (channels
  ordered head, {q, k, v}, channel) or `QKVAttention` (q, k, v, head, channel), Conv1d proj_out."""

  channels: int
  num_heads: int
  new_order: bool = False
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    c = self.channels
    self.norm = make_group_norm(c, _EPS_UNET)
    self.qkv = Conv(c, 3 * c, conv1d=True, dtype=self.dtype)
    self.proj_out = Conv(c, c, conv1d=True, dtype=self.dtype)

  def __call__(self, x):
    n, hh, ww, c = x.shape
    heads, ch = self.num_heads, c // self.num_heads
    qkv = self.qkv(self.norm(x)).reshape(n, hh * ww, *((3, heads, ch) if self.new_order else (heads, 3, ch)))
    axis = 2 if self.new_order else 3
    q, k, v = (jnp.take(qkv, i, axis=axis) for i in range(3))
    scale = 1 / (ch ** 0.5) ** 0.5  # both q and k scaled by ch^(-1/4)
    a = attention(q, k, v, scale, scale, self.dtype).reshape(n, hh, ww, c)
    return x + self.proj_out(a)


class CrossAttention(nn.Module):
  """Multi-head attention with bias-free q/k/v projections; self-attention without a context."""

  query_dim: int
  context_dim: Optional[int]
  heads: int
  dim_head: int
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    inner, ctx, dt = self.heads * self.dim_head, self.context_dim or self.query_dim, self.dtype
    self.to_q = Linear(self.query_dim, inner, bias=False, dtype=dt)
    self.to_k = Linear(ctx, inner, bias=False, dtype=dt)
    self.to_v = Linear(ctx, inner, bias=False, dtype=dt)
    self.to_out = ModuleDict(specs=(("0", Linear, kw(in_features=inner, out_features=self.query_dim, dtype=dt)),))

  def __call__(self, x, context=None):
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = attention(q, k, v, self.dim_head ** -0.5, 1.0, self.dtype)
    return self.to_out["0"](out.reshape(*x.shape[:2], self.heads * self.dim_head))


class GEGLU(nn.Module):
  """Linear to 2·inner; the first half times the exact GELU of the second."""

  dim_in: int
  dim_out: int
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    self.proj = Linear(self.dim_in, 2 * self.dim_out, dtype=self.dtype)

  def __call__(self, x):
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

  dim: int
  heads: int
  dim_head: int
  context_dim: Optional[int]
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    d, dt = self.dim, self.dtype
    self.attn1 = CrossAttention(d, None, self.heads, self.dim_head, dtype=dt)
    self.attn2 = CrossAttention(d, self.context_dim, self.heads, self.dim_head, dtype=dt)
    self.ff = ModuleDict(specs=(("net", ModuleDict, kw(specs=(
        ("0", GEGLU, kw(dim_in=d, dim_out=4 * d, dtype=dt)),
        ("2", Linear, kw(in_features=4 * d, out_features=d, dtype=dt))))),))
    self.norm1, self.norm2, self.norm3 = LayerNorm(d), LayerNorm(d), LayerNorm(d)

  def __call__(self, x, context=None):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    net = self.ff["net"]
    return net["2"](net["0"](self.norm3(x))) + x


class SpatialTransformer(nn.Module):
  """GroupNorm, 1×1 proj_in, transformer blocks over the positions, 1×1 proj_out, + input."""

  channels: int
  heads: int
  dim_head: int
  depth: int
  context_dim: Optional[int]
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    c, inner, dt = self.channels, self.heads * self.dim_head, self.dtype
    self.norm = make_group_norm(c, _EPS_TRANSFORMER)
    self.proj_in = Conv(c, inner, kernel=1, dtype=dt)
    self.transformer_blocks = ModuleDict(specs=tuple(
        (str(i), BasicTransformerBlock, kw(dim=inner, heads=self.heads, dim_head=self.dim_head,
                                           context_dim=self.context_dim, dtype=dt)) for i in range(self.depth)))
    self.proj_out = Conv(inner, c, kernel=1, dtype=dt)

  def __call__(self, x, context=None):
    n, hh, ww, _ = x.shape
    h = self.proj_in(self.norm(x))
    h = h.reshape(n, hh * ww, h.shape[-1])
    for name in self.transformer_blocks.names():
      h = self.transformer_blocks[name](h, context)
    return self.proj_out(h.reshape(n, hh, ww, -1)) + x


class Downsample(nn.Module):
  """Stride-2 3×3 conv `op` (conv_resample) or 2×2 average pooling."""

  channels: int
  out_channels: int
  use_conv: bool
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    if self.use_conv:
      self.op = Conv(self.channels, self.out_channels, kernel=3, stride=2, padding=1, dtype=self.dtype)

  def __call__(self, x):
    return self.op(x) if self.use_conv else avg_pool2(x)


class Upsample(nn.Module):
  """Nearest 2× upsampling, then a 3×3 `conv` (conv_resample)."""

  channels: int
  out_channels: int
  use_conv: bool
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32)

  def setup(self):
    if self.use_conv:
      self.conv = Conv(self.channels, self.out_channels, kernel=3, padding=1, dtype=self.dtype)

  def __call__(self, x):
    x = upsample_nearest(x)
    return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(ModuleDict):
  """Layers in order; ResBlocks get the embeddings, SpatialTransformers the context."""

  def __call__(self, x, emb, context=None, emb_nfe=None):
    for name in self.names():
      layer = self[name]
      if isinstance(layer, ResBlock):
        x = layer(x, emb, emb_nfe)
      elif isinstance(layer, SpatialTransformer):
        x = layer(x, context)
      else:
        x = layer(x)
    return x


class _Plan:
  """Builds the `TimestepEmbedSequential` specs of UNetModel's three stages, tracking widths."""

  def __init__(self, cfg: UNetConfig, dtype: Optional[str] = None, remat: bool = False):
    self.cfg = cfg
    self.emb = 4 * cfg.model_channels
    self.dtype = dtype
    # remat: each input / middle / output block recomputed in the backward pass (only its input
    # kept); bf16: a block keeps only its input and its products' bf16 results.
    self.block_class = student_block(TimestepEmbedSequential, remat, dtype)

  def resblock(self, cin, cout, **updown):
    return (ResBlock, kw(channels=cin, emb_channels=self.emb, out_channels=cout,
                         use_scale_shift_norm=self.cfg.use_scale_shift_norm, dtype=self.dtype, **updown))

  def attn(self, ch, upsample=False):
    cfg = self.cfg
    heads, dim_head = cfg.attention_heads(ch, upsample)
    if cfg.use_spatial_transformer:
      return (SpatialTransformer, kw(channels=ch, heads=heads, dim_head=dim_head, depth=cfg.transformer_depth,
                                     context_dim=cfg.context_dim, dtype=self.dtype))
    return (AttentionBlock, kw(channels=ch, num_heads=heads, new_order=cfg.use_new_attention_order, dtype=self.dtype))

  def seq(self, layers):
    return (self.block_class, kw(specs=tuple((str(i), cls, k) for i, (cls, k) in enumerate(layers))))

  def stages(self):
    cfg, mc = self.cfg, self.cfg.model_channels
    inputs = [self.seq([(Conv, kw(in_channels=cfg.in_channels, out_channels=mc, kernel=3, padding=1,
                                  dtype=self.dtype))])]
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
      for _ in range(cfg.num_res_blocks):
        layers = [self.resblock(ch, mult * mc)]
        ch = mult * mc
        if ds in cfg.attention_resolutions:
          layers.append(self.attn(ch))
        inputs.append(self.seq(layers))
        chans.append(ch)
      if level != len(cfg.channel_mult) - 1:
        down = (self.resblock(ch, ch, down=True) if cfg.resblock_updown
                else (Downsample, kw(channels=ch, out_channels=ch, use_conv=cfg.conv_resample, dtype=self.dtype)))
        inputs.append(self.seq([down]))
        chans.append(ch)
        ds *= 2
    middle = self.seq([self.resblock(ch, ch), self.attn(ch), self.resblock(ch, ch)])
    outputs = []
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
      for i in range(cfg.num_res_blocks + 1):
        layers = [self.resblock(ch + chans.pop(), mc * mult)]
        ch = mc * mult
        if ds in cfg.attention_resolutions:
          layers.append(self.attn(ch, upsample=True))
        if level and i == cfg.num_res_blocks:
          layers.append(self.resblock(ch, ch, up=True) if cfg.resblock_updown
                        else (Upsample, kw(channels=ch, out_channels=ch, use_conv=cfg.conv_resample,
                                           dtype=self.dtype)))
          ds //= 2
        outputs.append(self.seq(layers))
    return inputs, middle, outputs, ch


class UNetModel(nn.Module):
  """eps(x, t, context, step_condition): x [N, H, W, in_channels] → [N, H, W, out_channels]."""

  config: UNetConfig
  dtype: Optional[str] = None         # compute dtype of convolutions, linears and attention (None: float32);
                                      #   parameters, norms, embeddings and the output stay float32
  remat: bool = False                 # recompute each input / middle / output block in the backward pass

  def setup(self):
    cfg, mc = self.config, self.config.model_channels
    inputs, middle, outputs, ch = _Plan(cfg, self.dtype, self.remat).stages()
    self.time_embed = ModuleDict(specs=_mlp_specs(mc, 4 * mc))
    self.nfe_embed = ModuleDict(specs=_mlp_specs(mc, 4 * mc))
    self.input_blocks = ModuleDict(specs=tuple((str(i), cls, k) for i, (cls, k) in enumerate(inputs)))
    self.middle_block = middle[0](**dict(middle[1]))
    self.output_blocks = ModuleDict(specs=tuple((str(i), cls, k) for i, (cls, k) in enumerate(outputs)))
    self.out = ModuleDict(specs=(("0", *group_norm(ch, _EPS_UNET)),
                                 ("2", Conv, kw(in_channels=mc, out_channels=cfg.out_channels, kernel=3, padding=1,
                                                dtype=self.dtype))))

  def __call__(self, x, timesteps, context=None, step_condition=None):
    """Args: x NHWC; timesteps [N] (float); context [N, L, context_dim] or None; step_condition
    [N] or None. Returns eps, NHWC."""
    mc = self.config.model_channels
    emb = _mlp(self.time_embed, timestep_embedding(timesteps, mc))
    emb_nfe = None
    if step_condition is not None:
      emb_nfe = _mlp(self.nfe_embed, timestep_embedding(step_condition, mc))
    hs, h = [], x
    for name in self.input_blocks.names():
      h = self.input_blocks[name](h, emb, context, emb_nfe)
      hs.append(h)
    h = self.middle_block(h, emb, context, emb_nfe)
    for name in self.output_blocks.names():
      h = jnp.concatenate([h, hs.pop()], axis=-1)
      h = self.output_blocks[name](h, emb, context, emb_nfe)
    return self.out["2"](silu(self.out["0"](h)))
