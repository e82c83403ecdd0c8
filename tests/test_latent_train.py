"""SFD with a latent teacher end to end: the CLI with configs/lsun_bedroom_ldm.py on the tiny LDM
fixture (16x16x3 latents, VQ-f4 first stage, 64x64 images), 4 iterations of batch 4 on 2 fake
CPU devices, 2 micro-batches per device (`train.batch_per_device=1`); checkpoints, decoded sample
grids, load_student, crash-and-resume equality, and `python -m sfd_jax.sample --student` decoding
the student's latents. tests/test_latent_step_options.py checks that the split iteration equals
the unsplit one.

The subprocess runs share a compilation cache (as tests/test_train.py) so only the first compiles.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, cli_env, flat

ROOT = pathlib.Path(__file__).resolve().parents[1]
LDM = FIXTURES / 'ldm'
CKPT, YAML = LDM / 'ldm_bedroom_tiny.ckpt', LDM / 'ldm_bedroom_tiny.yaml'
ITERS, BATCH = 4, 4
TINY = [
    f'--config.teacher={CKPT}', f'--config.teacher_arch={YAML}', '--config.img_resolution=64',
    f'--config.train.batch={BATCH}', f'--config.train.total_kimg={ITERS * BATCH / 1000}',
    f'--config.train.kimg_per_tick={BATCH / 1000}', '--config.train.checkpoint_ticks=2',
    '--config.train.grid_size=2', '--config.train.seed=3', '--config.train.batch_per_device=1',
]


def env(cache_dir):
  return cli_env(2, cache_dir)


def command(workdir, *extra):
  return [sys.executable, '-m', 'sfd_jax.main', '--config=configs/lsun_bedroom_ldm.py', f'--workdir={workdir}',
          *TINY, *extra]


def run_cli(workdir, cache_dir, *extra, timeout=300):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(cache_dir), capture_output=True, text=True,
                        timeout=timeout)


def ckpt_entries(workdir):
  d = pathlib.Path(workdir) / 'checkpoints'
  return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope='module')
def teacher():
  from sfd_jax.teacher import load_teacher
  return load_teacher(CKPT, arch=YAML)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_cli(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_run_writes_metrics_decoded_grids_and_a_latent_student(reference_run, teacher):
  from sfd_jax.checkpoint import load_student
  from sfd_jax.latent.config import LatentConfig
  workdir, result = reference_run
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['kimg'] for l in lines] == pytest.approx([BATCH * (i + 1) / 1000 for i in range(ITERS)])
  assert all(len(l['loss']) == 3 and np.all(np.isfinite(l['loss'])) and l['nonfinite'] == 0 for l in lines)
  assert lines[0]['loss'][0] > 0 and 'loss [' in result.stdout
  grids = sorted(workdir.glob('samples-*.png'))
  assert [g.name for g in grids] == ['samples-00000002.png', 'samples-00000004.png']
  with Image.open(grids[-1]) as png:  # 2x2 decoded 64x64 images, not 16x16 latents
    assert png.size == (128, 128) and png.mode == 'RGB'
  config, variables, settings = load_student(workdir)
  assert isinstance(config, LatentConfig) and config == teacher.config
  assert (settings.schedule_type, settings.schedule_rho, settings.num_steps, settings.afs) == ('discrete', 1.0, 4, True)
  assert (settings.sigma_min, settings.sigma_max) == (teacher.sigma_min, teacher.sigma_max)
  # Params: the UNet only (trained); buffers: the first stage and DDPM table, exactly the teacher's.
  raw = flat(teacher.raw_params['params'])
  params, buffers = flat(variables['params']), flat(variables['buffers'])
  assert set(params) == {n for n in raw if n.startswith('model.diffusion_model.')}
  assert set(buffers) == {n for n in raw if n.startswith('first_stage_model.')} | {'alphas_cumprod'}
  for name, value in buffers.items():
    want = teacher.raw_params['buffers'][name] if name == 'alphas_cumprod' else raw[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
  # SFD (not SFD-v): the step-condition layers get no gradient and keep the checkpoint's values.
  nfe = [n for n in params if 'nfe' in n]
  assert nfe and all(np.array_equal(params[n], raw[n]) for n in nfe)
  moved = [n for n in params if 'nfe' not in n and not np.array_equal(params[n], raw[n])]
  assert len(moved) > len(params) // 2


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, cache_dir, reference_run):
  """Killed while checkpoint 4 is being written (2 is complete), rerun: the same student."""
  from sfd_jax.checkpoint import load_student
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline, seen = time.time() + 300, None
  try:
    while time.time() < deadline and proc.poll() is None:
      entries = ckpt_entries(workdir)
      if any(n.startswith('4.') and 'tmp' in n for n in entries):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = entries
        break
      time.sleep(0.0005)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert seen is not None, f'run ended before the kill point: {proc.stderr.read()[-2000:]}'
  assert '2' in seen and '4' not in seen
  result = run_cli(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from' in result.stdout and 'checkpoints/2 ' in result.stdout
  ref_kimg = [json.loads(l)['kimg'] for l in (reference_run[0] / 'metrics.jsonl').read_text().splitlines()]
  assert [json.loads(l)['kimg'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()] == ref_kimg
  ref, got = load_student(reference_run[0]).variables, load_student(workdir).variables
  ref, got = flat(ref), flat(got)
  assert got.keys() == ref.keys()
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


@pytest.mark.slow
def test_sample_cli_decodes_the_student_latents(reference_run, teacher, tmp_path):
  """`sample --student` PNGs equal Euler + AFS on the stored discrete schedule with the student's
  UNet, decoded by the teacher's own first stage and VP table (a second path to the images)."""
  from sfd_jax import images, sample, sampling, schedules
  from sfd_jax.checkpoint import load_student
  from sfd_jax.latent.model import make_denoise
  workdir = reference_run[0]
  argv = ['--student', str(workdir), '--seeds', '0-2', '--batch', '4', '--outdir', str(tmp_path / 'png'),
          '--npz', str(tmp_path / 'all.npz'), '--noprogress']
  assert sample.main(argv) == 0
  data = np.load(tmp_path / 'all.npz')
  assert data['arr_0'].shape == (3, 64, 64, 3)
  for seed, image in zip(data['seeds'], data['arr_0']):
    with Image.open(images.seed_path(tmp_path / 'png', int(seed))) as png:
      np.testing.assert_array_equal(np.asarray(png), image)
  student = load_student(workdir)
  unet = make_denoise(teacher.config, teacher.vp)
  variables = {'params': {**teacher.raw_params['params'], 'model': student.variables['params']['model']}}
  t_steps = schedules.get_schedule(4, teacher.sigma_min, teacher.sigma_max, 'discrete', 1.0, vp=teacher.vp)
  ref = sampling.generate(lambda v, x, s, c: unet(v, x, s), (16, 16, 3), [0, 1, 2], t_steps=t_steps, solver='euler',
                          afs=True, variables=variables, batch_size=1, devices=jax.local_devices()[:1],
                          decode_fn=teacher.decode)
  np.testing.assert_array_equal(data['arr_0'], images.to_uint8(ref))


@pytest.mark.slow
def test_sfdv_run_trains_the_step_condition(tmp_path, cache_dir, teacher):
  """SFD-v through the CLI (one iteration): num_steps drawn from 4..7, the step-condition layers
  get gradients, and the student is stored as an SFD-v student."""
  from sfd_jax.checkpoint import load_student
  workdir = tmp_path / 'sfdv'
  # Seed 1 draws num_steps 4 first: the teacher program is the SFD run's (compiled once, cached).
  result = run_cli(workdir, cache_dir, '--config.distill.use_step_condition=True', '--config.train.seed=1',
                   f'--config.train.total_kimg={BATCH / 1000}', '--config.train.grid_size=1')
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert len(line['loss']) == 3 and np.all(np.isfinite(line['loss']))
  config, variables, settings = load_student(workdir)
  assert settings.use_step_condition and settings.schedule_type == 'discrete'
  raw, params = flat(teacher.raw_params['params']), flat(variables['params'])
  nfe = [n for n in params if 'nfe' in n]
  assert nfe and all(not np.array_equal(params[n], raw[n]) for n in nfe)


@pytest.mark.parametrize('extra, expected', [
    (['--config.teacher_arch='], 'needs --config.teacher_arch'),
    (['--config.distill.sigma_max=80'], 'config.distill.sigma_max=80.0 but the latent teacher'),
    (['--config.img_resolution=256'], 'resolution 64 but config.img_resolution=256'),
])
def test_cli_errors_are_one_line(tmp_path, cache_dir, extra, expected):
  result = run_cli(tmp_path / 'w', cache_dir, *extra, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0], result.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_sample_cli_sfdv_latent_student_takes_num_steps(teacher, tmp_path):
  """An SFD-v latent student (a checkpoint written with the training helpers) samples any num_steps,
  fed to its UNet as the step condition: same images as the second path with step_condition=5,
  other images than without it."""
  from sfd_jax import checkpoint, images, sample, sampling, schedules
  from sfd_jax.config_types import SamplingSettings
  from sfd_jax.latent.config import config_to_dict
  from sfd_jax.latent.model import make_denoise
  from sfd_jax.latent.student import student_variables
  variables = student_variables(teacher.raw_params)
  settings = SamplingSettings(num_steps=4, schedule_type='discrete', schedule_rho=1.0, afs=True,
                              sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, use_step_condition=True)
  manager = checkpoint.make_manager(tmp_path / 'run')
  checkpoint.save(manager, 1, variables['params'], variables['buffers'], {'count': np.zeros((), np.int32)},
                  dict(latent_network=config_to_dict(teacher.config), settings=settings.to_dict()))
  manager.wait_until_finished()
  manager.close()
  out = tmp_path / 's.npz'
  assert sample.main(['--student', str(tmp_path / 'run'), '--seeds', '5,6', '--num_steps', '5', '--batch', '8',
                      '--npz', str(out), '--noprogress']) == 0
  unet = make_denoise(teacher.config, teacher.vp)
  t_steps = schedules.get_schedule(5, teacher.sigma_min, teacher.sigma_max, 'discrete', 1.0, vp=teacher.vp)

  def images_with(step_condition):
    den = lambda v, x, s, c: unet(v, x, s, step_condition=step_condition)
    return images.to_uint8(sampling.generate(den, (16, 16, 3), [5, 6], t_steps=t_steps, solver='euler', afs=True,
                                             variables=teacher.raw_params, batch_size=8, decode_fn=teacher.decode))
  got = np.load(out)['arr_0']
  np.testing.assert_array_equal(got, images_with(5))
  assert np.mean(got != images_with(None)) > 0.1


def test_converted_teacher_directory_takes_no_arch(tmp_path, cache_dir):
  """A converted latent teacher names its own architecture: the config's preset is refused in one line."""
  from sfd_jax.latent.teacher import convert_latent_teacher
  converted = tmp_path / 'converted'
  convert_latent_teacher(CKPT, converted, arch=YAML)
  result = run_cli(tmp_path / 'w', cache_dir, f'--config.teacher={converted}', timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'names its own architecture; pass --config.teacher_arch= (empty)' in lines[0], lines
