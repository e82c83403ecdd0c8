"""Does XLA:CPU keep per-block rematerialisation? A toy answer from `memory_analysis()`.

Eight blocks of six `tanh(x @ w)` on a [4096, 512] float32 batch, gradient of the sum, with and
without `jax.checkpoint` around each block: with remat the backward pass should hold each
block's input (8 MiB each) plus one block's inside, not all 48 activations.

  python experiments/ab_remat_cpu.py
"""
import jax
import jax.numpy as jnp


def block(w, x):
  for _ in range(6):
    x = jnp.tanh(x @ w)
  return x


def loss(ws, x, remat):
  f = jax.checkpoint(block) if remat else block
  for w in ws:
    x = f(w, x)
  return jnp.sum(x)


def main():
  ws, x = [jnp.zeros((512, 512))] * 8, jnp.zeros((4096, 512))
  forward = jax.jit(lambda ws, x: loss(ws, x, False)).lower(ws, x).compile()
  print(f'{jax.devices()[0].platform}, jax {jax.__version__}: forward only: temp '
        f'{forward.memory_analysis().temp_size_in_bytes / 2 ** 20:.0f} MiB')
  for remat in (False, True):
    lowered = jax.jit(jax.grad(lambda ws, x: loss(ws, x, remat))).lower(ws, x)
    grad = lowered.compile()
    dots = grad.as_text().count(' dot(')
    lowered_dots = lowered.as_text().count('stablehlo.dot_general')
    print(f'gradient, remat per block {remat}: temp {grad.memory_analysis().temp_size_in_bytes / 2 ** 20:.0f} MiB, '
          f'{lowered_dots} dots as lowered by JAX, {dots} in the optimised program')


if __name__ == '__main__':
  main()
