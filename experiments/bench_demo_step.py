r"""Times the demo's training step (digits teacher, batch 64, SFD at NFE 2) in steady state.

Runs against whichever sfd_jax is imported, so one machine can time two versions back to back:

  python experiments/bench_demo_step.py                                  # this checkout
  git worktree add /tmp/old 2985af7                                      # the single-program step
  PYTHONPATH=/tmp/old python experiments/bench_demo_step.py

The first iteration (all compiles) is reported apart; then `--iters` iterations are timed, and
the teacher program alone (the current step only: `step.programs.teacher`).
"""
import argparse
import importlib.util
import pathlib
import time

import jax
import numpy as np

from sfd_jax import conditions, config_types, sfd, train


def demo_config():
  try:
    from sfd_jax.demo import config  # pylint: disable=g-import-not-at-top
    return config.distill_config()
  except ImportError:  # before the demo package (2985af7): configs/demo.py of that checkout
    path = pathlib.Path(sfd.__file__).resolve().parents[1] / 'configs' / 'demo.py'
    spec = importlib.util.spec_from_file_location('demo_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--iters', type=int, default=20)
  args = parser.parse_args()
  run = config_types.from_config_dict(demo_config())
  mesh = train.make_mesh()
  models = train.load_models(run)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(models.student_variables['params'], replicated, may_alias=False)
  buffers = jax.device_put(models.student_variables.get('buffers', {}), replicated, may_alias=False)
  teacher_variables = jax.device_put(models.teacher_variables, replicated)
  optimizer = sfd.make_optimizer(run.optim)
  opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
  cfg = models.student_config
  draw = train.make_batch_fn(mesh, (run.train.batch, cfg.img_resolution, cfg.img_resolution, cfg.img_channels),
                             conditions.one_hot_labels(cfg.label_dim), run.distill.sigma_max)
  settings, key, lr = run.distill, jax.random.key(0), np.float32(run.optim.lr)
  current = hasattr(sfd, 'TrainState')
  if current:
    step = train.make_step(models, optimizer, train.step_options(run.train, jax.device_count()), mesh)
    state = [sfd.TrainState(params, opt_state, buffers)]
  else:
    step = train.make_step(models, optimizer, settings, mesh)
    state = [(params, opt_state)]

  def iterate(i):
    latents, labels = draw(jax.random.fold_in(key, i))
    drop = jax.random.fold_in(key, 1000 + i)
    if current:
      state[0], metrics = step(state[0], teacher_variables, latents, labels, drop, lr, settings)
    else:
      p, o, metrics = step(*state[0], buffers, teacher_variables, latents, labels, drop, lr)
      state[0] = (p, o)
    return metrics

  t0 = time.perf_counter()
  jax.block_until_ready(iterate(0))
  first = time.perf_counter() - t0
  for i in (1, 2):
    jax.block_until_ready(iterate(i))
  t0 = time.perf_counter()
  for i in range(3, 3 + args.iters):
    metrics = iterate(i)
  jax.block_until_ready((metrics, state[0]))
  per_iter = (time.perf_counter() - t0) / args.iters
  print(f'{"current" if current else "single-program"} step: first iteration {first:.1f} s; '
        f'{per_iter * 1000:.1f} ms/iter = {per_iter * 1000 / run.train.batch:.2f} s/kimg (batch {run.train.batch})')
  if current:
    teacher = step.programs.teacher(settings)
    latents, labels = draw(key)
    jax.block_until_ready(teacher(teacher_variables, latents, labels))
    t0 = time.perf_counter()
    for _ in range(args.iters):
      out = teacher(teacher_variables, latents, labels)
    jax.block_until_ready(out)
    print(f'teacher program alone: {(time.perf_counter() - t0) / args.iters * 1000:.1f} ms')


if __name__ == '__main__':
  main()
