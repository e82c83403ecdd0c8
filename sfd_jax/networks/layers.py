"""EDM's network building blocks as Flax linen modules, NHWC, with EDM's weight layout.

Parameters keep PyTorch's layout (Linear `[out, in]`, Conv2d `OIHW`) and EDM's names, so
converting an EDM state dict is a renaming. Buffers (`resample_filter`, `freqs`) live in the
`'buffers'` collection. Every layer computes in the dtype of its input (parameters are cast),
which is float32 for EDM parity and float64 when a caller runs the network under jax x64.
Convolutions, `Linear` and attention take an optional compute `dtype` ('bfloat16'): their
operands are cast to it, products accumulate in float32 and their results are rounded to it
(`low_result`, the attention logits excepted) and continue in float32, so GroupNorm and
everything elementwise compute in float32 (mixed precision; parameters stay float32).
"""
import inspect
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# Kernels are stored OIHW (EDM) but handed to XLA as HWIO: XLA:CPU runs convolutions fast only
# in that layout, and inside a lax.scan body (the solvers) it does not rewrite OIHW itself.
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def weight_init(key, shape, mode: str, fan_in: int, fan_out: int) -> jax.Array:
  """EDM's weight initialisation (`training/networks.py::weight_init`), float32.

  Args:
    key: PRNG key.
    shape: shape of the tensor to draw.
    mode: 'xavier_uniform' | 'xavier_normal' | 'kaiming_uniform' | 'kaiming_normal'.
    fan_in, fan_out: fans of the layer the tensor belongs to.

  Returns:
    A float32 array of `shape`.
  """
  if mode == "xavier_uniform":
    return np.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
  if mode == "xavier_normal":
    return np.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape)
  if mode == "kaiming_uniform":
    return np.sqrt(3 / fan_in) * jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
  if mode == "kaiming_normal":
    return np.sqrt(1 / fan_in) * jax.random.normal(key, shape)
  raise ValueError(f"weight_init: invalid init mode {mode!r}")


def _scaled_init(mode, fan_in, fan_out, scale):
  """Initializer for `self.param`: EDM's `weight_init(...) * scale`, float32."""

  def init(key, shape):
    return (weight_init(key, shape, mode, fan_in, fan_out) * float(scale)).astype(jnp.float32)

  return init


def silu(x):
  """SiLU, as EDM's `torch.nn.functional.silu`."""
  return jax.nn.silu(x)


# The name of a low-precision product's result: what a bf16 network keeps for its backward pass.
LOW_PRODUCT = 'low_precision_product'


def _operands(x, w, dtype):
  """(x, w, preferred_element_type) of a product: in x's dtype, or in `dtype` with float32 results."""
  if dtype is None:
    return x, w.astype(x.dtype), None
  return x.astype(dtype), w.astype(dtype), jnp.float32


def low_result(y, dtype):
  """A product's float32 result in a `dtype` network: rounded to `dtype` (so its backward pass
  keeps it at that size, `low_precision_blocks`) and continued in float32; unchanged for None."""
  if dtype is None:
    return y
  return checkpoint_name(y.astype(dtype), LOW_PRODUCT).astype(jnp.float32)


@jax.custom_vjp
def add_bias(x, b):
  """x + b over the last axis; its gradient sums b's cotangent one axis at a time (pairwise-like),
  which keeps float32 bias gradients as accurate as torch's (a single sequential reduction of
  N·H·W terms loses ~N·H·W/2 ulps)."""
  return x + b


def _add_bias_fwd(x, b):
  return x + b, None


def _add_bias_bwd(_, ct):
  ct_b = ct
  while ct_b.ndim > 1:
    # The barrier stops XLA from merging the partial sums back into one long reduction.
    ct_b = lax.optimization_barrier(ct_b.sum(axis=ct_b.ndim - 2))
  return ct, ct_b


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def compute_dtype(dtype):
  """The dtype a network runs in for inputs of `dtype`: float32, or float64 under x64."""
  return jnp.promote_types(dtype, jnp.float32)


class Linear(nn.Module):
  """Fully connected layer, weight `[out_features, in_features]` (EDM `Linear`)."""

  in_features: int
  out_features: int
  bias: bool = True
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  dtype: Optional[str] = None         # compute dtype of the product (None: x's dtype)

  @nn.compact
  def __call__(self, x):
    fans = (self.init_mode, self.in_features, self.out_features)
    w = self.param("weight", _scaled_init(*fans, self.init_weight), (self.out_features, self.in_features))
    xc, w, preferred = _operands(x, w, self.dtype)
    x = low_result(jnp.matmul(xc, w.T, preferred_element_type=preferred), self.dtype)
    if self.bias:
      b = self.param("bias", _scaled_init(*fans, self.init_bias), (self.out_features,))
      x = x + b.astype(x.dtype)
    return x


def resample_filter_buffer(resample_filter: Sequence[float]) -> np.ndarray:
  """EDM's 2-D resampling filter `outer(f, f) / sum(f)^2`, shape [1, 1, k, k], float32."""
  f = np.asarray(resample_filter, dtype=np.float32)
  return (np.outer(f, f) / np.square(f.sum()))[None, None].astype(np.float32)


def _hwio(w):
  """OIHW (EDM's layout) → HWIO."""
  return jnp.transpose(w, (2, 3, 1, 0))


def _conv(x, w, padding, stride=1, groups=1, dtype=None):
  """NHWC x OIHW cross-correlation with symmetric zero padding (torch `conv2d`)."""
  x, w, preferred = _operands(x, w, dtype)
  return low_result(lax.conv_general_dilated(
      x, _hwio(w), window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      dimension_numbers=_NHWC_HWIO, feature_group_count=groups, preferred_element_type=preferred), dtype)


def _conv_transpose_stride2(x, w, padding, groups, dtype=None):
  """torch `conv_transpose2d(x, w, stride=2, padding=padding, groups=groups)` for OIHW
  depthwise `w` ([C, 1, k, k]): a stride-1 convolution of the 2x-dilated input with the
  spatially flipped kernel."""
  k = w.shape[-1]
  pad = k - 1 - padding
  x, w, preferred = _operands(x, w, dtype)
  return low_result(lax.conv_general_dilated(
      x, _hwio(w[:, :, ::-1, ::-1]), window_strides=(1, 1), padding=[(pad, pad)] * 2,
      lhs_dilation=(2, 2), dimension_numbers=_NHWC_HWIO, feature_group_count=groups,
      preferred_element_type=preferred), dtype)


class Conv2d(nn.Module):
  """Convolution with optional 2x up/down-sampling by a fixed FIR filter (EDM `Conv2d`).

  `kernel=0` gives a pure resampling layer with no weights.
  """

  in_channels: int
  out_channels: int
  kernel: int
  bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  dtype: Optional[str] = None         # compute dtype of the convolutions (None: x's dtype)

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are mutually exclusive")
    k = self.kernel
    fans = (self.init_mode, self.in_channels * k * k, self.out_channels * k * k)
    w = b = f = None
    if k:
      w = self.param("weight", _scaled_init(*fans, self.init_weight), (self.out_channels, self.in_channels, k, k))
      if self.bias:
        b = self.param("bias", _scaled_init(*fans, self.init_bias), (self.out_channels,)).astype(x.dtype)
    if self.up or self.down:
      buf = self.variable("buffers", "resample_filter",
                          lambda: jnp.asarray(resample_filter_buffer(self.resample_filter)))
      f = buf.value.astype(x.dtype)
    w_pad = k // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

    dt = self.dtype
    if self.fused_resample and self.up and w is not None:
      x = _conv_transpose_stride2(x, self._tiled(f * 4, self.in_channels), w_pad + f_pad, self.in_channels, dt)
      x = _conv(x, w, 0, dtype=dt)
    elif self.fused_resample and self.down and w is not None:
      x = _conv(x, w, w_pad + f_pad, dtype=dt)
      x = _conv(x, self._tiled(f, self.out_channels), 0, stride=2, groups=self.out_channels, dtype=dt)
    else:
      if self.up:
        x = _conv_transpose_stride2(x, self._tiled(f * 4, self.in_channels), f_pad, self.in_channels, dt)
      if self.down:
        x = _conv(x, self._tiled(f, self.in_channels), f_pad, stride=2, groups=self.in_channels, dtype=dt)
      if w is not None:
        x = _conv(x, w, w_pad, dtype=dt)
    if b is not None:
      x = add_bias(x, b)
    return x

  @staticmethod
  def _tiled(f, channels):
    """[1, 1, k, k] filter → depthwise OIHW kernel [channels, 1, k, k]."""
    return jnp.tile(f, (channels, 1, 1, 1))


class GroupNorm(nn.Module):
  """Group normalisation over NHWC with `min(num_groups, C // min_channels_per_group)` groups."""

  num_channels: int
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    groups = min(self.num_groups, self.num_channels // self.min_channels_per_group)
    w = self.param("weight", nn.initializers.ones, (self.num_channels,), jnp.float32)
    b = self.param("bias", nn.initializers.zeros, (self.num_channels,), jnp.float32)
    n, h, wd, c = x.shape
    xg = x.reshape(n, h, wd, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) * lax.rsqrt(var + jnp.asarray(self.eps, x.dtype))
    return xg.reshape(n, h, wd, c) * w.astype(x.dtype) + b.astype(x.dtype)


def attention_weights(q, k, dtype=None):
  """softmax_k(q·k / sqrt(C)) in at least float32 (EDM's `AttentionOp`).

  Args:
    q, k: [B, L, heads, C].
    dtype: compute dtype of the product q·k (None: at least float32); the softmax is float32.

  Returns:
    [B, heads, Lq, Lk] in q's dtype.
  """
  dt = compute_dtype(q.dtype)
  k = k / float(np.sqrt(k.shape[-1]))
  if dtype is not None:
    # float32 logits (not `low_result`): a bf16 ulp of a large logit would move the weights.
    logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(dt), k.astype(dt))
  return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


class UNetBlock(nn.Module):
  """EDM's unified U-Net block (DDPM++, NCSN++, ADM), with SFD-v's optional step affine.

  `init`, `init_zero`, `init_attn` are tuples of (name, value) pairs of Linear/Conv2d
  init arguments, as EDM's dicts.
  """

  in_channels: int
  out_channels: int
  emb_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: tuple = ()
  init_zero: tuple = (("init_weight", 0.0),)
  init_attn: Optional[tuple] = None
  use_step_condition: bool = False
  dtype: Optional[str] = None         # compute dtype of convolutions and attention (None: x's dtype)

  @property
  def heads(self) -> int:
    if not self.attention:
      return 0
    return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

  def setup(self):
    init, init_zero = dict(self.init), dict(self.init_zero)
    init_attn = dict(self.init_attn) if self.init_attn is not None else init
    cin, cout = self.in_channels, self.out_channels
    affine_out = cout * (2 if self.adaptive_scale else 1)
    dt = self.dtype
    self.norm0 = GroupNorm(num_channels=cin, eps=self.eps)
    self.conv0 = Conv2d(cin, cout, kernel=3, up=self.up, down=self.down,
                        resample_filter=self.resample_filter, dtype=dt, **init)
    # The embedding path (affine) stays in the input dtype, as EDM's fp16 mode keeps it float32.
    self.affine = Linear(self.emb_channels, affine_out, **init)
    self.norm1 = GroupNorm(num_channels=cout, eps=self.eps)
    self.conv1 = Conv2d(cout, cout, kernel=3, dtype=dt, **init_zero)
    if self.use_step_condition:
      self.affine_step = Linear(self.emb_channels, affine_out, **init)
    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      self.skip = Conv2d(cin, cout, kernel=kernel, up=self.up, down=self.down,
                         resample_filter=self.resample_filter, dtype=dt, **init)
    else:
      self.skip = None
    if self.heads:
      self.norm2 = GroupNorm(num_channels=cout, eps=self.eps)
      self.qkv = Conv2d(cout, cout * 3, kernel=1, dtype=dt, **init_attn)
      self.proj = Conv2d(cout, cout, kernel=1, dtype=dt, **init_zero)
    self.drop = nn.Dropout(rate=self.dropout)

  def __call__(self, x, emb, emb_step=None, train: bool = False):
    """Args: x [N, H, W, Cin]; emb [N or 1, E]; emb_step [1, E] or None. Returns [N, H', W', Cout]."""
    orig = x
    x = self.conv0(silu(self.norm0(x)))
    params = self.affine(emb).astype(x.dtype)[:, None, None, :]
    params_step = None
    if emb_step is not None:
      params_step = self.affine_step(emb_step).astype(x.dtype)[:, None, None, :]
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = shift + self.norm1(x) * (scale + 1)
      if params_step is not None:
        scale_step, shift_step = jnp.split(params_step, 2, axis=-1)
        x = shift_step + x * (scale_step + 1)
      x = silu(x)
    else:
      x = x + params
      if params_step is not None:
        x = x + params_step
      x = silu(self.norm1(x))

    if self.dropout:
      x = self.drop(x, deterministic=not train)
    x = self.conv1(x)
    x = x + (self.skip(orig) if self.skip is not None else orig)
    x = x * float(self.skip_scale)

    if self.heads:
      x = self._attention(x)
    return x

  def _attention(self, x):
    n, h, w, c = x.shape
    heads = self.heads
    # EDM reshapes qkv's channels as (head, channel, {q, k, v}): q, k, v interleave.
    qkv = self.qkv(self.norm2(x)).reshape(n, h * w, heads, c // heads, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    weights = attention_weights(q, k, self.dtype)
    if self.dtype is not None:
      a = low_result(jnp.einsum("bhqk,bkhc->bqhc", weights.astype(self.dtype), v.astype(self.dtype),
                                preferred_element_type=jnp.float32), self.dtype)
    else:
      a = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
    a = a.reshape(n, h, w, c)
    return (self.proj(a) + x) * float(self.skip_scale)


class PositionalEmbedding(nn.Module):
  """Sinusoidal embedding `[cos(x f), sin(x f)]`, f = max_positions^(-i / (C/2 - endpoint))."""

  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x):
    """Args: x [N]. Returns [N, num_channels] in x's dtype."""
    # EDM builds the frequencies in float32 whatever the input dtype (float64 under x64).
    dt = compute_dtype(x.dtype)
    half = self.num_channels // 2
    freqs = jnp.arange(half, dtype=dt) / (half - (1 if self.endpoint else 0))
    freqs = jnp.asarray(1 / self.max_positions, dt) ** freqs
    x = jnp.outer(x, freqs.astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features `[cos(2π x f), sin(2π x f)]`, f ~ N(0, scale²) kept as a buffer."""

  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    """Args: x [N]. Returns [N, num_channels] in x's dtype."""
    key = self.make_rng("params") if self.is_initializing() else None
    freqs = self.variable("buffers", "freqs",
                          lambda: jax.random.normal(key, (self.num_channels // 2,)) * float(self.scale))
    x = jnp.outer(x, (2 * np.pi * freqs.value.astype(x.dtype)))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def module_kwargs(**kwargs):
  """Module kwargs as a hashable, ordered tuple (what `ModuleDict` specs hold)."""
  return tuple(kwargs.items())


class ModuleDict(nn.Module):
  """Ordered named sub-modules, like `torch.nn.ModuleDict`: names may be any string
  (EDM's '16x16_conv'), so the variables tree keeps EDM's names.

  Attributes:
    specs: ((name, module_class, ((kwarg, value), ...)), ...) in EDM's order.
  """

  specs: tuple

  def setup(self):
    for name, cls, kwargs in self.specs:
      setattr(self, name, cls(**dict(kwargs)))

  def names(self):
    return [name for name, _, _ in self.specs]

  def __getitem__(self, name):
    return getattr(self, name)


def sequential_remat(block_class, static_argnums=(), policy=None):
  """`block_class` whose backward pass recomputes it from its inputs, one block at a time.

  `flax.linen.remat` alone keeps only the block's inputs, but the recomputation depends on
  nothing of the backward pass, so a scheduler may run it early and the backward's weight
  gradients late: XLA:CPU then held the recomputed activations and cotangents of every block of
  a level at once (CIFAR-10: 0.7x the memory of no remat, 0.36x now). Here the block has a custom VJP that ties its
  saved inputs to the incoming cotangent (`lax.optimization_barrier`) before recomputing, and
  its input cotangent to its parameter cotangents after: the backward of the block before it
  cannot start until this block's parameter gradients exist. Same values as the plain block.

  Args:
    block_class: a linen Module class; its `__call__` arguments may have defaults.
    static_argnums: arguments of `__call__` that are Python values (counting the module as 0).
    policy: a `jax.checkpoint_policies` policy: what the backward pass keeps besides the inputs
      (None: nothing, every activation is recomputed).

  Returns:
    A subclass of `block_class` with the same fields, variables and call signature.
  """
  signature = inspect.signature(block_class.__call__)
  static = tuple(static_argnums)
  recompute = nn.remat(lambda mdl, *args: block_class.__call__(mdl, *args), static_argnums=static,
                       prevent_cse=False, policy=policy)  # the barrier in `backward` keeps XLA from merging it

  def forward(mdl, *args):
    dynamic = [i for i in range(1, len(args) + 1) if i not in static]

    def call(m, *values):
      full = list(args)
      for i, v in zip(dynamic, values):
        full[i - 1] = v
      return recompute(m, *full)

    return nn.vjp(call, mdl, *[args[i - 1] for i in dynamic])

  def backward(*nondiff_and_res):
    vjp_fn, cotangent = nondiff_and_res[-2:]
    vjp_fn, cotangent = lax.optimization_barrier((vjp_fn, cotangent))
    return lax.optimization_barrier(vjp_fn(cotangent))

  lifted = nn.custom_vjp(lambda mdl, *args: block_class.__call__(mdl, *args), forward_fn=forward,
                         backward_fn=backward, nondiff_argnums=static)

  class Sequential(block_class):
    def __call__(self, *args, **kwargs):
      bound = signature.bind(self, *args, **kwargs)
      bound.apply_defaults()
      return lifted(self, *bound.args[1:])

  Sequential.__name__ = Sequential.__qualname__ = block_class.__name__
  return Sequential


def low_precision_blocks(block_class, static_argnums=()):
  """`block_class` of a low-precision network whose backward pass keeps only the block's inputs
  and its products' low-precision results (`low_result`), and recomputes the float32 rest (norms,
  nonlinearities, sums: no convolution or matmul) from them: activation memory of bf16 size."""
  return sequential_remat(block_class, static_argnums,
                          policy=jax.checkpoint_policies.save_only_these_names(LOW_PRODUCT))


def student_block(block_class, remat: bool, dtype, static_argnums=()):
  """The block class a network uses: `remat` recomputes each block whole (`sequential_remat`);
  otherwise a low-precision `dtype` keeps only its products' results (`low_precision_blocks`)."""
  if remat:
    return sequential_remat(block_class, static_argnums)
  if dtype is not None:
    return low_precision_blocks(block_class, static_argnums)
  return block_class
