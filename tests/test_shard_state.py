"""`config.train.shard_state`: the student's parameters, Adam moments and the teacher sharded over
the data axis (FSDP) give the replicated run's parameters, and checkpoints move between sharded
and replicated runs on any device count.

In-process runs use the tiny fixture teacher on the session's 8 fake CPU devices; the command-line
test resumes a replicated 8-device run as a sharded 4-device one.
"""
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import EDM_FIXTURES, ROOT, cli_env
from sfd_jax import checkpoint, conditions, networks, sfd, train
from sfd_jax.config_types import DistillSettings, OptimSettings
from sfd_jax.teacher import load_teacher

TEACHER = EDM_FIXTURES / 'edm_ddpmpp_uncond.pkl'
# 3 time points, M = 1, no AFS: 2 Adam steps per iteration, cheap to compile.
SMALL = dataclasses.replace(DistillSettings(), num_steps=3, M=1, afs=False)
# Adam eps 1 makes the update Lipschitz in the gradient (lr/eps), so sharding, which only changes
# float32 reduction order, moves parameters as little as it moves gradients (tests/test_sfd_step.py).
OPTIM = dataclasses.replace(OptimSettings(), lr=1e-3, eps=1.0)
# The fixture's fp32-vs-fp64 parameter gap after one iteration (fixture README), the bound
# tests/test_sfd_step.py puts on 8 devices against 1.
PARAM_TOL = 1.1e-6


def flatten(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def max_diff(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


@pytest.fixture(scope='module')
def models():
  teacher = load_teacher(TEACHER)
  config = train.student_config_for(teacher.config, dropout=0.0)
  variables = networks.state_dict_to_variables(config, networks.variables_to_state_dict(teacher.params),
                                               rng=jax.random.key(3))
  return train.Models(teacher.denoise, teacher.params, config, networks.make_denoise(config), variables,
                      teacher.config)


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), (train.DATA_AXIS,))


def run(models, mesh, shard, iters=2):
  """`iters` iterations of train.make_step on `mesh` with the state sharded or replicated."""
  optimizer = sfd.make_optimizer(OPTIM)
  host = jax.tree.map(np.array, sfd.split_variables(models.student_variables))
  state = train.place_state(mesh, *host, optimizer, shard)
  teacher_vars = jax.device_put(models.teacher_variables, train.state_shardings(models.teacher_variables, mesh, shard))
  opts = train.step_options(dataclasses.replace(train.TrainSettings(), batch=8), mesh.devices.size)
  sharding = jax.tree.map(lambda x: x.sharding, state) if shard else None
  step = train.make_step(models, optimizer, opts, mesh, state_sharding=sharding)
  draw = train.make_batch_fn(mesh, (8, 16, 16, 3), conditions.unconditional(), SMALL.sigma_max)
  for it in range(iters):
    k_batch, k_drop, _ = train.iteration_keys(jax.random.key(7), it)
    latents, condition = draw(k_batch)
    state, metrics = step(state, teacher_vars, latents, condition, k_drop, np.float32(OPTIM.lr), SMALL)
  return state, jax.device_get(metrics)


def test_fsdp_spec_shards_the_largest_divisible_axis():
  assert train.fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, 'data')
  assert train.fsdp_spec((256, 128), 8) == P('data')
  assert train.fsdp_spec((16, 16), 8) == P('data')       # a tie: the first axis
  assert train.fsdp_spec((10, 3), 8) == P()              # nothing divides: replicated
  assert train.fsdp_spec((), 8) == P()


def test_sharded_state_equals_replicated_on_eight_devices(models):
  mesh = mesh_of(8)
  replicated, m_rep = run(models, mesh, shard=False)
  sharded, m_sh = run(models, mesh, shard=True)
  # The state really is sharded, and stays so through the donated steps.
  leaves = jax.tree.leaves(sharded.params) + jax.tree.leaves(sharded.opt_state)
  split = [x for x in leaves if not x.sharding.is_fully_replicated]
  assert split and sum(x.size for x in split) > 0.9 * sum(x.size for x in leaves)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated.params))
  per_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                                if s.device == jax.devices()[0])
  assert per_device(sharded.params) < 0.2 * per_device(replicated.params)
  np.testing.assert_allclose(m_sh['loss'], m_rep['loss'], rtol=2 * 1.42e-3 / 590)
  diff = max_diff(jax.device_get(sharded.params), jax.device_get(replicated.params))
  moved = max_diff(jax.device_get(replicated.params), models.student_variables['params'])
  print(f'max |param sharded - replicated| {diff:.2e}; largest change {moved:.2e}')
  assert diff <= PARAM_TOL, diff
  assert moved > 100 * PARAM_TOL, moved  # a wrong update would show far above the tolerance


def saved_and_restored(tmp_path, state, mesh, shard):
  """Saves `state` and restores it onto templates of `mesh` (sharded or replicated)."""
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 1, state.params, state.buffers, state.opt_state, dict(nimg=8))
  manager.wait_until_finished()
  manager.close()
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  shardings = train.state_shardings(template, mesh, shard)
  template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, shardings)
  manager = checkpoint.make_manager(tmp_path)
  params, buffers, opt_state, meta = checkpoint.restore_latest(manager, template.params, template.buffers,
                                                                template.opt_state)
  manager.close()
  assert meta['nimg'] == 8
  return sfd.TrainState(params, opt_state, buffers)


@pytest.mark.parametrize('save_shard, save_devices, load_shard, load_devices',
                         [(True, 8, False, 2), (False, 2, True, 8), (True, 8, True, 4)])
def test_checkpoints_move_between_sharded_and_replicated(models, tmp_path, save_shard, save_devices, load_shard,
                                                         load_devices):
  optimizer = sfd.make_optimizer(OPTIM)
  host = jax.tree.map(np.array, sfd.split_variables(models.student_variables))
  # Moments that differ from zero, so that a mixed-up restore would show.
  state = train.place_state(mesh_of(save_devices), *host, optimizer, save_shard)
  bump = jax.jit(lambda s: s._replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, s.opt_state)),
                 out_shardings=jax.tree.map(lambda x: x.sharding, state))
  state = bump(state)
  restored = saved_and_restored(tmp_path, state, mesh_of(load_devices), load_shard)
  assert max_diff(jax.device_get(restored), jax.device_get(state)) == 0
  for x in jax.tree.leaves(restored.params):
    assert len(x.sharding.device_set) == load_devices
    assert x.sharding.spec == (train.fsdp_spec(x.shape, load_devices) if load_shard else P())


@pytest.mark.slow
def test_cli_resumes_a_replicated_run_as_a_sharded_one(tmp_path):
  """A replicated 8-device run stopped half way and resumed with `shard_state` on 4 devices ends
  where an uninterrupted replicated 2-device run ends (2 iterations, batch 8)."""
  base = [sys.executable, '-m', 'sfd_jax.main', '--config=configs/cifar10.py', f'--config.teacher={TEACHER}',
          '--config.img_resolution=16', '--config.label_dim=0', '--config.train.batch=8',
          '--config.train.kimg_per_tick=0.008', '--config.train.checkpoint_ticks=1', '--config.train.grid_size=1',
          '--config.train.dropout=0', '--config.distill.num_steps=3', '--config.distill.M=1',
          '--config.distill.afs=False', f'--config.optim.lr={OPTIM.lr}', '--config.optim.eps=1.0']
  cache = tmp_path / 'cache'

  def cli(workdir, devices, kimg, *extra):
    result = subprocess.run([*base, f'--workdir={workdir}', f'--config.train.total_kimg={kimg}', *extra], cwd=ROOT,
                            env=cli_env(devices, cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  cli(tmp_path / 'resumed', 8, 0.008)
  out = cli(tmp_path / 'resumed', 4, 0.016, '--config.train.shard_state=True')
  assert 'Resuming from' in out
  cli(tmp_path / 'straight', 2, 0.016)
  resumed = checkpoint.load_student(tmp_path / 'resumed').variables['params']
  straight = checkpoint.load_student(tmp_path / 'straight').variables['params']
  diff = max_diff(resumed, straight)
  print(f'max |param resumed sharded - straight replicated| {diff:.2e}')
  assert diff <= PARAM_TOL, diff
