"""Adam per parameter array against Adam over same-shape stacks: compile time, run time, equality.

The CIFAR-10 student's optimizer update (487 arrays, 21 distinct shapes) compiles in about 8 s
on a 2-core CPU, a quarter of the student program. This asks whether updating each group of
same-shape arrays as one stacked array (optax's own Adam on the stacks, then unstacked, so the
checkpoint layout stays per array) compiles faster. Both variants run optax's arithmetic on the
same elements, so their results must be bit-equal; the script checks that.

  python experiments/ab_adam_grouping.py            # CIFAR-10 DDPM++ student
  python experiments/ab_adam_grouping.py --small    # the tiny 16x16 network (smoke run)
"""
import argparse
import collections
import sys
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_sfd_step as bench  # noqa: E402

from sfd_jax import sfd  # noqa: E402
from sfd_jax.config_types import OptimSettings  # noqa: E402


def shape_groups(leaves) -> list:
  """Indices of the leaves, grouped by (shape, dtype), in order of first appearance."""
  groups = collections.defaultdict(list)
  for i, leaf in enumerate(leaves):
    groups[(leaf.shape, str(leaf.dtype))].append(i)
  return list(groups.values())


def make_variants(optimizer, params):
  """{name: update(params, opt_state, grads, lr) -> (params, opt_state)}."""
  leaves, treedef = jax.tree.flatten(params)
  groups = shape_groups(leaves)

  def stack(tree):
    parts = jax.tree.leaves(tree)
    return [jnp.stack([parts[i] for i in group]) for group in groups]

  def unstack(stacks):
    parts = [None] * len(leaves)
    for group, stacked in zip(groups, stacks):
      for j, i in enumerate(group):
        parts[i] = stacked[j]
    return jax.tree.unflatten(treedef, parts)

  def map_moments(opt_state, fn):
    adam = opt_state.inner_state[0]
    return opt_state._replace(inner_state=(adam._replace(mu=fn(adam.mu), nu=fn(adam.nu)),)
                              + tuple(opt_state.inner_state[1:]))

  def per_array(params, opt_state, grads, lr):
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def grouped(params, opt_state, grads, lr):
    stacked_params, stacked_state = per_array(stack(params), map_moments(opt_state, stack), stack(grads), lr)
    return unstack(stacked_params), map_moments(stacked_state, unstack)

  return dict(per_array=per_array, grouped=grouped), len(groups)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true', help="bench_sfd_step's tiny 16x16 network")
  parser.add_argument('--runs', type=int, default=3, help='timed updates per variant after compiling')
  args = parser.parse_args()
  models, _ = bench.build_models(dict(bench.SMALL if args.small else bench.CIFAR10_DDPMPP))
  params, _ = sfd.split_variables(models.student_variables)
  optimizer = sfd.make_optimizer(OptimSettings())
  opt_state = optimizer.init(params)
  variants, num_groups = make_variants(optimizer, params)
  print(f'{len(jax.tree.leaves(params))} parameter arrays, {num_groups} distinct shapes', flush=True)
  key = jax.random.key(0)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.fold_in(key, p.size), p.shape), params)
  lr = np.float32(OptimSettings().lr)
  after_two = {}
  for name, update in variants.items():
    t0 = time.perf_counter()
    compiled = jax.jit(update).lower(params, opt_state, grads, lr).compile()
    compile_s = time.perf_counter() - t0
    state = compiled(*compiled(params, opt_state, grads, lr), grads, lr)  # two Adam steps
    after_two[name] = jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.runs):
      out = compiled(*state, grads, lr)
    jax.block_until_ready(out)
    print(f'{name:9s}: compile {compile_s:5.1f} s, update {(time.perf_counter() - t0) / args.runs * 1000:6.0f} ms',
          flush=True)
  equal = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), *after_two.values()))
  print(f'params and optimizer state bit-equal after two steps: {all(equal)}')


if __name__ == '__main__':
  main()
