"""Would other formulations of three layer kinds make the CIFAR-10 step faster on XLA:CPU?

`experiments/profile_convs.py` found XLA:CPU far slower than torch on three kinds of
convolution in the DDPM++ student: the 2x2 depthwise resampling convolutions (the [1, 1] FIR
filter; up-sampling 58x slower than torch in the forward pass), and the 1x1 convolutions
(skips, attention qkv/proj; the kernel gradient 3-6x slower). This script tries, without
changing the package, two alternatives by swapping `sfd_jax.networks.layers`' private
convolution helpers while it traces:

  resample   2x2 filter, no padding: down-sampling as a reshape and a weighted sum over each
             2x2 block, up-sampling as a broadcast and a reshape (other filters unchanged)
  dot        1x1 convolutions (stride 1, no padding, one group) as a dot over channels

It compiles the teacher's forward pass and the student's training forward+backward (CIFAR-10
DDPM++, batch 8, random weights, dropout active) for each variant, prints how far each one's
outputs and gradients are from the current code, then times all variants alternately, --rounds
times, and estimates an SFD iteration as 12 teacher forwards + 2 student forward+backward passes.

  python experiments/ab_layer_paths.py --rounds=4
"""
import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bench_sfd_step as bench
from sfd_jax.networks import layers

ORIGINAL = dict(conv=layers._conv, up=layers._conv_transpose_stride2)


def conv_with_fast_paths(resample, dot):
  def conv(x, w, padding, stride=1, groups=1, dtype=None):
    n, h, w_, c = x.shape
    if (resample and stride == 2 and groups == c and w.shape == (c, 1, 2, 2) and padding == 0
        and h % 2 == 0 and w_ % 2 == 0):
      xc, wc, _ = layers._operands(x, w, dtype)
      f = wc[0, 0].astype(jnp.float32 if dtype else xc.dtype)
      blocks = xc.astype(f.dtype).reshape(n, h // 2, 2, w_ // 2, 2, c)
      return (blocks * f[None, None, :, None, :, None]).sum(axis=(2, 4))
    if dot and w.shape[2:] == (1, 1) and stride == 1 and padding == 0 and groups == 1:
      xc, wc, preferred = layers._operands(x, w, dtype)
      return lax.dot_general(xc, wc[:, :, 0, 0], (((3,), (1,)), ((), ())), preferred_element_type=preferred)
    return ORIGINAL['conv'](x, w, padding, stride, groups, dtype)
  return conv


def up_with_fast_path(x, w, padding, groups, dtype=None):
  n, h, w_, c = x.shape
  if w.shape == (c, 1, 2, 2) and padding == 0 and groups == c:
    xc, wc, _ = layers._operands(x, w, dtype)
    f = wc[0, 0].astype(jnp.float32 if dtype else xc.dtype)   # out[2i + a, 2j + b] = x[i, j] f[a, b]
    return (xc.astype(f.dtype)[:, :, None, :, None, :] * f[None, None, :, None, :, None]).reshape(n, 2 * h, 2 * w_, c)
  return ORIGINAL['up'](x, w, padding, groups, dtype)


@contextlib.contextmanager
def variant(resample, dot):
  layers._conv = conv_with_fast_paths(resample, dot)
  if resample:
    layers._conv_transpose_stride2 = up_with_fast_path
  try:
    yield
  finally:
    layers._conv, layers._conv_transpose_stride2 = ORIGINAL['conv'], ORIGINAL['up']


VARIANTS = {'current': (False, False), 'resample': (True, False), 'resample+dot': (True, True)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--small', action='store_true', help='tiny network (smoke run)')
  args = parser.parse_args()
  models, _ = bench.build_models(dict(bench.SMALL if args.small else bench.CIFAR10_DDPMPP))
  res = models.student_config.img_resolution
  x = jax.random.normal(jax.random.key(0), (args.batch, res, res, 3))
  sigma = jnp.full((args.batch,), 2.0)

  def loss(params, x):
    v = dict(models.student_variables, params=params)
    return jnp.sum(models.student_denoise(v, x, sigma, train=True, dropout_rng=jax.random.key(3)) ** 2)

  programs = {}
  for name, flags in VARIANTS.items():
    with variant(*flags):
      t0 = time.perf_counter()
      fwd = jax.jit(lambda v, x: models.teacher_denoise(v, x, sigma)).lower(models.teacher_variables, x).compile()
      t1 = time.perf_counter()
      grad = jax.jit(jax.value_and_grad(loss)).lower(models.student_variables['params'], x).compile()
      t2 = time.perf_counter()
    print(f'{name}: compile teacher forward {t1 - t0:.1f} s, student forward+backward {t2 - t1:.1f} s', flush=True)
    programs[name] = (fwd, grad)

  outs = {n: (np.asarray(f(models.teacher_variables, x)), jax.device_get(g(models.student_variables['params'], x)))
          for n, (f, g) in programs.items()}
  ref_out, (ref_loss, ref_grads) = outs['current']
  for name, (out, (loss_value, grads)) in outs.items():
    gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(ref_grads))
    print(f'{name}: max |teacher output - current| {np.abs(out - ref_out).max():.1e}, '
          f'loss {loss_value:.6f} (current {ref_loss:.6f}), max |gradient - current| {gap:.1e} '
          f'(largest gradient element {scale:.1e})')

  times = {n: ([], []) for n in programs}
  for _ in range(args.rounds):
    for name, (fwd, grad) in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(models.teacher_variables, x))
      t1 = time.perf_counter()
      jax.block_until_ready(grad(models.student_variables['params'], x))
      t2 = time.perf_counter()
      times[name][0].append(t1 - t0)
      times[name][1].append(t2 - t1)
  base = None
  for name, (f, g) in times.items():
    est = 12 * statistics.median(f) + 2 * statistics.median(g)
    base = base or est
    print(f'{name}: teacher forward {statistics.median(f) * 1e3:.0f} ms, student forward+backward '
          f'{statistics.median(g) * 1e3:.0f} ms (medians of {args.rounds}); 12 x forward + 2 x forward+backward '
          f'= {est:.1f} s ({base / est:.2f}x the current speed)')


if __name__ == '__main__':
  main()
