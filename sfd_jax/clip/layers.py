"""The pieces both CLIP transformers are made of, as pure JAX on state-dict-named parameters.

Weights keep torch's layout (Linear `[out, in]`), so a parameter tree is the state dict split
on '.'. Everything computes in the dtype of its input (float32; float64 under jax x64), with
full-precision products on every backend.
"""
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
LN_EPS = 1e-5


def linear(x, weight, bias=None):
  """torch's `Linear`: `x @ weight.T + bias`, weight `[out, in]`."""
  y = jnp.einsum('...i,oi->...o', x, weight.astype(x.dtype), precision=HIGHEST)
  return y if bias is None else y + bias.astype(x.dtype)


def layer_norm(x, p, eps=LN_EPS):
  """torch's `LayerNorm` over the last axis (biased variance), parameters `weight`, `bias`."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p['weight'].astype(x.dtype) + p['bias'].astype(x.dtype)


def gelu(x):
  """Exact (erf) GELU, torch's `nn.GELU()`."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  """`x * sigmoid(1.702 x)`, transformers' 'quick_gelu' (the OpenAI CLIP text encoders)."""
  return x * jax.nn.sigmoid(1.702 * x)


def causal_mask(length: int) -> np.ndarray:
  """`[L, L]` bool: True where a query may attend (keys at or before it)."""
  return np.tril(np.ones((length, length), bool))


def attention(q, k, v, heads: int, mask=None):
  """Multi-head scaled dot-product attention on `[N, L, W]` projections.

  Heads are contiguous slices of the feature axis; `mask` (`[L, L]` bool, True = attend) stands
  for torch's additive −inf mask. Returns the concatenated heads, `[N, L, W]`.
  """
  n, length, width = q.shape
  split = lambda t: t.reshape(n, length, heads, width // heads)
  q = q * np.asarray(1 / np.sqrt(width // heads), q.dtype)  # torch scales q before the product
  logits = jnp.einsum('nqhd,nkhd->nhqk', split(q), split(k), precision=HIGHEST)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('nhqk,nkhd->nqhd', weights, split(v), precision=HIGHEST).reshape(n, length, width)
