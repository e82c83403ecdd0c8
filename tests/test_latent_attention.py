"""Query-chunked attention (`latent.layers.attention` with more than `chunk` queries): the same
values and gradients as the whole `[B, H, Lq, Lk]` product within float32 reduction order, and,
by XLA's own accounting of the compiled gradient, a fraction of its memory (the weights of one
chunk at a time, recomputed in the backward pass).

Tolerances: relative to the largest magnitude, 1e-6 for outputs and 2e-6 for gradients; the
two paths differ only in how the matrix products are blocked (measured 1.2e-7 and 2.4e-7 on an
Intel Xeon, 2026-12-07).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.latent.layers import ATTENTION_CHUNK, attention

SHAPE = (2, 2048, 2, 8)  # B, L, H, D: 4 chunks of 512


def qkv(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3)]


def loss(chunk, dtype=None):
  return lambda q, k, v: jnp.sum(jnp.tanh(attention(q, k, v, 0.5, 1.0, dtype, chunk=chunk)) ** 2)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_chunked_values_and_gradients_match_whole():
  q, k, v = qkv()
  whole = attention(q, k, v, 0.5, 1.0, chunk=0)
  chunked = attention(q, k, v, 0.5, 1.0, chunk=512)
  assert chunked.shape == whole.shape
  assert rel_err(chunked, whole) < 1e-6
  g_whole = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
  g_chunk = jax.grad(loss(512), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', g_chunk, g_whole):
    assert rel_err(a, b) < 2e-6, name


def test_chunked_bfloat16_matches_whole_to_bfloat16_rounding():
  q, k, v = qkv(1)
  whole = attention(q, k, v, 0.5, 1.0, 'bfloat16', chunk=0)
  chunked = attention(q, k, v, 0.5, 1.0, 'bfloat16', chunk=512)
  assert chunked.dtype == whole.dtype == jnp.float32
  assert rel_err(chunked, whole) < 2 ** -8  # one bfloat16 ulp


@pytest.mark.parametrize('length', [ATTENTION_CHUNK, ATTENTION_CHUNK + 8])
def test_short_or_ragged_sequences_take_the_whole_product(length):
  """At most `chunk` queries, or a length `chunk` does not divide: the unchunked program, bit for bit."""
  q, k, v = qkv(2, (1, length, 1, 4))
  assert jnp.array_equal(attention(q, k, v, 0.5, 1.0), attention(q, k, v, 0.5, 1.0, chunk=0))


def test_chunking_shrinks_the_gradient_program():
  """The whole product keeps [B, H, Lq, Lk] weights for the backward pass (here 64 MiB each);
  chunks of 512 keep an eighth of one at a time."""
  q, k, v = qkv(shape=(1, 4096, 1, 8))

  def temp(chunk):
    compiled = jax.jit(jax.grad(loss(chunk), argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp(0), temp(512)
  assert whole > 64 * 2**20  # at least one whole weight matrix
  assert chunked < 0.25 * whole, (chunked, whole)
