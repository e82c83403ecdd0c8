"""How much of an SFD iteration is convolutions, and XLA:CPU's convolutions against torch's.

Lists every convolution of the CIFAR-10 DDPM++ student's forward pass (from its jaxpr, at the
given batch), then times each distinct shape alone, forward and backward (gradients for input
and kernel), in XLA (jax.jit, NHWC/HWIO as sfd_jax runs them) and in torch (NCHW, as the
official code runs them), alternately. One SFD iteration runs 12 teacher forwards and
2 student forward+backward passes, so its convolution time is estimated as
14 x forward + 2 x backward, summed over the network's convolutions.

  python experiments/profile_convs.py --batch=8 --reps=3
"""
import argparse
import collections
import pathlib
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_sfd_step as bench  # noqa: E402

TEACHER_FORWARDS, STUDENT_PASSES = 12, 2


def network_convs(batch, kwargs):
  """Counter of (lhs shape NHWC, rhs shape HWIO, strides, padding, groups, lhs_dilation) -> count."""
  models, cfg = bench.build_models(dict(kwargs))
  x = jnp.zeros((batch, cfg.img_resolution, cfg.img_resolution, cfg.img_channels))
  jaxpr = jax.make_jaxpr(lambda v, x: models.student_denoise(v, x, jnp.float32(1.0)))(models.student_variables, x)
  found = collections.Counter()

  def walk(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        p = eqn.params
        dn = p['dimension_numbers']
        if tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.rhs_spec) != (3, 2, 0, 1):
          raise ValueError(f'unexpected conv layout {dn}')
        found[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(p['window_strides']),
               tuple(map(tuple, p['padding'])), p['feature_group_count'], tuple(p['lhs_dilation']))] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found


def xla_fns(key):
  lhs, rhs, strides, padding, groups, lhs_dil = key
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                                   feature_group_count=groups)
  x = jax.random.normal(jax.random.key(0), lhs)
  w = jax.random.normal(jax.random.key(1), rhs) * 0.05
  fwd = jax.jit(conv)
  out = fwd(x, w)
  g = jnp.ones_like(out)
  bwd = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))  # the forward is recomputed inside: subtract it
  jax.block_until_ready((fwd(x, w), bwd(x, w, g)))
  return (lambda: jax.block_until_ready(fwd(x, w))), (lambda: jax.block_until_ready(bwd(x, w, g)))


def torch_fns(key):
  import torch
  lhs, rhs, strides, padding, groups, lhs_dil = key
  n, h, w_, c = lhs
  kh, kw, cin, cout = rhs
  x = torch.randn(n, c, h, w_)
  if lhs_dil != (1, 1):  # a stride-2 transposed convolution (the up-sampling filter)
    # XLA's form: dilate the input by 2 and pad; torch's own op is conv_transpose2d.
    wt = torch.randn(cin * groups, cout // groups, kh, kw) * 0.05  # [in, out/groups, k, k]
    pad = kh - 1 - padding[0][0]
    op = lambda x, w: torch.nn.functional.conv_transpose2d(x, w, stride=lhs_dil, padding=pad, groups=groups)
    wgt = wt
  else:
    wgt = torch.randn(cout, cin, kh, kw) * 0.05
    pad = padding[0][0]
    if padding[0][0] != padding[0][1]:
      raise ValueError(f'asymmetric padding {padding}')
    op = lambda x, w: torch.nn.functional.conv2d(x, w, stride=strides, padding=pad, groups=groups)
  xg, wg = x.clone().requires_grad_(True), wgt.clone().requires_grad_(True)

  def fwd():
    with torch.no_grad():
      op(x, wgt)

  def bwd():
    out = op(xg, wg)
    out.backward(torch.ones_like(out))
  fwd(), bwd()
  return fwd, bwd


def best_of(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--reps', type=int, default=3, help='timings per op; the best is kept')
  parser.add_argument('--small', action='store_true', help="bench_sfd_step's tiny 16x16 network (smoke run)")
  args = parser.parse_args()
  import torch
  convs = network_convs(args.batch, bench.SMALL if args.small else bench.CIFAR10_DDPMPP)
  print(f'{sum(convs.values())} convolutions per forward pass, {len(convs)} distinct shapes; '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}', flush=True)
  totals = collections.defaultdict(float)
  rows = []
  for key, count in sorted(convs.items(), key=lambda kv: -np.prod(kv[0][0]) * np.prod(kv[0][1]) * kv[1]):
    xf, xb = xla_fns(key)
    tf, tb = torch_fns(key)
    t = {}
    for _ in range(args.reps):  # alternate so that load changes hit both
      for name, fn in (('xla_f', xf), ('torch_f', tf), ('xla_b', xb), ('torch_b', tb)):
        t[name] = min(t.get(name, 1e9), best_of(fn, 1))
    # XLA's bwd program recomputes the forward (vjp inside jit); torch's bwd includes its forward too.
    for impl in ('xla', 'torch'):
      totals[impl + '_fwd'] += count * t[impl + '_f']
      totals[impl + '_bwd'] += count * t[impl + '_b']
    lhs, rhs, strides, padding, groups, lhs_dil = key
    kind = 'up' if lhs_dil != (1, 1) else ('down' if strides != (1, 1) else 'conv')
    rows.append(f'{count:3d} x {kind:4s} in {lhs} k {rhs} g{groups}: fwd xla {t["xla_f"] * 1e3:7.2f} ms torch '
                f'{t["torch_f"] * 1e3:7.2f} ms | fwd+bwd xla {t["xla_b"] * 1e3:7.2f} ms torch {t["torch_b"] * 1e3:7.2f} ms')
    print(rows[-1], flush=True)
  per_iter = {impl: (TEACHER_FORWARDS * totals[impl + '_fwd'] + STUDENT_PASSES * totals[impl + '_bwd'])
              for impl in ('xla', 'torch')}
  print(f'one forward pass, convolutions only: xla {totals["xla_fwd"]:.3f} s, torch {totals["torch_fwd"]:.3f} s')
  print(f'one forward+backward, convolutions only: xla {totals["xla_bwd"]:.3f} s, torch {totals["torch_bwd"]:.3f} s')
  print(f'per SFD iteration ({TEACHER_FORWARDS} forwards + {STUDENT_PASSES} forward+backward), convolutions only: '
        f'xla {per_iter["xla"]:.2f} s, torch {per_iter["torch"]:.2f} s (xla/torch {per_iter["xla"] / per_iter["torch"]:.2f})')


if __name__ == '__main__':
  main()
