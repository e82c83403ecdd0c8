r"""Per-device memory and FLOPs of the SFD step, from XLA's own accounting of the compiled programs.

Compiles (never runs) the step's programs for a real architecture with random weights given
as shapes only (`jax.eval_shape`: nothing is allocated) and prints, per device, the bytes of
the state and teacher each device holds, and `memory_analysis()` / `cost_analysis()` of the
teacher program and the student-interval program. Several devices are fake CPU devices
(`--devices=8`), so 8-way per-device figures come from one CPU.

  python experiments/step_memory.py --model=cifar10 --batch_per_device=128
  python experiments/step_memory.py --model=cifar10 --batch_per_device=128 --precision=bfloat16 --remat=block
  python experiments/step_memory.py --model=sd-v1 --devices=8 --batch_per_device=4 --shard_state

FLOPs: the teacher program's solver is a `lax.scan` whose body XLA counts once, so the teacher's
FLOPs are given as one compiled teacher forward at the batch x its NFE, (M+1)(num_steps-1); the
interval program has no loop (one micro-batch) and runs num_steps-1 times (-1 with AFS). The
FLOPs of SD's chunked attention (a lax.map) are counted from a second compile with the map
unrolled. The peak estimate adds what is resident while the bigger program runs: state + teacher
+ targets + latents + max(teacher temp, interval temp + its outputs that do not alias its inputs).
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='cifar10', choices=('cifar10', 'imagenet64', 'sd-v1', 'small'))
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices (per-device figures)')
  parser.add_argument('--batch_per_device', type=int, default=128)
  parser.add_argument('--precision', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', default='', choices=('', 'block', 'full'))
  parser.add_argument('--shard_state', action='store_true')
  parser.add_argument('--num_steps', type=int, default=4)
  parser.add_argument('--skip_teacher', action='store_true', help='only the student-interval program')
  parser.add_argument('--skip_recount', action='store_true',
                      help="sd-v1: report the interval's FLOPs as compiled (one attention chunk of four counted)")
  parser.add_argument('--shapes_only', action='store_true', help='only the state and teacher bytes (no compile)')
  return parser.parse_args()


ARGS = parse()
from sfd_jax import cpu_devices  # noqa: E402  (imports no jax)
cpu_devices.use_fake_cpu_devices(ARGS.devices)

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from sfd_jax import conditions, networks, sfd, train  # noqa: E402
from sfd_jax.config_types import DistillSettings, OptimSettings, TrainSettings  # noqa: E402

GIB = 2 ** 30
# EDM's released CIFAR-10 DDPM++ (VP) and ImageNet-64 ADM (EDM) networks.
EDM_NETWORKS = {
    'cifar10': ('VPPrecond', dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                                  decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                                  model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                                  augment_dim=9, dropout=0.13, img_resolution=32, img_channels=3, label_dim=0)),
    'imagenet64': ('EDMPrecond', dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4],
                                      num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, img_resolution=64,
                                      img_channels=3, label_dim=1000)),
}
EDM_NETWORKS['small'] = ('VPPrecond', dict(EDM_NETWORKS['cifar10'][1], model_channels=16, channel_mult=[1, 2],
                                           num_blocks=1, attn_resolutions=[8], img_resolution=16))


def abstract(fn, *args):
  """Shapes of fn(*args) (nothing allocated)."""
  return jax.eval_shape(fn, *args)


def edm_models(name):
  precond, kwargs = EDM_NETWORKS[name]
  teacher_config = networks.NetworkConfig.from_edm(precond, kwargs)
  student_config = train.student_config_for(teacher_config, dropout=-1.0)
  key = jax.random.key(0)
  teacher = abstract(networks.denoiser.initialiser(teacher_config), key)
  student = abstract(networks.denoiser.initialiser(student_config), key)
  models = train.Models(networks.make_denoise(teacher_config), teacher, student_config,
                        networks.make_denoise(student_config), student, teacher_config,
                        train.edm_family(student_config))
  return models, DistillSettings(num_steps=ARGS.num_steps)


def sd_models():
  """Stable Diffusion v1 (860M-parameter UNet, KL-f8 first stage in the student's buffers), text
  conditions `[B, 77, 768]` as the step carries them; official SD settings: sigma_min 0.1,
  sigma_max = sigma(1), the discrete schedule (rho 1)."""
  from sfd_jax.latent import model as latent_model, student as latent_student
  from sfd_jax.latent.config import resolve_arch
  from sfd_jax.latent.vp import VPDiscrete
  config = resolve_arch('sd-v1')
  vp = VPDiscrete.from_alphas_cumprod(latent_model.alphas_cumprod(config))
  raw = abstract(lambda k: latent_model.init_variables(config, k), jax.random.key(0))
  source = conditions.ConditionSource(draw=None, grid=None, variables=None)
  family = train.Family(shape=latent_student.latent_shape(config), condition=source, network_meta={},
                        decode=None, vp=vp)
  models = train.Models(latent_model.make_denoise(config, vp), raw, config,
                        latent_student.make_student_denoise(config, vp), latent_student.student_variables(raw),
                        config, family)
  settings = DistillSettings(num_steps=ARGS.num_steps, sigma_min=0.1, sigma_max=float(vp.sigma_np(1.0)),
                             schedule_type='discrete', schedule_rho=1.0)
  return models, settings


# SD's UNet attends over 4096 tokens at its 64x64 level: `sfd_jax.latent.layers.attention` runs
# those in query chunks through a lax.map, whose body XLA's cost analysis counts once. FLOPs are
# then taken from programs compiled with the map unrolled (`latent_random.count_every_chunk`; the
# memory figures stay those of the real programs). The EDM networks have no chunked attention.
CHUNKED_ATTENTION = ARGS.model == 'sd-v1'


def counted_chunks():
  if not CHUNKED_ATTENTION:
    return contextlib.nullcontext()
  import latent_random  # pylint: disable=g-import-not-at-top
  return latent_random.count_every_chunk()


def condition_shape(models, batch):
  if ARGS.model == 'sd-v1':
    return (batch, 77, models.student_config.unet.context_dim)
  label_dim = models.student_config.label_dim
  return (batch, label_dim) if label_dim else None


def with_shardings(tree, mesh, shard):
  shardings = train.state_shardings(tree, mesh, shard)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree):
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * x.dtype.itemsize
  return total


def analyse(compiled):
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(args=m.argument_size_in_bytes, out=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
              temp=m.temp_size_in_bytes, flops=float(cost.get('flops', 0.0)))


def main():
  models, settings = sd_models() if ARGS.model == 'sd-v1' else edm_models(ARGS.model)
  mesh = train.make_mesh()
  batch = ARGS.batch_per_device * ARGS.devices
  optimizer = sfd.make_optimizer(OptimSettings())
  params, buffers = sfd.split_variables(models.student_variables)
  state = sfd.TrainState(params, abstract(optimizer.init, params), buffers)
  state = with_shardings(state, mesh, ARGS.shard_state)
  teacher_vars = with_shardings(models.teacher_variables, mesh, ARGS.shard_state)
  data = NamedSharding(mesh, P(train.DATA_AXIS))
  h, w, c = train.family_of(models).shape
  latents = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32, sharding=data)
  cshape = condition_shape(models, batch)
  condition = None if cshape is None else jax.ShapeDtypeStruct(cshape, jnp.float32, sharding=data)
  opts = train.step_options(TrainSettings(batch=batch, precision=ARGS.precision, remat=bool(ARGS.remat),
                                          remat_policy=ARGS.remat or 'block'), ARGS.devices)
  sharding = jax.tree.map(lambda x: x.sharding, state) if ARGS.shard_state else None
  step = train.make_step(models, optimizer, opts, mesh, state_sharding=sharding)
  key = jax.random.key(0)
  if ARGS.shapes_only:
    print(f'SHAPES | {ARGS.model} | {ARGS.devices} | shard_state={ARGS.shard_state} | '
          f'state {per_device_bytes(state) / GIB:.2f} GiB | teacher {per_device_bytes(teacher_vars) / GIB:.2f} GiB')
    return
  lowered = step.lower(state, teacher_vars, latents, condition, key, np.float32(1e-4), settings)
  results = {}
  for name, program in lowered.items():
    if 'afs' in name or (ARGS.skip_teacher and name.startswith('teacher')):
      continue
    t0 = time.perf_counter()
    results[name] = analyse(program.compile())
    results[name]['compile_s'] = time.perf_counter() - t0
    print(f'{name}: compiled in {results[name]["compile_s"]:.0f} s', flush=True)
  # One teacher forward at the whole per-device batch: its FLOPs x the teacher's NFE.
  denoise = train.make_denoisers(models, opts.precision).teacher_low or models.teacher_denoise
  with counted_chunks():
    teacher_fwd = jax.jit(lambda v, x, c: denoise(v, x, jnp.full((x.shape[0],), 1.0), c, train=False))
    fwd = analyse(teacher_fwd.lower(teacher_vars, latents, condition).compile()) if not ARGS.skip_teacher else None
  if CHUNKED_ATTENTION and not ARGS.skip_recount:  # interval FLOPs: a second compile, every attention chunk counted
    t0 = time.perf_counter()
    with counted_chunks():
      recount = train.make_step(models, optimizer, opts, mesh, state_sharding=sharding).lower(
          state, teacher_vars, latents, condition, key, np.float32(1e-4), settings)['interval']
      results['interval']['flops'] = analyse(recount.compile())['flops']
    print(f'interval FLOPs recounted with every attention chunk in {time.perf_counter() - t0:.0f} s', flush=True)

  n_int = settings.num_steps - 1 - int(settings.afs)
  nfe = (settings.M + 1) * (settings.num_steps - 1)
  state_b, teacher_b = per_device_bytes(state), per_device_bytes(teacher_vars)
  lat_b = ARGS.batch_per_device * h * w * c * 4
  interval = results['interval']
  teacher = next((v for k, v in results.items() if k.startswith('teacher')), None)
  interval_peak = interval['temp'] + interval['out'] - interval['alias']
  peak = state_b + teacher_b + lat_b * (settings.num_steps + 1) + max(interval_peak, teacher['temp'] if teacher else 0)
  options = ' '.join(filter(None, [ARGS.precision, f'remat={ARGS.remat}' if ARGS.remat else '',
                                   'shard_state' if ARGS.shard_state else '']))
  print(f'{ARGS.model} x{ARGS.devices} devices, batch {ARGS.batch_per_device}/device, {options}; '
        f'num_steps {settings.num_steps}, teacher NFE {nfe}; jax {jax.__version__}')
  print(f'per device: state {state_b / GIB:.2f} GiB (params + Adam + buffers), teacher {teacher_b / GIB:.2f} GiB')
  print(f'interval program: args {interval["args"] / GIB:.2f} GiB, temp {interval["temp"] / GIB:.2f} GiB, '
        f'out {interval["out"] / GIB:.2f} GiB (aliased {interval["alias"] / GIB:.2f}), '
        f'{interval["flops"] / 1e12:.3f} TFLOP per interval x {n_int}')
  if teacher:
    print(f'teacher program: args {teacher["args"] / GIB:.2f} GiB, temp {teacher["temp"] / GIB:.2f} GiB, '
          f'forward {fwd["flops"] / 1e12:.3f} TFLOP x NFE {nfe}')
    total = fwd['flops'] * nfe + interval['flops'] * n_int
    print(f'FLOPs per iteration per device: {total / 1e12:.2f} TFLOP')
  print(f'peak estimate per device: {peak / GIB:.2f} GiB')
  print('ROW | ' + ' | '.join([ARGS.model, str(ARGS.devices), str(ARGS.batch_per_device), options,
                               f'{state_b / GIB:.2f}', f'{teacher_b / GIB:.2f}',
                               f'{teacher["temp"] / GIB:.2f}' if teacher else '-',
                               f'{interval["temp"] / GIB:.2f}', f'{interval["flops"] / 1e12:.3f}',
                               f'{peak / GIB:.2f}']))


if __name__ == '__main__':
  main()
