"""Why `solvers` keeps an eager path: the demo's training-free baselines, two ways.

The demo evaluates 28 (solver, AFS, NFE) baselines plus two Heun references on the shipped
digits teacher. Eagerly, only the network is compiled (once) and the solver arithmetic runs
op by op around it; jitted, every (solver, NFE) pair is its own program with the network
inside a `lax.scan`. This prints the total wall time (compilation included) of each way and
the largest difference of their samples.

  python experiments/bench_eager_vs_jit_baselines.py [--samples=400]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax import load_teacher, schedules, solvers
from sfd_jax.demo import config as demo_config
from sfd_jax.demo import report


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--samples', type=int, default=400)
  args = parser.parse_args()
  teacher = load_teacher(demo_config.TEACHER_DIR)
  cfg = teacher.config
  z = jnp.asarray(report.eval_latents(args.samples, (cfg.img_resolution, cfg.img_resolution, cfg.img_channels)))
  runs = [(solver, afs, num_steps, kwargs) for _, solver, afs, _, num_steps, kwargs in report.baseline_runs((2, 3, 4, 5))]
  runs += [('heun', False, 33, {}), ('heun', False, 17, {})]
  t_of = lambda n: schedules.get_schedule(n, 0.006, 80.0)

  start = time.perf_counter()
  denoise = report.jit_denoiser(teacher.denoise, teacher.params)
  eager = [np.asarray(solvers.sample(denoise, z, t_of(n), s, afs=a, **kw)) for s, a, n, kw in runs]
  t_eager = time.perf_counter() - start

  start = time.perf_counter()
  jitted = []
  for s, a, n, kw in runs:
    fn = jax.jit(lambda v, z, s=s, a=a, n=n, kw=kw: solvers.sample(
        lambda x, sigma: teacher.denoise(v, x, sigma), z, t_of(n), s, afs=a, **kw))
    jitted.append(np.asarray(fn(teacher.params, z)))
  t_jit = time.perf_counter() - start
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(eager, jitted))
  print(f'{len(runs)} samplers, {args.samples} samples, {jax.devices()[0].device_kind}: '
        f'eager (network compiled once) {t_eager:.1f} s; jit per sampler (scan) {t_jit:.1f} s; '
        f'max |difference| {diff:.2e}')


if __name__ == '__main__':
  main()
