"""Compile time of the student program: gradient statistics per array against one concatenation.

`sfd.sanitize_grads` counts the non-finite gradient values and takes the gradient norm (both
metrics). It reduces both from concatenations of the gradients in groups of at most
`sfd.GRAD_STATS_GROUP` values (variant `concatenated`); until 2026-12-07 from one concatenation of
all of them (`one_concatenation`: extra gradient-sized buffers); before, per parameter array, and each array added about four XLA fusions
to the student's training program (reductions, which XLA:CPU splits into reduce-window + reduce).
This script compiles the CIFAR-10-size step (`bench_sfd_step.CIFAR10_DDPMPP`, batch 8) with each
formulation, in its own process, alternating, and prints when each program finished compiling.
Parameter updates are bit-equal in both: only the metrics' summation order differs. The
diagnostic variant `sgd` replaces Adam by plain SGD and drops the gradient statistics, to show
what the optimizer's per-array arithmetic costs the compiler (not a training option); `flat_adam`
runs Adam on one flattened vector (`optax.flatten`), a formulation that was tried and not kept.
XLA's compile phases and kernel counts: set `TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=1`
(the children's stderr is passed through).

  python experiments/ab_grad_stats.py --rounds=2
  python experiments/ab_grad_stats.py --small --rounds=1 --count_fusions
  python experiments/ab_grad_stats.py --variants=per_array,sgd --rounds=1
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

VARIANTS = ('concatenated', 'one_concatenation', 'per_array', 'sgd', 'flat_adam')


def per_array_stats(grads):
  """The previous formulation: one count and one squared norm per gradient array."""
  import jax
  import jax.numpy as jnp
  import optax
  from sfd_jax import sfd
  count = sum((jnp.sum(~jnp.isfinite(g)).astype(jnp.int32) for g in jax.tree.leaves(grads)), jnp.int32(0))
  clean = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=sfd.NAN_TO, posinf=sfd.INF_TO, neginf=-sfd.INF_TO), grads)
  return clean, count, optax.tree.norm(clean)


def child(variant: str, small: bool):
  import bench_sfd_step as bench
  from sfd_jax import sfd
  if variant == 'per_array':
    sfd.sanitize_grads = per_array_stats
  if variant == 'one_concatenation':  # before groups of sfd.GRAD_STATS_GROUP values
    sfd.GRAD_STATS_GROUP = 1 << 40
  if variant == 'sgd':
    import jax.numpy as jnp
    import optax
    sfd.sanitize_grads = lambda grads: (grads, jnp.int32(0), jnp.float32(0.0))
    sfd.make_optimizer = lambda optim: optax.inject_hyperparams(optax.sgd)(learning_rate=optim.lr)
  if variant == 'flat_adam':
    import optax
    flat_adam = lambda learning_rate, b1, b2, eps: optax.flatten(optax.adam(learning_rate, b1, b2, eps))
    sfd.make_optimizer = lambda optim: optax.inject_hyperparams(flat_adam)(
        learning_rate=optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  models, cfg = bench.build_models(dict(bench.SMALL if small else bench.CIFAR10_DDPMPP))
  done = bench.compile_step(*bench.make_step(models, cfg, batch=8, num_steps=4))
  print('RESULT', json.dumps(done), flush=True)


def fusions_in_entry(dump_dir: str) -> int:
  """Fusion instructions in the entry computation of the largest optimised student program."""
  files = glob.glob(os.path.join(dump_dir, '*jit_interval_fn.cpu_after_optimizations.txt'))
  text = open(max(files, key=os.path.getsize)).read()
  entry = text[text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  return len(re.findall(r' fusion\(', entry))


def run_child(variant: str, small: bool, xla_flags: str = '') -> dict:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags).strip())
  cmd = [sys.executable, __file__, '--child', variant] + (['--small'] if small else [])
  # The child's stderr goes to ours: its errors, and XLA's logs when asked for (TF_CPP_VMODULE).
  out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout
  line = [l for l in out.splitlines() if l.startswith('RESULT')][-1]
  return json.loads(line[len('RESULT'):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--small', action='store_true', help='tiny 16x16 network (smoke run)')
  parser.add_argument('--count_fusions', action='store_true',
                      help='also dump the optimised student program once per variant (untimed) and count its fusions')
  parser.add_argument('--variants', default='concatenated,per_array',
                      help=f'comma-separated, from {", ".join(VARIANTS)}')
  parser.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child, args.small)

  variants = tuple(args.variants.split(','))
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    parser.error(f'--variants: unknown {", ".join(sorted(unknown))} (choose from {", ".join(VARIANTS)})')
  if args.count_fusions:
    for variant in variants:
      with tempfile.TemporaryDirectory() as dump:
        run_child(variant, args.small, f'--xla_dump_to={dump} --xla_dump_hlo_module_re=jit_interval_fn')
        print(f'{variant:>12}: {fusions_in_entry(dump)} fusions in the student program', flush=True)
  results = {variant: [] for variant in variants}
  for r in range(args.rounds):
    order = variants if r % 2 == 0 else variants[::-1]
    for variant in order:
      done = run_child(variant, args.small)
      results[variant].append(done)
      print(f'round {r} {variant:>12}: ' + ', '.join(f'{k} {v:.1f} s' for k, v in done.items()), flush=True)
  print('median finish times (s from the start of compilation, 1 thread):')
  for variant, runs in results.items():
    print(f'{variant:>12}: ' + ', '.join(f'{k} {statistics.median(r[k] for r in runs):.1f}' for k in runs[0]))


if __name__ == '__main__':
  main()
