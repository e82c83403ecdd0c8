"""Which part of an XLA:CPU convolution's backward pass is slow, and does an im2col matmul fix it?

For a few stride-1 convolutions of the CIFAR-10 DDPM++ student (NHWC/HWIO, batch 8), times in
one process, alternately, best of --reps:
  fwd      the convolution alone (jit)
  dx       its gradient with respect to the input alone
  dw       its gradient with respect to the kernel alone, as XLA derives it (a convolution whose
           "kernel" is the activations)
  dw_mm    the same kernel gradient as one matmul over im2col patches
           (`lax.conv_general_dilated_patches` + `dot_general`)
  dw_sl    the same, with the patches built from k*k shifted slices of the padded input
           (data movement only) and ordered (kh, kw, C) so the product is HWIO at once
  torch    torch's forward and its autograd backward (both gradients), NCHW, for scale
and checks dw_mm and dw_sl against dw. Run it under different XLA_FLAGS to try XLA:CPU's other
convolution paths, e.g.
  python experiments/bench_conv_grad.py
  XLA_FLAGS=--xla_cpu_use_xnnpack=true python experiments/bench_conv_grad.py
"""
import argparse
import os

import jax
import jax.numpy as jnp
from jax import lax

from profile_convs import best_of

DN = ('NHWC', 'HWIO', 'NHWC')
# (N, H, W, Cin, Cout, k): the student's most frequent / most costly stride-1 shapes at batch 8.
SHAPES = [(8, 32, 32, 128, 128, 3), (8, 16, 16, 256, 256, 3), (8, 8, 8, 256, 256, 3),
          (8, 32, 32, 128, 128, 1), (8, 4, 4, 256, 256, 3)]


def conv(x, w):
  k = w.shape[0]
  return lax.conv_general_dilated(x, w, (1, 1), [(k // 2, k // 2)] * 2, dimension_numbers=DN)


def dw_matmul(x, g, k):
  """Kernel gradient of `conv` as patches^T @ g; HWIO."""
  c, o = x.shape[-1], g.shape[-1]
  patches = lax.conv_general_dilated_patches(x, (k, k), (1, 1), [(k // 2, k // 2)] * 2, dimension_numbers=DN)
  dw = lax.dot_general(patches.reshape(-1, c * k * k), g.reshape(-1, o), (((0,), (0,)), ((), ())))
  return dw.reshape(c, k, k, o).transpose(1, 2, 0, 3)   # patches order features as (C, kh, kw)


def dw_slices(x, g, k):
  """Kernel gradient of `conv` as one matmul over patches made of shifted slices; HWIO."""
  n, h, w, c = x.shape
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
  dw = lax.dot_general(patches.reshape(-1, k * k * c), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
  return dw.reshape(k, k, c, -1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  print(f'jax {jax.__version__}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  torch = None
  if not args.no_torch:
    import torch
  totals = {}
  for n, h, w_, ci, co, k in SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, h, w_, ci))
    w = jax.random.normal(jax.random.key(1), (k, k, ci, co)) * 0.05
    g = jax.random.normal(jax.random.key(2), (n, h, w_, co))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    dwm = jax.jit(lambda x, g: dw_matmul(x, g, k))
    dws = jax.jit(lambda x, g: dw_slices(x, g, k))
    ref = dw(x, w, g)
    err = {name: float(jnp.max(jnp.abs(ref - f(x, g))) / jnp.max(jnp.abs(ref))) for name, f in
           (('dw_mm', dwm), ('dw_sl', dws))}
    fns = {'fwd': lambda: fwd(x, w).block_until_ready(), 'dx': lambda: dx(x, w, g).block_until_ready(),
           'dw': lambda: dw(x, w, g).block_until_ready(), 'dw_mm': lambda: dwm(x, g).block_until_ready(),
           'dw_sl': lambda: dws(x, g).block_until_ready()}
    if torch is not None:
      tx = torch.randn(n, ci, h, w_)
      tw = (torch.randn(co, ci, k, k) * 0.05)
      txg, twg = tx.clone().requires_grad_(True), tw.clone().requires_grad_(True)

      def tfwd():
        with torch.no_grad():
          torch.nn.functional.conv2d(tx, tw, padding=k // 2)

      def tbwd():
        out = torch.nn.functional.conv2d(txg, twg, padding=k // 2)
        out.backward(torch.ones_like(out))
      fns['torch_fwd'], fns['torch_fwd+bwd'] = tfwd, tbwd
    for fn in fns.values():
      fn()
    t = {name: 1e9 for name in fns}
    for _ in range(args.reps):
      for name, fn in fns.items():
        t[name] = min(t[name], best_of(fn, 1))
    for name, v in t.items():
      totals[name] = totals.get(name, 0.0) + v
    print(f'{n}x{h}x{w_}x{ci} -> {co} k{k}: ' + ' '.join(f'{name} {v * 1e3:7.2f} ms' for name, v in t.items())
          + ' | vs dw, max rel diff: ' + ', '.join(f'{name} {e:.1e}' for name, e in err.items()), flush=True)
  print('sum: ' + ' '.join(f'{name} {v * 1e3:7.1f} ms' for name, v in totals.items()))


if __name__ == '__main__':
  main()
