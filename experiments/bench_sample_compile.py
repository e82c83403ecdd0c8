"""Compile and run time of a many-step training-free sampler under jax.jit.

Heun over 35 time points (69 network evaluations) on the fixture network (EDM DDPM++,
190k parameters, 16x16), batch 4: the figure quoted in experiments/RESULTS.md.

  python experiments/bench_sample_compile.py
"""
import pathlib
import time

import jax

from sfd_jax import load_teacher, schedules, solvers

FIXTURE = pathlib.Path(__file__).parent.parent / 'tests' / 'fixtures' / 'edm' / 'edm_ddpmpp_uncond.pkl'


def main():
  teacher = load_teacher(FIXTURE)
  t_steps = schedules.get_schedule(35, 0.002, 80.0)
  z = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  fn = jax.jit(lambda v, z: solvers.sample(lambda x, s: teacher.denoise(v, x, s), z, t_steps, 'heun'))
  t0 = time.perf_counter()
  compiled = fn.lower(teacher.params, z).compile()
  t1 = time.perf_counter()
  compiled(teacher.params, z).block_until_ready()
  t2 = time.perf_counter()
  compiled(teacher.params, z).block_until_ready()
  t3 = time.perf_counter()
  print(f'{jax.devices()[0].device_kind}: heun 35 points (69 NFE), batch 4: '
        f'compile {t1 - t0:.1f} s, run {t3 - t2:.3f} s')


if __name__ == '__main__':
  main()
