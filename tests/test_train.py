"""The training loop end to end: crash-and-resume equality, checkpoints, load_student, CLI errors.

The runs use the tiny fixture teacher (16×16, 190k parameters) with batches of 4 on 2 fake
CPU devices. The three subprocess runs share a persistent compilation cache so that only the
first one pays for compiling the step.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import EDM_FIXTURES, cli_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEACHER = EDM_FIXTURES / 'edm_ddpmpp_uncond.pkl'
ITERS = 8
TINY = [
    f'--config.teacher={TEACHER}', '--config.img_resolution=16', '--config.label_dim=0',
    '--config.train.batch=4', f'--config.train.total_kimg={ITERS * 4 / 1000}',
    '--config.train.kimg_per_tick=0.004', '--config.train.checkpoint_ticks=2',
    '--config.train.grid_size=2', '--config.train.seed=3',
]


def env(cache_dir):
  return cli_env(2, cache_dir)


def command(workdir, *extra):
  return [sys.executable, '-m', 'sfd_jax.main', '--config=configs/cifar10.py', f'--workdir={workdir}', *TINY, *extra]


def run_cli(workdir, cache_dir, *extra, timeout=300):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(cache_dir), capture_output=True,
                        text=True, timeout=timeout)


def ckpt_entries(workdir):
  d = pathlib.Path(workdir) / 'checkpoints'
  return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def kill_when(workdir, cache_dir, predicate, timeout=300):
  """Starts a run and SIGKILLs it as soon as predicate(checkpoint entries) holds."""
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and proc.poll() is None:
      entries = ckpt_entries(workdir)
      if predicate(entries):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return entries
      time.sleep(0.0005)
    raise AssertionError(f'run ended before the kill point: {proc.stderr.read()[-2000:]}')
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def params_of(workdir):
  from sfd_jax.checkpoint import load_student
  config, variables, settings = load_student(workdir)
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      walk(v, f'{prefix}{k}.') if isinstance(v, dict) else flat.setdefault(prefix + k, np.asarray(v))
  walk(variables['params'], '')
  return config, flat, settings


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_cli(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_uninterrupted_run_artifacts(reference_run):
  workdir, result = reference_run
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert len(lines) == ITERS and lines[-1]['kimg'] == pytest.approx(ITERS * 4 / 1000)
  assert all(len(l['loss']) == 3 and np.all(np.isfinite(l['loss'])) for l in lines)
  assert 'sec/kimg' in result.stdout and 'loss [' in result.stdout
  assert len(list(workdir.glob('samples-*.png'))) == ITERS // 2
  config, params, settings = params_of(workdir)
  assert settings.num_steps == 4 and settings.afs and settings.sigma_min == 0.006 and settings.solver == 'euler'
  assert config.use_step_condition and config.img_resolution == 16
  assert 'model.map_step_layer0.weight' in params


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, cache_dir, reference_run):
  """Killed while checkpoint 4 is being written (2 is complete), rerun: same final params."""
  _, ref, _ = params_of(reference_run[0])
  workdir = tmp_path / 'killed'
  # Kill while Orbax writes step 4 (its temporary directory exists; step 2 is complete).
  seen = kill_when(workdir, cache_dir, lambda e: any(n.startswith('4.') and 'tmp' in n for n in e))
  assert '2' in seen and '4' not in seen
  # Restart with the same command: it resumes from step 2 and finishes.
  result = run_cli(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from' in result.stdout and 'checkpoints/2 ' in result.stdout
  assert not any('tmp' in n for n in ckpt_entries(workdir))  # the partial write was cleaned up
  _, params, _ = params_of(workdir)
  # The metrics file holds each tick once, as in the uninterrupted run.
  ref_kimg = [json.loads(l)['kimg'] for l in (reference_run[0] / 'metrics.jsonl').read_text().splitlines()]
  assert [json.loads(l)['kimg'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()] == ref_kimg
  assert params.keys() == ref.keys()
  for name in ref:
    np.testing.assert_array_equal(params[name], ref[name], err_msg=name)


@pytest.mark.parametrize('extra, expected', [
    (['--config.teacher=/nonexistent/teacher.pkl'], 'config.teacher=/nonexistent/teacher.pkl: no such file'),
    (['--config.img_resolution=32'], 'resolution 16 but config.img_resolution=32'),
    (['--config.label_dim=10'], 'label_dim 0 but config.label_dim=10'),
    (['--config.train.bogus=1'], 'unknown config key train.bogus'),
    (['--config.train.bacth=1'], 'error: unknown config key train.bacth (did you mean train.batch?)'),
    (['--config.distill.num_steps=4.7'], 'distill.num_steps'),
    (['--config.distill.sampler_tea=rk4'], "distill.sampler_tea='rk4' unknown"),
    (['--config.train.is_second_stage=True'], 'the second stage needs a first-stage SFD workdir'),
    (['--config.train.precision=fp8'], "train.precision='fp8' unknown"),
    (['--config.train.batch_per_device=3'], 'batch=4 is not divisible by 2 devices x config.train.batch_per_device=3'),
])
def test_cli_errors_are_one_line(tmp_path, cache_dir, extra, expected):
  """Bad teacher / config: exit 2 with one line on stderr, before anything is compiled."""
  start = time.time()
  result = run_cli(tmp_path / 'w', cache_dir, *extra, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0], result.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()
  assert time.time() - start < 60


def test_resume_refuses_other_settings(reference_run, cache_dir):
  """A workdir's checkpoint is not silently resumed with different distillation settings."""
  result = run_cli(reference_run[0], cache_dir, '--config.train.total_kimg=0.04', '--config.distill.M=2')
  assert result.returncode == 2
  assert 'checkpoint has distill.M=3 but the config says 2' in result.stderr.strip().splitlines()[-1]


def test_load_student_step_dir_and_missing(reference_run, tmp_path):
  from sfd_jax.checkpoint import load_student
  workdir = reference_run[0]
  steps = sorted(int(n) for n in ckpt_entries(workdir) if n.isdigit())
  assert steps[-1] == ITERS
  _, last, _ = params_of(workdir)
  _, from_dir, _ = params_of(workdir / 'checkpoints' / str(ITERS))
  _, earlier, _ = params_of(workdir / 'checkpoints' / str(steps[0]))
  for name in last:
    np.testing.assert_array_equal(last[name], from_dir[name])
  assert any(np.any(last[n] != earlier[n]) for n in last)
  with pytest.raises(FileNotFoundError, match='no complete student checkpoint'):
    load_student(tmp_path)


def test_student_exports_to_edm_state_dict(reference_run, tmp_path):
  """A student exports to a .pt with the teacher's EDM names plus the step layers."""
  from sfd_jax import checkpoint, io
  from sfd_jax.io import torch_files as torch_format
  from sfd_jax.io.edm_pickle import read_edm_snapshot
  out = tmp_path / 'student.pt'
  io.export_state_dict(checkpoint.load_student(reference_run[0]).variables, out)
  exported = torch_format.load_state_dict(out)
  teacher = read_edm_snapshot(TEACHER).state_dict
  step_names = {n for n in exported if 'map_step' in n or 'affine_step' in n}
  assert set(exported) - step_names == set(teacher) and step_names
  _, params, _ = params_of(reference_run[0])
  for name, value in params.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert any(np.any(exported[n] != teacher[n]) for n in teacher if not n.endswith('resample_filter'))


def test_student_workdir_converts_and_loads_as_teacher(reference_run, tmp_path):
  """The convert CLI exports a student workdir; load_teacher reads it (second-stage teacher)."""
  from sfd_jax import convert, teacher as teacher_lib
  from sfd_jax.io import torch_files as torch_format
  out = tmp_path / 'student.pt'
  assert convert.main([f'--src={reference_run[0]}', f'--dst={out}']) == 0
  exported = torch_format.load_state_dict(out)
  _, params, _ = params_of(reference_run[0])
  for name, value in params.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  loaded = teacher_lib.load_teacher(reference_run[0])
  assert loaded.config.use_step_condition
  x = np.zeros((1, 16, 16, 3), np.float32)
  assert np.all(np.isfinite(np.asarray(loaded.denoise(loaded.params, x, 1.0))))


def test_checkpoint_round_trips_a_student_without_buffers(tmp_path):
  """A single-level U-Net resamples nothing and embeds noise positionally: its variables have an
  empty 'buffers' collection, which must save and load like any other (exactly)."""
  import jax
  from sfd_jax import checkpoint, networks, sfd
  from sfd_jax.config_types import OptimSettings
  from sfd_jax.demo.config import TEACHER_DIR
  from sfd_jax.io import converted
  config = networks.NetworkConfig.from_dict(json.loads((TEACHER_DIR / converted.NETWORK_JSON).read_text()))
  config = config.replace_model(channel_mult=[1], attn_resolutions=[], model_channels=8)
  rng = np.random.default_rng(0)  # random values of the right shapes: no network is compiled
  shapes = networks.expected_shapes(config)
  state_dict = {name: np.float32(rng.standard_normal(shape)) for name, (_, shape) in shapes.items()}
  variables = networks.state_dict_to_variables(config, state_dict)
  params, buffers = sfd.split_variables(variables)
  assert buffers == {} and jax.tree.leaves(params)
  opt_state = sfd.make_optimizer(OptimSettings()).init(params)
  meta = dict(nimg=8, iteration=2, network=config.to_dict(), settings=dict(num_steps=4, afs=True))
  manager = checkpoint.make_manager(tmp_path, 1)
  checkpoint.save(manager, 2, params, buffers, opt_state, meta)
  manager.wait_until_finished()
  restored = checkpoint.restore_latest(manager, params, buffers, opt_state)
  manager.close()
  for got, want in zip(restored, (params, buffers, opt_state, meta)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  student = checkpoint.load_student(tmp_path)
  assert student.config == config and student.variables['buffers'] == {}
  jax.tree.map(np.testing.assert_array_equal, student.variables['params'], params)
