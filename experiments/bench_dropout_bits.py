r"""Dropout masks from threefry against XLA's RngBitGenerator (`rbg`): compile and run time.

Draws a keep-mask for every dropout layer of the CIFAR-10 DDPM++ student at batch 8 (the
shapes of its residual blocks' activations) and applies it, jitted, with a threefry key and
with the rbg key `networks.dropout_key` derives from it.

  python experiments/bench_dropout_bits.py
"""
import time

import jax
import jax.numpy as jnp

from sfd_jax.networks.denoiser import dropout_key

# (count, H, W, C) of the dropped activations: 32x32 x 256 channels (5 blocks per level x 2
# encoder/decoder sides, roughly), 16x16 and 8x8 alike.
SHAPES = [(10, 32, 32, 256), (10, 16, 16, 256), (10, 8, 8, 256)]
BATCH, RATE = 8, 0.13


def masks(key, xs):
  out = []
  for i, x in enumerate(xs):
    keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - RATE, x.shape)
    out.append(jnp.sum(jnp.where(keep, x / (1 - RATE), 0)))
  return sum(out)


def main():
  xs = [jnp.ones((BATCH, h, w, c)) for n, h, w, c in SHAPES for _ in range(n)]
  key = jax.random.key(0)
  for name, make in (('threefry', lambda k: k), ('rbg', dropout_key)):
    fn = jax.jit(lambda k, xs: masks(make(k), xs))
    t0 = time.perf_counter()
    compiled = fn.lower(key, xs).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(key, xs))
    t0 = time.perf_counter()
    for i in range(5):
      out = compiled(jax.random.fold_in(key, i), xs)
    jax.block_until_ready(out)
    print(f'{name}: compile {compile_s:.2f} s, run {(time.perf_counter() - t0) / 5 * 1000:.1f} ms '
          f'({len(xs)} masks, {sum(x.size for x in xs) / 1e6:.1f}M elements)')


if __name__ == '__main__':
  main()
