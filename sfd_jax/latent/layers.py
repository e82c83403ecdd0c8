"""Building blocks of the CompVis networks as Flax linen modules, NHWC, torch weight layouts.

Parameters keep the checkpoint's names and layouts (Conv `OIHW`, Conv1d `[out, in, 1]`, Linear
`[out, in]`), so a checkpoint is a renaming; `Linear`, `GroupNorm` and `ModuleDict` are the EDM
wing's (`sfd_jax.networks.layers`). New parameters (SFD's step-condition layers, absent from
released checkpoints) get torch's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sfd_jax.networks import layers as edm_layers
from sfd_jax.networks.layers import GroupNorm, ModuleDict, module_kwargs, student_block  # noqa: F401 (re-exported)

kw = module_kwargs


def torch_default_init(fan_in: int):
  """torch's default Linear/Conv initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

  return init


def Linear(in_features: int, out_features: int, bias: bool = True,  # pylint: disable=invalid-name
           dtype: Optional[str] = None):
  """torch `nn.Linear` (weight `[out, in]`) as the EDM wing's `Linear`, with torch's default
  initialisation: kaiming-uniform bounds sqrt(3/fan_in)·(1/sqrt(3)) = 1/sqrt(fan_in). `dtype`:
  the product's compute dtype ('bfloat16': bfloat16 operands, float32 result; None: x's dtype)."""
  scale = 1 / math.sqrt(3)
  return edm_layers.Linear(in_features=in_features, out_features=out_features, bias=bias,
                           init_mode="kaiming_uniform", init_weight=scale, init_bias=scale, dtype=dtype)


class Conv(nn.Module):
  """torch `nn.Conv2d` (weight OIHW) or, with `conv1d`, a kernel-1 `nn.Conv1d` (weight [O, I, 1])
  applied over the flattened positions; NHWC in and out."""

  in_channels: int
  out_channels: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  conv1d: bool = False
  dtype: Optional[str] = None         # compute dtype ('bfloat16': bf16 operands, float32 result; None: x's)

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    init = torch_default_init(self.in_channels * k * (1 if self.conv1d else k))
    shape = (self.out_channels, self.in_channels, 1) if self.conv1d else (self.out_channels, self.in_channels, k, k)
    w = self.param("weight", init, shape)
    b = self.param("bias", init, (self.out_channels,))
    xc, w, preferred = edm_layers._operands(x, w, self.dtype)  # pylint: disable=protected-access
    if self.conv1d or k == 1 and self.stride == 1 and self.padding == 0:
      y = jnp.matmul(xc, w.reshape(self.out_channels, self.in_channels).T, preferred_element_type=preferred)
    else:
      y = lax.conv_general_dilated(xc, jnp.transpose(w, (2, 3, 1, 0)), (self.stride,) * 2,
                                   [(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=preferred)
    y = edm_layers.low_result(y, self.dtype)
    return y + b.astype(y.dtype)


class LayerNorm(nn.Module):
  """torch `nn.LayerNorm` over the last axis (weight, bias)."""

  num_features: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (self.num_features,), jnp.float32)
    b = self.param("bias", nn.initializers.zeros, (self.num_features,), jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + jnp.asarray(self.eps, x.dtype)) * w.astype(x.dtype) + b.astype(x.dtype)


def group_norm(channels: int, eps: float):
  """(GroupNorm, kwargs) of torch's `GroupNorm(32, channels, eps)` for a `ModuleDict` spec."""
  if channels % 32:
    raise ValueError(f"GroupNorm(32, {channels}): channels must be a multiple of 32")
  return GroupNorm, kw(num_channels=channels, num_groups=32, min_channels_per_group=1, eps=eps)


def make_group_norm(channels: int, eps: float) -> GroupNorm:
  """torch's `GroupNorm(32, channels, eps)` as a module."""
  cls, kwargs = group_norm(channels, eps)
  return cls(**dict(kwargs))


def silu(x):
  return jax.nn.silu(x)


def upsample_nearest(x):
  """`F.interpolate(x, scale_factor=2, mode='nearest')` on NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
  """`avg_pool2d(x, 2, 2)` on NHWC."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@functools.lru_cache(maxsize=None)
def _frequencies(dim: int, max_period: int) -> np.ndarray:
  """exp(-ln(max_period)·i/half), i < half, with the official float32 roundings: the product and
  the division are float32, the exponential is correctly rounded."""
  half = dim // 2
  scaled = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  return np.exp(scaled.astype(np.float64)).astype(np.float32)


def timestep_embedding(timesteps, dim: int, max_period: int = 10000):
  """CompVis' sinusoidal embedding `[cos(t·f), sin(t·f)]` (cos first), f = max_period^(-i/half).

  Args:
    timesteps: [N] float (fractional steps allowed).
    dim: embedding width.

  Returns:
    [N, dim] in the compute dtype (a zero column appended for odd `dim`).
  """
  dt = jnp.promote_types(jnp.asarray(timesteps).dtype, jnp.float32)
  args = jnp.asarray(timesteps, dt)[:, None] * jnp.asarray(_frequencies(dim, max_period), dt)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


ATTENTION_CHUNK = 1024  # queries per chunk when a sequence is longer (SD's 64x64 latents: 4096)


def _dense_attention(q, k, v, scale_q, scale_k, dtype):
  if dtype is None:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale_q, k * scale_k)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  low = lambda t: t.astype(dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", low(q * scale_q), low(k * scale_k), preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)  # float32 logits: a bf16 ulp of a large logit moves the weights
  return edm_layers.low_result(jnp.einsum("bhqk,bkhd->bqhd", low(weights), low(v), preferred_element_type=jnp.float32),
                               dtype)


def attention(q, k, v, scale_q, scale_k, dtype: Optional[str] = None, chunk: int = ATTENTION_CHUNK):
  """softmax((q·scale_q)(k·scale_k)ᵀ) v per head; q [B, Lq, H, D], k/v [B, Lk, H, D] → [B, Lq, H, D].

  The softmax runs in at least float32 (as the official code casts the logits); with `dtype`
  ('bfloat16') both products take operands in it and give float32 results.

  More than `chunk` queries (a multiple of it) run `chunk` at a time in a `lax.map` whose body is
  rematerialised: the `[B, H, Lq, Lk]` weights are never whole, and a backward pass keeps only
  the inputs and recomputes each chunk's weights (as the official SD UNet's `use_checkpoint` does
  for its transformer blocks). Each query row's softmax is the same computation either way. The
  two map loops (forward, backward) are separate, so no backend's optimiser can merge the
  recomputation back (experiments/RESULTS.md, "Where the memory of the SD step went")."""
  n, lq, h, d = q.shape
  if not chunk or lq <= chunk or lq % chunk:
    return _dense_attention(q, k, v, scale_q, scale_k, dtype)
  body = jax.checkpoint(lambda qc: _dense_attention(qc, k, v, scale_q, scale_k, dtype), prevent_cse=False)
  chunks = jnp.moveaxis(q.reshape(n, lq // chunk, chunk, h, d), 1, 0)
  out = jax.lax.map(body, chunks)
  return jnp.moveaxis(out, 0, 1).reshape(n, lq, h, out.shape[-1])
