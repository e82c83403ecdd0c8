"""Sampling a latent (LDM) student at NFE 2: the student's time against the first-stage decoder's.

The student is the teacher's UNet (SFD, no step condition; random weights, see latent_random.py)
sampling Euler over num_steps = 4 time points of the `discrete` schedule with the analytical
first step (2 UNet evaluations per image), then the VQ-f4 / KL-f8 decoder turns the latents into
images, as `python -m sfd_jax.sample --student` does. The two are compiled and timed as separate
programs (same batch), alternately, so that a change in machine load hits both alike.

  python experiments/bench_latent_sample.py --batch=64                       # LSUN-Bedroom LDM-4
  python experiments/bench_latent_sample.py --arch=tests/fixtures/ldm/ldm_bedroom_tiny.yaml --batch=64
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import latent_random  # noqa: E402

from sfd_jax import schedules, solvers  # noqa: E402
from sfd_jax.latent import student as latent_student  # noqa: E402


def flops(compiled) -> float:
  """XLA's count of floating-point operations of one call (independent of machine load)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


def timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='ldm-lsun-bedroom', help='preset or LDM yaml path')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--iters', type=int, default=2, help='timed rounds (student, then decoder)')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed runs of both programs before the timed rounds (0: the first round is timed)')
  parser.add_argument('--num_steps', type=int, default=4, help='time points; NFE = num_steps - 2 with AFS')
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--flops_only', action='store_true', help='compile and count FLOPs, time nothing')
  args = parser.parse_args()

  teacher = latent_random.random_teacher(args.arch)
  config = teacher.config
  variables = latent_student.student_variables(teacher.raw_params)
  denoise = latent_student.make_student_denoise(config, teacher.vp)
  decode = latent_student.make_student_decode(config)
  t_steps = jnp.asarray(schedules.get_schedule(args.num_steps, teacher.sigma_min, teacher.sigma_max, 'discrete', 1.0,
                                               vp=teacher.vp), jnp.float32)
  shape = (args.batch, *latent_student.latent_shape(config))
  nfe = solvers.nfe('euler', args.num_steps, True)

  @jax.jit
  def sample(variables, key):
    z = jax.random.normal(key, shape, jnp.float32)
    return solvers.sample(lambda x, sigma: denoise(variables, x, sigma, None), z, t_steps, 'euler', afs=True)

  key = jax.random.key(0)
  t0 = time.perf_counter()
  sample_c = sample.lower(variables, key).compile()
  compile_student = time.perf_counter() - t0
  latents = jax.ShapeDtypeStruct(shape, jnp.float32)
  t0 = time.perf_counter()
  decode_c = jax.jit(decode).lower(variables, latents).compile()
  compile_decoder = time.perf_counter() - t0
  # XLA's cost analysis counts a loop body once: the solver's steps are one lax.scan, so the
  # student's FLOPs are one compiled UNet evaluation times the NFE; chunked attention is a
  # lax.map, so the counted programs are compiled with it unrolled (latent_random.count_every_chunk).
  sigma = jax.ShapeDtypeStruct((args.batch,), jnp.float32)
  with latent_random.count_every_chunk():
    one_eval = jax.jit(lambda v, x, s: denoise(v, x, s, None)).lower(variables, latents, sigma).compile()
    decode_count = jax.jit(lambda v, z: decode(v, z)).lower(variables, latents).compile()  # a new trace
  gflop = dict(student=flops(one_eval) * nfe / args.batch / 1e9, decoder=flops(decode_count) / args.batch / 1e9)
  print(f"XLA's FLOP count per image: student (NFE {nfe}) {gflop['student']:.1f} GFLOP, "
        f"decoder {gflop['decoder']:.1f} GFLOP (decoder {gflop['decoder'] / sum(gflop.values()):.0%})", flush=True)
  if args.flops_only:
    return
  for _ in range(args.warmup):  # untimed runs of both
    latents = jax.block_until_ready(sample_c(variables, key))
    jax.block_until_ready(decode_c(variables, latents))
  student_s, decoder_s = [], []
  for i in range(args.iters):
    s, latents = timed(sample_c, variables, jax.random.key(i + 1))
    d, out = timed(decode_c, variables, latents)
    student_s.append(s)
    decoder_s.append(d)
    print(f'round {i}: student {s:.2f} s, decoder {d:.2f} s  (load {os.getloadavg()[0]:.1f})',
          flush=True)
  s, d = float(np.median(student_s)), float(np.median(decoder_s))
  unet = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params']))
  result = dict(arch=args.arch, device=f'{jax.devices()[0].device_kind} x{jax.device_count()}',
                cpu=platform.processor() or platform.machine(), jax=jax.__version__, batch=args.batch,
                nfe=nfe, latent=list(shape[1:]), image=list(out.shape[1:]), unet_params=unet,
                warmup=args.warmup, gflop_per_image=gflop, compile_student_s=compile_student,
                compile_decoder_s=compile_decoder, student_s=student_s, decoder_s=decoder_s, student_median_s=s, decoder_median_s=d, decoder_share=d / (s + d),
                images_per_s=args.batch / (s + d), peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                finite=bool(np.isfinite(np.asarray(out)).all()))
  print(f"{args.arch}: batch {args.batch}, NFE {result['nfe']}, latents {shape[1:]} -> images {out.shape[1:]}; "
        f"compile student {compile_student:.1f} s, decoder {compile_decoder:.1f} s; median student {s:.2f} s, "
        f"decoder {d:.2f} s (decoder {result['decoder_share']:.0%} of the time); "
        f"{result['images_per_s']:.2f} images/s; peak RSS {result['peak_rss_gib']:.1f} GiB")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
