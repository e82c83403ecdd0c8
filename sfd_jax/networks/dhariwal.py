"""EDM's `DhariwalUNet` (ADM) in Flax, NHWC, with SFD-v's optional step condition.

Same constructor arguments and defaults as EDM's `training/networks.py::DhariwalUNet`; the
variables tree carries EDM's state-dict names. With `use_step_condition`, the layers of the
official SFD code (`map_step_layer0/1`, `affine_step` in every block) are added.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.networks.layers import (Conv2d, GroupNorm, Linear, ModuleDict, PositionalEmbedding, UNetBlock,
                                     student_block, silu)
from sfd_jax.networks.layers import module_kwargs as _kw


class DhariwalUNet(nn.Module):
  """ADM U-Net (EDM `DhariwalUNet`), NHWC."""

  img_resolution: int                        # Image resolution at input/output.
  in_channels: int                           # Number of color channels at input.
  out_channels: int                          # Number of color channels at output.
  label_dim: int = 0                         # Number of class labels, 0 = unconditional.
  augment_dim: int = 0                       # Augmentation label dimensionality, 0 = none.
  model_channels: int = 192                  # Base multiplier for the number of channels.
  channel_mult: Sequence[int] = (1, 2, 3, 4)  # Per-resolution channel multipliers.
  channel_mult_emb: int = 4                  # Multiplier for the embedding dimensionality.
  num_blocks: int = 3                        # Number of residual blocks per resolution.
  attn_resolutions: Sequence[int] = (32, 16, 8)  # Resolutions with self-attention.
  dropout: float = 0.10                      # Dropout probability of intermediate activations.
  label_dropout: float = 0.0                 # Class-label dropout (classifier-free guidance).
  use_step_condition: bool = False           # SFD-v: step-condition layers.
  dtype: Optional[str] = None                # Compute dtype of convolutions/attention (None: float32).
  remat: bool = False                        # Recompute each UNetBlock in the backward pass (`layers.student_block`).

  @property
  def _init(self):
    return _kw(init_mode="kaiming_uniform", init_weight=float(np.sqrt(1 / 3)), init_bias=float(np.sqrt(1 / 3)))

  @property
  def _init_zero(self):
    return _kw(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)

  def _plan(self):
    """The encoder and decoder specs, in EDM's registration order."""
    block = dict(emb_channels=self.model_channels * self.channel_mult_emb, channels_per_head=64,
                 dropout=self.dropout, init=self._init, init_zero=self._init_zero,
                 use_step_condition=self.use_step_condition, dtype=self.dtype)

    def unet_block(**kw):
      return student_block(UNetBlock, self.remat, self.dtype, static_argnums=(4,)), _kw(**block, **kw)

    enc = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cin, cout = cout, self.model_channels * mult
        enc.append((f"{res}x{res}_conv", Conv2d, _kw(in_channels=cin, out_channels=cout, kernel=3,
                                                     dtype=self.dtype, **dict(self._init))))
      else:
        enc.append((f"{res}x{res}_down", *unet_block(in_channels=cout, out_channels=cout, down=True)))
      for idx in range(self.num_blocks):
        cin, cout = cout, self.model_channels * mult
        enc.append((f"{res}x{res}_block{idx}", *unet_block(
            in_channels=cin, out_channels=cout, attention=res in self.attn_resolutions)))
    skips = [dict(kw)["out_channels"] for _, _, kw in enc]

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
        dec.append((f"{res}x{res}_block{idx}", *unet_block(
            in_channels=cin, out_channels=cout, attention=res in self.attn_resolutions)))
    return tuple(enc), tuple(dec), cout

  def setup(self):
    init, init_zero = dict(self._init), dict(self._init_zero)
    mc = self.model_channels
    emb_channels = mc * self.channel_mult_emb
    self.map_noise = PositionalEmbedding(num_channels=mc)
    self.map_augment = Linear(self.augment_dim, mc, bias=False, **init_zero) if self.augment_dim else None
    self.map_layer0 = Linear(mc, emb_channels, **init)
    self.map_layer1 = Linear(emb_channels, emb_channels, **init)
    self.map_label = (Linear(self.label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                             init_weight=float(np.sqrt(self.label_dim))) if self.label_dim else None)
    if self.use_step_condition:
      self.map_step = PositionalEmbedding(num_channels=mc)
      self.map_step_layer0 = Linear(mc, emb_channels, **init)
      self.map_step_layer1 = Linear(emb_channels, emb_channels, **init)
    enc, dec, cout = self._plan()
    self.enc = ModuleDict(enc)
    self.dec = ModuleDict(dec)
    self.out_norm = GroupNorm(num_channels=cout)
    self.out_conv = Conv2d(cout, self.out_channels, kernel=3, dtype=self.dtype, **init_zero)

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
    emb = self.map_noise(noise_labels)
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = self.map_layer1(silu(self.map_layer0(emb)))
    if self.map_label is not None:
      tmp = class_labels
      if train and self.label_dropout:
        keep = jax.random.uniform(self.make_rng("dropout"), (x.shape[0], 1)) >= self.label_dropout
        tmp = tmp * keep.astype(tmp.dtype)
      emb = emb + self.map_label(tmp)
    emb = silu(emb)

    emb_step = None
    if step_condition is not None:
      if not self.use_step_condition:
        raise ValueError("DhariwalUNet: step_condition given but use_step_condition is False")
      emb_step = silu(self.map_step_layer1(silu(self.map_step_layer0(self.map_step(step_condition)))))

    skips = []
    for name in self.enc.names():
      block = self.enc[name]
      x = block(x, emb, emb_step, train) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for name in self.dec.names():
      block = self.dec[name]
      if x.shape[-1] != block.in_channels:
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = block(x, emb, emb_step, train)
    return self.out_conv(silu(self.out_norm(x)))
