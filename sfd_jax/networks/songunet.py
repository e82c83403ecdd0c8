"""EDM's `SongUNet` (DDPM++ / NCSN++) in Flax, NHWC, with SFD-v's optional step condition.

Same constructor arguments and defaults as EDM's `training/networks.py::SongUNet`; the
variables tree carries EDM's state-dict names (`map_layer0`, `enc/16x16_conv`, ...).
With `use_step_condition`, the layers of the official SFD code (`map_step`,
`map_step_layer0/1`, and `affine_step` in every block) are added.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.networks.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, ModuleDict,
                                     PositionalEmbedding, UNetBlock, student_block, silu)
from sfd_jax.networks.layers import module_kwargs as _kw

_EMBEDDING_TYPES = ("fourier", "positional")
_ENCODER_TYPES = ("standard", "skip", "residual")
_DECODER_TYPES = ("standard", "skip")


def swap_halves(emb):
  """[cos, sin] → [sin, cos]: the swap SongUNet applies to its positional features."""
  half = emb.shape[1] // 2
  return jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net (EDM `SongUNet`), NHWC."""

  img_resolution: int                       # Image resolution at input/output.
  in_channels: int                          # Number of color channels at input.
  out_channels: int                         # Number of color channels at output.
  label_dim: int = 0                        # Number of class labels, 0 = unconditional.
  augment_dim: int = 0                      # Augmentation label dimensionality, 0 = none.
  model_channels: int = 128                 # Base multiplier for the number of channels.
  channel_mult: Sequence[int] = (1, 2, 2, 2)  # Per-resolution channel multipliers.
  channel_mult_emb: int = 4                 # Multiplier for the embedding dimensionality.
  num_blocks: int = 4                       # Number of residual blocks per resolution.
  attn_resolutions: Sequence[int] = (16,)   # Resolutions with self-attention.
  dropout: float = 0.10                     # Dropout probability of intermediate activations.
  label_dropout: float = 0.0                # Class-label dropout (classifier-free guidance).
  embedding_type: str = "positional"        # 'positional' (DDPM++) or 'fourier' (NCSN++).
  channel_mult_noise: int = 1               # Noise embedding size: 1 DDPM++, 2 NCSN++.
  encoder_type: str = "standard"            # 'standard', 'skip' or 'residual'.
  decoder_type: str = "standard"            # 'standard' or 'skip'.
  resample_filter: Sequence[int] = (1, 1)   # [1,1] DDPM++, [1,3,3,1] NCSN++.
  use_step_condition: bool = False          # SFD-v: step-condition layers.
  dtype: Optional[str] = None               # Compute dtype of convolutions/attention (None: float32).
  remat: bool = False                       # Recompute each UNetBlock in the backward pass (`layers.student_block`).

  def _check(self):
    for field, value, allowed in (("embedding_type", self.embedding_type, _EMBEDDING_TYPES),
                                  ("encoder_type", self.encoder_type, _ENCODER_TYPES),
                                  ("decoder_type", self.decoder_type, _DECODER_TYPES)):
      if value not in allowed:
        raise ValueError(f"SongUNet: {field}={value!r} is not one of {allowed}")

  def _plan(self):
    """The encoder and decoder specs, in EDM's registration order."""
    init = _kw(init_mode="xavier_uniform")
    init_zero = _kw(init_mode="xavier_uniform", init_weight=1e-5)
    init_attn = _kw(init_mode="xavier_uniform", init_weight=float(np.sqrt(0.2)))
    rf = tuple(self.resample_filter)
    dt = self.dtype
    block = dict(emb_channels=self.model_channels * self.channel_mult_emb, num_heads=1,
                 dropout=self.dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
                 resample_filter=rf, resample_proj=True, adaptive_scale=False,
                 init=init, init_zero=init_zero, init_attn=init_attn,
                 use_step_condition=self.use_step_condition, dtype=self.dtype)

    def unet_block(**kw):
      return student_block(UNetBlock, self.remat, self.dtype, static_argnums=(4,)), _kw(**block, **kw)

    enc = []
    cout = caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cin, cout = cout, self.model_channels
        enc.append((f"{res}x{res}_conv", Conv2d, _kw(in_channels=cin, out_channels=cout, kernel=3, dtype=dt,
                                                     **dict(init))))
      else:
        enc.append((f"{res}x{res}_down", *unet_block(in_channels=cout, out_channels=cout, down=True)))
        if self.encoder_type == "skip":
          enc.append((f"{res}x{res}_aux_down", Conv2d, _kw(in_channels=caux, out_channels=caux, kernel=0,
                                                            down=True, resample_filter=rf, dtype=dt)))
          enc.append((f"{res}x{res}_aux_skip", Conv2d, _kw(in_channels=caux, out_channels=cout, kernel=1,
                                                            dtype=dt, **dict(init))))
        if self.encoder_type == "residual":
          enc.append((f"{res}x{res}_aux_residual", Conv2d, _kw(
              in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=rf,
              fused_resample=True, dtype=dt, **dict(init))))
          caux = cout
      for idx in range(self.num_blocks):
        cin, cout = cout, self.model_channels * mult
        enc.append((f"{res}x{res}_block{idx}", *unet_block(
            in_channels=cin, out_channels=cout, attention=res in self.attn_resolutions)))
    skips = [dict(kw)["out_channels"] for name, _, kw in enc if "aux" not in name]

    dec = []
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        dec.append((f"{res}x{res}_in0", *unet_block(in_channels=cout, out_channels=cout, attention=True)))
        dec.append((f"{res}x{res}_in1", *unet_block(in_channels=cout, out_channels=cout)))
      else:
        dec.append((f"{res}x{res}_up", *unet_block(in_channels=cout, out_channels=cout, up=True)))
      for idx in range(self.num_blocks + 1):
        cin, cout = cout + skips.pop(), self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        dec.append((f"{res}x{res}_block{idx}", *unet_block(in_channels=cin, out_channels=cout, attention=attn)))
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < len(self.channel_mult) - 1:
          dec.append((f"{res}x{res}_aux_up", Conv2d, _kw(
              in_channels=self.out_channels, out_channels=self.out_channels, kernel=0, up=True,
              resample_filter=rf, dtype=dt)))
        dec.append((f"{res}x{res}_aux_norm", GroupNorm, _kw(num_channels=cout, eps=1e-6)))
        dec.append((f"{res}x{res}_aux_conv", Conv2d, _kw(in_channels=cout, out_channels=self.out_channels,
                                                          kernel=3, dtype=dt, **dict(init_zero))))
    return tuple(enc), tuple(dec)

  def setup(self):
    self._check()
    init = dict(init_mode="xavier_uniform")
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise

    def noise_embedding():
      if self.embedding_type == "positional":
        return PositionalEmbedding(num_channels=noise_channels, endpoint=True)
      return FourierEmbedding(num_channels=noise_channels)

    self.map_noise = noise_embedding()
    self.map_label = Linear(self.label_dim, noise_channels, **init) if self.label_dim else None
    self.map_augment = (Linear(self.augment_dim, noise_channels, bias=False, **init)
                        if self.augment_dim else None)
    self.map_layer0 = Linear(noise_channels, emb_channels, **init)
    self.map_layer1 = Linear(emb_channels, emb_channels, **init)
    if self.use_step_condition:
      self.map_step = noise_embedding()
      self.map_step_layer0 = Linear(noise_channels, emb_channels, **init)
      self.map_step_layer1 = Linear(emb_channels, emb_channels, **init)
    enc, dec = self._plan()
    self.enc = ModuleDict(enc)
    self.dec = ModuleDict(dec)

  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, step_condition=None,
               train: bool = False):
    """Args:
      x: [N, H, W, in_channels].
      noise_labels: [N] or [1] (c_noise).
      class_labels: [N or 1, label_dim] (conditional nets).
      augment_labels: [N, augment_dim] or None (then `map_augment` is skipped).
      step_condition: [1] (SFD-v: number of time points) or None.
      train: dropout (and label dropout) active; needs the 'dropout' rng.

    Returns:
      F_x, [N, H, W, out_channels].
    """
    emb = swap_halves(self.map_noise(noise_labels))
    if self.map_label is not None:
      tmp = class_labels
      if train and self.label_dropout:
        keep = jax.random.uniform(self.make_rng("dropout"), (x.shape[0], 1)) >= self.label_dropout
        tmp = tmp * keep.astype(tmp.dtype)
      emb = emb + self.map_label(tmp * float(np.sqrt(self.label_dim)))
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

    emb_step = None
    if step_condition is not None:
      if not self.use_step_condition:
        raise ValueError("SongUNet: step_condition given but use_step_condition is False")
      emb_step = swap_halves(self.map_step(step_condition))
      emb_step = silu(self.map_step_layer1(silu(self.map_step_layer0(emb_step))))

    # Encoder.
    skips = []
    aux = x
    for name in self.enc.names():
      block = self.enc[name]
      if "aux_down" in name:
        aux = block(aux)
      elif "aux_skip" in name:
        x = skips[-1] = x + block(aux)
      elif "aux_residual" in name:
        x = skips[-1] = aux = (x + block(aux)) / float(np.sqrt(2))
      elif isinstance(block, UNetBlock):
        x = block(x, emb, emb_step, train)
        skips.append(x)
      else:
        x = block(x)
        skips.append(x)

    # Decoder.
    aux = tmp = None
    for name in self.dec.names():
      block = self.dec[name]
      if "aux_up" in name:
        aux = block(aux)
      elif "aux_norm" in name:
        tmp = block(x)
      elif "aux_conv" in name:
        tmp = block(silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[-1] != block.in_channels:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(x, emb, emb_step, train)
    return aux
