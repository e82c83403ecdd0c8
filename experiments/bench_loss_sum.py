"""How accurate is the float32 sum of the SFD loss map, and what would a better sum cost?

The loss of one student interval is Σ|out − target| over the batch (3072 values in the fixture,
393216 for CIFAR-10 at batch 128). Only its value changes with the summation method (the
gradient of a sum is 1 everywhere), so the candidates are compared on the same float32 L1 maps:

* A. summation error alone: the fixture's official float32 maps (|student_out − target| of all
  3 iterations × 3 intervals), each candidate vs the exact sum of the same float32 values
  (math.fsum);
* B. end to end: the maps of this port (one jitted SFD iteration per fixture latents, as
  tests/test_sfd_step.py runs it), each candidate vs the fixture's float64 rerun;
* C. cost: jitted value_and_grad of each candidate on a CIFAR-10-size map, alternated, and the
  time of one SFD iteration of the fixture network for scale.

  python experiments/bench_loss_sum.py            # A + B + C (B compiles the fixture iteration)
  python experiments/bench_loss_sum.py --skip_b   # A + C only
"""
import argparse
import math
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'


def plain(x):
  """What sfd.py did: XLA's float32 reduction."""
  return jnp.sum(x)


def per_sample(x):
  """Sum each sample, then the B sample sums."""
  return jnp.sum(jnp.sum(x, axis=tuple(range(1, x.ndim))))


def _pad_pow2(x):
  flat = x.reshape(-1)
  size = 1 << max(0, (flat.size - 1).bit_length())
  return jnp.pad(flat, (0, size - flat.size))


def pairwise(x):
  """Balanced binary tree of float32 additions (log2 n levels)."""
  s = _pad_pow2(x)
  while s.size > 1:
    s = s[0::2] + s[1::2]
  return s[0]


def compensated(x):
  """Pairwise with each level's rounding errors (TwoSum) carried and added at the end."""
  s = _pad_pow2(x)
  c = jnp.zeros_like(s)
  while s.size > 1:
    a, b = s[0::2], s[1::2]
    t = a + b
    bb = t - a
    err = (a - (t - bb)) + (b - bb)
    s, c = t, c[0::2] + c[1::2] + err
  return s[0] + c[0]


def as_loss(fn):
  """fn's value with the gradient of the plain sum (stop_gradient of the correction)."""
  def loss(x):
    p = jnp.sum(x)
    return p + jax.lax.stop_gradient(fn(x) - p)
  return loss


CANDIDATES = dict(plain=plain, per_sample=per_sample, pairwise=pairwise, compensated=compensated)


def part_a(fx):
  print('\nA. summation error on the official float32 L1 maps (vs math.fsum of the same values)')
  errs = {name: [] for name in CANDIDATES}
  errs['torch.sum'] = []
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
  for k in (1, 2, 3):
    for i in range(3):
      m = np.abs(fx[f'student_out_iter{k}'][i] - fx[f'teacher_targets_iter{k}'][i])  # NCHW float32
      exact = math.fsum(m.astype(np.float64).ravel())
      nhwc = jnp.asarray(np.moveaxis(m, 1, -1))
      for name, fn in CANDIDATES.items():
        errs[name].append(abs(float(jax.jit(fn)(nhwc)) - exact))
      if torch is not None:
        errs['torch.sum'].append(abs(float(torch.from_numpy(m).sum()) - exact))
  for name, e in errs.items():
    if e:
      print(f'  {name:12s} max {max(e):.2e}  mean {np.mean(e):.2e}')
  return errs


def part_b(fx, f64):
  print('\nB. loss sums of this port vs the float64 rerun (official float32 for comparison)')
  sys.path.insert(0, str(ROOT / 'tests'))
  from sfd_jax import networks, sfd, train  # pylint: disable=import-outside-toplevel
  from sfd_jax.config_types import DistillSettings, OptimSettings  # pylint: disable=import-outside-toplevel
  from sfd_jax.teacher import load_teacher  # pylint: disable=import-outside-toplevel
  teacher = load_teacher(FIXTURES / 'edm' / 'edm_ddpmpp_uncond.pkl')
  config = train.student_config_for(teacher.config, dropout=0.0)
  state_dict = {k.split('/', 1)[1]: fx[k] for k in fx.files if k.startswith('params_before/')}
  variables = networks.state_dict_to_variables(config, state_dict, source='params_before')
  optim, settings = OptimSettings(), DistillSettings()
  optimizer = sfd.make_optimizer(optim)
  step = sfd.make_step(sfd.Denoisers(networks.make_denoise(config), teacher.denoise), optimizer, debug=True)
  params, buffers = sfd.split_variables(variables)
  state = sfd.TrainState(params, optimizer.init(params), buffers)
  errs = {name: [] for name in CANDIDATES}
  errs['official fp32'] = []
  times = []
  for k in (1, 2, 3):
    start = time.perf_counter()
    state, metrics = step(state, teacher.params, np.moveaxis(fx[f'latents_iter{k}'], 1, -1), None,
                          jax.random.key(0), optim.lr, settings)
    debug = metrics.pop('debug')
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - start)
    for i in range(3):
      m = jnp.abs(debug['out'][i] - debug['targets'][i])
      exact = f64[f'loss_sum_iter{k}'][i]
      for name, fn in CANDIDATES.items():
        errs[name].append(abs(float(jax.jit(fn)(m)) - exact))
      errs['official fp32'].append(abs(float(fx[f'loss_sum_iter{k}'][i]) - exact))
  for name, e in errs.items():
    print(f'  {name:13s} max {max(e):.2e}  mean {np.mean(e):.2e}')
  print(f'  one SFD iteration of the fixture network (after compile): {min(times[1:]) * 1e3:.1f} ms')
  return errs


def part_c(reps):
  print('\nC. cost: jit(value_and_grad) on a [128, 32, 32, 3] L1 map, alternated, median ms')
  rng = np.random.default_rng(0)
  out = jnp.asarray(rng.normal(size=(128, 32, 32, 3)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(128, 32, 32, 3)), jnp.float32)
  fns = {name: jax.jit(jax.value_and_grad(lambda o, f=fn: as_loss(f)(jnp.abs(o - target))))
         for name, fn in CANDIDATES.items()}
  for fn in fns.values():
    jax.block_until_ready(fn(out))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(out))
      times[name].append(time.perf_counter() - start)
  for name, t in times.items():
    print(f'  {name:12s} {np.median(t) * 1e3:.2f} ms')
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--skip_b', action='store_true', help='skip the end-to-end part (no compile)')
  parser.add_argument('--reps', type=int, default=30)
  args = parser.parse_args()
  print(f'{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}')
  fx = np.load(FIXTURES / 'sfd' / 'sfd_iter_A.npz')
  f64 = np.load(FIXTURES / 'sfd' / 'sfd_iter_A_fp64.npz')
  part_a(fx)
  if not args.skip_b:
    part_b(fx, f64)
  part_c(args.reps)


if __name__ == '__main__':
  main()
