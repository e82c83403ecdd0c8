"""Sampling throughput of the SFD student at NFE 2 on the CIFAR-10 DDPM++ network.

The student (SongUNet with the step-condition layers, random weights: speed does not depend
on the values) samples with Euler over num_steps = 4 time points and the analytical first
step, i.e. 2 network evaluations per image, as `python -m sfd_jax.sample` does (batch sharded
over all local devices). Prints compile time and images per second.

  python experiments/bench_sample_student.py --batch=1024 --iters=10     # GPU
  python experiments/bench_sample_student.py --small --batch=8 --iters=2  # CPU smoke run
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_sfd_step as bench  # noqa: E402

from sfd_jax import schedules, solvers, train  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=1024)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--num_steps', type=int, default=4, help='time points; NFE = num_steps - 2 with AFS')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--small', action='store_true', help="bench_sfd_step's tiny 16x16 network (smoke run)")
  args = parser.parse_args()

  models, cfg = bench.build_models(dict(bench.SMALL if args.small else bench.CIFAR10_DDPMPP))
  mesh = train.make_mesh()  # 1 axis 'data' over all devices (Auto axis type)
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  dtype = jnp.dtype(args.dtype)
  variables = jax.device_put(jax.tree.map(lambda v: v.astype(dtype), models.student_variables), replicated)
  t_steps = jnp.asarray(schedules.get_schedule(args.num_steps, 0.006, 80.0), jnp.float32)
  shape = (args.batch, cfg.img_resolution, cfg.img_resolution, cfg.img_channels)

  @jax.jit
  def draw(key):
    return jax.lax.with_sharding_constraint(jax.random.normal(key, shape, dtype), data)

  @jax.jit
  def sample(variables, z):
    denoise = lambda x, sigma: models.student_denoise(variables, x, sigma, None,
                                                      step_condition=float(args.num_steps))
    return solvers.sample(denoise, z, t_steps, 'euler', afs=True)

  z = draw(jax.random.key(0))
  t0 = time.perf_counter()
  compiled = sample.lower(variables, z).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, z))
  t0 = time.perf_counter()
  for i in range(args.iters):
    out = compiled(variables, draw(jax.random.key(i + 1)))
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - t0) / args.iters
  result = dict(device=f'{jax.devices()[0].device_kind} x{jax.device_count()}', batch=args.batch,
                nfe=args.num_steps - 2, dtype=args.dtype, compile_s=compile_s, seconds_per_batch=seconds,
                images_per_s=args.batch / seconds, finite=bool(np.isfinite(np.asarray(out, np.float32)).all()))
  print(f"student sampling, NFE {result['nfe']}, batch {args.batch}, {args.dtype} on {result['device']}: "
        f"compile {compile_s:.1f} s, {seconds * 1000:.1f} ms/batch = {result['images_per_s']:.0f} images/s")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
