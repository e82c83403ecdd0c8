"""Does compiling the step's programs first (`step.compile`) or at first call change the iteration?

Each variant runs in its own process, in the order given (default A B B A, so that a drift of
the machine's speed hits both alike): it builds the CIFAR-10-size step at batch 8
(`bench_sfd_step.make_runner`), runs the first iteration (A: after `step.compile` on one thread;
B: compiling at first call), then times `--iters` more iterations. Around each it reports wall
time, user and system CPU time and minor page faults (`getrusage`), to tell a slower program
from a busier machine.

  python experiments/ab_compile_path.py                      # A B B A, 2 iterations each
  python experiments/ab_compile_path.py --order=BA --iters=1
  python experiments/ab_compile_path.py --small --order=AB   # the tiny network (smoke run)
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = {'A': 'step.compile first', 'B': 'compiled at first call'}


def usage() -> dict:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return dict(wall=time.perf_counter(), user=r.ru_utime, sys=r.ru_stime, minflt=r.ru_minflt)


def since(before: dict) -> dict:
  return {k: v - before[k] for k, v in usage().items()}


def child(path: str, iters: int, small: bool):
  import jax
  import bench_sfd_step as bench
  models, cfg = bench.build_models(dict(bench.SMALL if small else bench.CIFAR10_DDPMPP))
  before = usage()
  _, run = bench.make_runner(models, cfg, 8, 4, compile_workers=1 if path == 'A' else 0)
  d = since(before)
  print(f'{path} first iteration: wall {d["wall"]:.1f} s (user {d["user"]:.1f}, sys {d["sys"]:.1f})', flush=True)
  for i in range(1, iters + 1):
    before = usage()
    jax.block_until_ready(run(i))
    d = since(before)
    print(f'RESULT {path} {d["wall"]:.3f} user {d["user"]:.1f} s, sys {d["sys"]:.1f} s, '
          f'{d["minflt"] / 1e6:.2f} M minor faults, load {os.getloadavg()[0]:.2f}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--order', default='ABBA', help='one process per letter: A = step.compile first, B = at first call')
  parser.add_argument('--iters', type=int, default=2, help='timed iterations per process')
  parser.add_argument('--small', action='store_true', help='tiny 16x16 network (smoke run)')
  parser.add_argument('--child', choices=tuple(PATHS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child, args.iters, args.small)
  if not args.order or set(args.order) - set(PATHS):
    parser.error(f'--order={args.order!r}: letters A and B only')
  seconds = {path: [] for path in PATHS}
  for path in args.order:
    cmd = [sys.executable, __file__, '--child', path, f'--iters={args.iters}'] + (['--small'] if args.small else [])
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    for line in out.splitlines():
      if line.startswith('RESULT'):
        _, p, wall, rest = line.split(' ', 3)
        seconds[p].append(float(wall))
        print(f'{p} ({PATHS[p]}): iteration {float(wall):.2f} s; {rest}', flush=True)
      else:
        print(line, flush=True)
  for path, values in seconds.items():
    if values:
      print(f'median {path} ({PATHS[path]}): {statistics.median(values):.2f} s over {len(values)} iterations')


if __name__ == '__main__':
  main()
