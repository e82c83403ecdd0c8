"""Times one SFD iteration (teacher trajectory + all student updates) on a real-size network.

The network is EDM's CIFAR-10 DDPM++ (VPPrecond, SongUNet, 56M parameters) with random
weights: the time of an iteration does not depend on the weight values. Reports seconds per
kimg (thousand distilled trajectories), to compare with the paper's 0.64 A100-hours for
200 kimg (= 11.5 s/kimg on one A100, official code, fp16).

  python experiments/bench_sfd_step.py                 # CIFAR-10 size, batch 128
  python experiments/bench_sfd_step.py --small --batch=8 --iters=2   # CPU smoke run
  python experiments/bench_sfd_step.py --precision=bfloat16 --batch_per_device=32 --remat
"""
import argparse
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax import conditions, networks, sfd, train
from sfd_jax.config_types import DistillSettings, OptimSettings, TrainSettings

CIFAR10_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                      decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                      model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                      augment_dim=9, dropout=0.13, img_resolution=32, img_channels=3, label_dim=0)
SMALL = dict(CIFAR10_DDPMPP, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
             img_resolution=16)


def build_models(kwargs):
  teacher_config = networks.NetworkConfig.from_edm('VPPrecond', kwargs)
  teacher_variables = networks.init_variables(teacher_config, jax.random.key(0))
  student_config = train.student_config_for(teacher_config, dropout=-1.0)
  student_variables = networks.state_dict_to_variables(
      student_config, networks.variables_to_state_dict(teacher_variables), rng=jax.random.key(1))
  return train.Models(networks.make_denoise(teacher_config), teacher_variables, student_config,
                      networks.make_denoise(student_config), student_variables, teacher_config), teacher_config


def peak_memory() -> str:
  """Peak host RSS and, where the backend reports it, peak device memory."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
  stats = jax.devices()[0].memory_stats() or {}
  device = stats.get('peak_bytes_in_use')
  return f'peak RSS {rss:.2f} GiB' + (f', peak device memory {device / 2 ** 30:.2f} GiB' if device else '')


def make_step(models, cfg, batch: int, num_steps: int, dtype: str = 'float32', batch_per_device: int = 0,
              remat: bool = False):
  """The training step for `batch` and what it runs on: (step, state holder [TrainState],
  teacher variables, draw(key) -> (latents, labels), optim settings, distill settings)."""
  settings = DistillSettings(num_steps=num_steps)
  optim = OptimSettings()
  optimizer = sfd.make_optimizer(optim)
  mesh = train.make_mesh()
  opts = train.step_options(TrainSettings(batch=batch, precision=dtype, batch_per_device=batch_per_device,
                                          remat=remat), jax.device_count())
  step = train.make_step(models, optimizer, opts, mesh)
  draw = train.make_batch_fn(mesh, (batch, cfg.img_resolution, cfg.img_resolution, cfg.img_channels),
                             conditions.unconditional(), settings.sigma_max)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params, buffers = jax.device_put(sfd.split_variables(models.student_variables), replicated)
  teacher_variables = jax.device_put(models.teacher_variables, replicated)
  state = [sfd.TrainState(params, jax.jit(optimizer.init, out_shardings=replicated)(params), buffers)]
  return step, state, teacher_variables, draw, optim, settings


def compile_step(step, state, teacher_variables, draw, optim, settings, workers: int = 1) -> dict:
  """Compiles the step's programs (`step.compile`); returns {program: seconds from the start until
  its compilation finished} and prints them."""
  key = jax.random.key(0)
  latents, labels = draw(key)
  done = step.compile(state[0], teacher_variables, latents, labels, key, optim.lr, settings, workers=workers)
  print('compiled (s from start, %d thread(s)): %s' % (workers, ', '.join(
      f'{name} {seconds:.1f}' for name, seconds in done.items())), flush=True)
  return done


def make_runner(models, cfg, batch: int, num_steps: int, dtype: str = 'float32', batch_per_device: int = 0,
                remat: bool = False, compile_workers: int = 0):
  """Builds the training step for `batch` and runs its first iteration (which compiles the teacher
  program, the AFS interval and the student interval); returns (seconds of that first iteration, run).
  With `compile_workers` > 0 the programs are compiled first by `step.compile` with that many
  threads (their finish times are printed), so the first iteration then only runs.

  `run(i)` runs iteration i, keeps the new state, and returns its metrics (not waited for).
  """
  step, state, teacher_variables, draw, optim, settings = make_step(models, cfg, batch, num_steps, dtype,
                                                                    batch_per_device, remat)
  key = jax.random.key(0)

  def run(i):
    latents, labels = draw(jax.random.fold_in(key, i))
    state[0], metrics = step(state[0], teacher_variables, latents, labels, jax.random.fold_in(key, 10_000 + i),
                             np.float32(optim.lr), settings)
    return metrics

  t0 = time.perf_counter()
  if compile_workers:
    compile_step(step, state, teacher_variables, draw, optim, settings, compile_workers)
  jax.block_until_ready(run(0))
  return time.perf_counter() - t0, run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true', help='tiny 16x16 network (CPU smoke run)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--num_steps', type=int, default=4)
  parser.add_argument('--model_channels', type=int, default=0, help='override the width (0: keep)')
  parser.add_argument('--precision', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--batch_per_device', type=int, default=0, help='micro-batch per device (0: whole batch)')
  parser.add_argument('--remat', action='store_true', help="rematerialise the student's forward pass")
  parser.add_argument('--compile_workers', type=int, default=0,
                      help='compile the programs first with step.compile on this many threads (0: on first use)')
  args = parser.parse_args()

  kwargs = dict(SMALL if args.small else CIFAR10_DDPMPP)
  if args.model_channels:
    kwargs['model_channels'] = args.model_channels
  models, cfg = build_models(kwargs)
  settings = DistillSettings(num_steps=args.num_steps)
  opts = train.step_options(TrainSettings(batch=args.batch, precision=args.precision,
                                          batch_per_device=args.batch_per_device, remat=args.remat),
                            jax.device_count())
  # The first iteration compiles the teacher program, the AFS interval and the student interval.
  first_s, run = make_runner(models, cfg, args.batch, args.num_steps, args.precision, args.batch_per_device,
                             args.remat, args.compile_workers)
  print(f'first iteration (compile + run): {first_s:.1f} s', flush=True)
  t0 = time.perf_counter()
  for i in range(1, args.iters + 1):
    metrics = run(i)
  jax.block_until_ready(metrics)
  per_iter = (time.perf_counter() - t0) / args.iters
  device = jax.devices()[0]
  print(f'device: {device.device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()}), '
        f'jax {jax.__version__}, matmul precision {jax.config.jax_default_matmul_precision}')
  print(f'network: {networks.count_params(models.student_variables):,} params, '
        f'{cfg.img_resolution}x{cfg.img_resolution}; batch {args.batch}; num_steps {args.num_steps}; '
        f'teacher NFE {(settings.M + 1) * (args.num_steps - 1)}; precision {args.precision}; '
        f'micro-batches {opts.micro_batches}; remat {args.remat}')
  print(f'first iteration (compile + run): {first_s:.1f} s; {peak_memory()}')
  print(f'iteration: {per_iter * 1000:.1f} ms  ->  {per_iter / args.batch * 1000:.2f} s/kimg  '
        f'({200 * per_iter / args.batch * 1000 / 3600:.2f} h for 200 kimg)')
  print('loss per interval:', np.asarray(metrics['loss']).round(3).tolist(),
        'redone in float32:', int(np.sum(metrics['redo'])) + int(metrics['teacher_redo']))


if __name__ == '__main__':
  main()
