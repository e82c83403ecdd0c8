"""Times one training checkpoint save of a replicated tree on 8 fake CPU devices: Orbax given the
jax.Arrays directly (its default replica-parallel write) against `checkpoint.save`, which hands
Orbax one host copy of each replicated array.

  python experiments/bench_checkpoint_save.py [--leaves=150] [--saves=3]

The tree mimics the tiny test networks: many small arrays (params and an Adam-like copy).
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from sfd_jax import checkpoint  # noqa: E402


def replicated_tree(leaves: int):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  return {f'p{i}': jax.device_put(rng.standard_normal((i % 17 + 1, 64, 3)).astype(np.float32), sharding)
          for i in range(leaves)}


def orbax_direct(manager, step, params, opt_state):
  manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave({}), params=ocp.args.StandardSave(params),
                                             opt_state=ocp.args.StandardSave(opt_state)))


def ours(manager, step, params, opt_state):
  checkpoint.save(manager, step, params, {}, opt_state, {})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--leaves', type=int, default=150)
  parser.add_argument('--saves', type=int, default=3)
  args = parser.parse_args()
  params = replicated_tree(args.leaves)
  opt_state = {'mu': params, 'nu': params}
  print(f'{args.leaves} replicated arrays on {jax.device_count()} devices, {jax.devices()[0].platform}')
  for name, save in (('orbax, jax.Arrays', orbax_direct), ('checkpoint.save', ours)):
    manager = checkpoint.make_manager(tempfile.mkdtemp(), args.saves)
    times = []
    for step in range(args.saves):
      start = time.perf_counter()
      save(manager, step, params, opt_state)
      manager.wait_until_finished()
      times.append(time.perf_counter() - start)
    manager.close()
    print(f'{name:20s} ' + '  '.join(f'save {i}: {t:6.2f} s' for i, t in enumerate(times)))


if __name__ == '__main__':
  main()
