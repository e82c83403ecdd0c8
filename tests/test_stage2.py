"""The second stage: teacher checks, the Euler student teacher, the LPIPS term on the last
interval only, one iteration against its float64 rerun, and both stages end to end.

These run on the shipped 8x8 digits teacher with batches of 2: LPIPS compares the images
upsampled to 224x224, which dominates the cost on CPU. The engine's options (bf16, micro-batches,
several devices) are checked at the end on a toy denoiser with narrow LPIPS weights.
"""
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.demo import config as demo_config
from sfd_jax import checkpoint, config_types, cpu_devices, lpips, networks, sfd, stage2, train
from sfd_jax.teacher import load_teacher
from test_step_options import ACCUM_GRAD_RTOL, BF16_LOSS_RTOL, LOSS_SUM_RTOL

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(demo_config.TEACHER_DIR)


def first_stage_workdir(path, num_steps=7, use_step_condition=False, afs=True, seed=0):
  """A first-stage student checkpoint as `train` writes it (the digits teacher's weights,
  fresh step-condition layers; no training needed to exercise the second stage)."""
  teacher = load_teacher(DIGITS)
  config = train.student_config_for(teacher.config, 0.0)
  variables = networks.state_dict_to_variables(
      config, networks.variables_to_state_dict(teacher.params), rng=jax.random.key(seed), source=DIGITS)
  distill = config_types.DistillSettings(num_steps=num_steps, afs=afs, use_step_condition=use_step_condition)
  optimizer = sfd.make_optimizer(config_types.OptimSettings())
  manager = checkpoint.make_manager(path, 1)
  meta = dict(nimg=0, iteration=1, kimg=0.0, rng_key_data=[0, 0], network=config.to_dict(),
              settings=distill.sampling().to_dict(), distill=dataclasses.asdict(distill), dataset_name='digits')
  checkpoint.save(manager, 1, variables['params'], variables['buffers'], optimizer.init(variables['params']), meta)
  manager.wait_until_finished()
  manager.close()
  return str(path)


def stage2_run(teacher, **train_overrides):
  config = dict(teacher=teacher, dataset_name='digits', distill=dict(num_steps=3, M=2, afs=True),
                optim=dict(lr=5e-4), train=dict(batch=2, is_second_stage=True, dropout=0.0, **train_overrides))
  return config_types.from_config_dict(config)


@pytest.fixture(scope='module')
def sfd_teacher(tmp_path_factory):
  return first_stage_workdir(tmp_path_factory.mktemp('n7') / 'w')


@pytest.fixture(scope='module')
def sfdv_teacher(tmp_path_factory):
  return first_stage_workdir(tmp_path_factory.mktemp('v') / 'w', num_steps=4, use_step_condition=True, afs=False)


def test_refuses_teachers_without_a_7_point_euler_trajectory(tmp_path, sfd_teacher):
  n4 = first_stage_workdir(tmp_path / 'n4', num_steps=4)
  with pytest.raises(ValueError, match=r'^config.teacher=.*n4: trained with num_steps=4, so it cannot give the '
                                       r'7-point Euler trajectory') as e:
    stage2.prepare(stage2_run(n4))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='needs a first-stage SFD workdir'):
    stage2.prepare(stage2_run(DIGITS))
  with pytest.raises(ValueError, match='SFD-v teacher covers num_steps 4..7, not the 9-point'):
    stage2.check_teacher('w', dict(num_steps=4, use_step_condition=True), 9)
  with pytest.raises(ValueError, match='already a second-stage'):
    stage2.check_teacher('w', dict(num_steps=3, use_step_condition=False, second_stage=True), 7)
  stage2.check_teacher('w', dict(num_steps=7, use_step_condition=False), 7)
  stage2.check_teacher('w', dict(num_steps=5, use_step_condition=True), 7)


def test_settings_inherit_the_teachers_schedule_and_step_condition(sfdv_teacher):
  logged = []
  run = stage2_run(sfdv_teacher)
  run = dataclasses.replace(run, distill=dataclasses.replace(run.distill, schedule_rho=5.0))
  s = stage2.prepare(run, logged.append)
  d = s.run.distill
  assert (d.num_steps, d.M, d.afs, d.sampler_tea, d.use_step_condition) == (3, 2, True, 'euler', True)
  assert d.schedule_rho == 7.0 and d.sigma_min == 0.006
  assert logged == ['second stage: schedule taken from the teacher (distill.schedule_rho=5.0 -> 7.0)']
  assert stage2.sampling_settings(d) == dict(d.sampling().to_dict(), second_stage=True)
  assert s.loss_params is not None and s.last_interval_loss is stage2.lpips_last_interval_loss
  assert stage2.prepare(stage2_run(sfdv_teacher, lpips=False)).loss_params is None


@pytest.mark.parametrize('teacher_kind', ['sfd', 'sfdv'])
def test_teacher_targets_are_the_euler_trajectory_of_the_student(teacher_kind, sfd_teacher, sfdv_teacher):
  """Independent path: sfd_jax.solvers.sample with Euler, the teacher's AFS and step condition 7."""
  from sfd_jax import schedules, solvers
  path = sfd_teacher if teacher_kind == 'sfd' else sfdv_teacher
  s = stage2.prepare(stage2_run(path, lpips=False))
  models = train.load_models(s.run)
  config, variables, stored = checkpoint.load_student(path)
  stored = stored.to_dict()
  plan = sfd.make_plan(s.run.distill)
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  targets, traj = s.targets_fn(models.teacher_denoise, models.teacher_variables, 80.0 * z, None, plan,
                               s.run.distill)
  t7 = schedules.get_schedule(7, stored['sigma_min'], stored['sigma_max'], stored['schedule_type'], stored['schedule_rho'])
  condition = 7.0 if stored['use_step_condition'] else None
  denoise = networks.make_denoise(config)
  expected = solvers.sample(lambda x, sigma: denoise(variables, x, sigma, step_condition=condition), z, t7,
                            'euler', afs=stored['afs'], return_trajectory=True)
  assert traj.shape[0] == 7 and plan.tea_slice == (3, 6)
  # float32: the latents reach the solver as (80 z) / 80 · 80 here and z · 80 there (a few ulps).
  np.testing.assert_allclose(traj, expected, rtol=1e-6, atol=2e-5)
  np.testing.assert_array_equal(targets, traj[jnp.asarray([3, 6])])
  if teacher_kind == 'sfdv':  # the step condition matters: without it the trajectory differs
    plain = solvers.sample(lambda x, sigma: denoise(variables, x, sigma), z, t7, 'euler', afs=False,
                           return_trajectory=True)
    assert np.abs(plain[-1] - expected[-1]).max() > 1e-3


def iteration_step(models, s, **kw):
  """`run(settings, params, opt_state, buffers, teacher_variables, latents, loss_params)`: one
  debug iteration of one `sfd.make_step` (its programs compile once) → (params, opt_state,
  metrics, debug)."""
  step = sfd.make_step(sfd.Denoisers(models.student_denoise, models.teacher_denoise), sfd.make_optimizer(s.run.optim),
                       targets_fn=s.targets_fn, debug=True, **kw)

  def run(settings, params, opt_state, buffers, teacher_variables, latents, loss_params):
    # A copy: the step donates its state, and the callers reuse theirs.
    state = jax.tree.map(jnp.copy, sfd.TrainState(params, opt_state, buffers))
    state, metrics = step(state, teacher_variables, latents, None, jax.random.key(2), jnp.float32(5e-4), settings,
                          loss_params)
    debug = metrics.pop('debug')
    return state.params, state.opt_state, metrics, debug
  return run


def iteration(models, s, settings, params, opt_state, buffers, teacher_variables, latents, loss_params, **kw):
  """One debug iteration of a new `sfd.make_step`: (params, opt_state, metrics, debug)."""
  return iteration_step(models, s, **kw)(settings, params, opt_state, buffers, teacher_variables, latents, loss_params)


@pytest.mark.slow
def test_lpips_enters_the_last_interval_only(sfd_teacher):
  """num_steps 4, M 1 (also a 7-point teacher), no AFS: three intervals with Adam steps each.

  One step program runs twice: with LPIPS weights, and with the same weights whose linear layers
  are zero (an LPIPS term of exactly 0). The weights are 8 channels wide (`narrow_lpips_params`):
  where the term enters does not depend on them. The real VGG16 weights are used by the float64
  rerun below, the end-to-end run and tests/test_lpips.py."""
  run = stage2_run(sfd_teacher)
  run = dataclasses.replace(run, distill=dataclasses.replace(run.distill, num_steps=4, M=1, afs=False))
  s = stage2.prepare(run)
  loss_params = narrow_lpips_params(np.random.default_rng(7))
  assert jax.tree.structure(loss_params) == jax.tree.structure(s.loss_params)
  zero_term = dict(loss_params, lin=jax.tree.map(np.zeros_like, loss_params['lin']))
  models = train.load_models(s.run)
  params, buffers = sfd.split_variables(models.student_variables)
  opt_state = sfd.make_optimizer(s.run.optim).init(params)
  latents = 80.0 * jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  step = iteration_step(models, s, last_interval_loss=s.last_interval_loss)
  args = (s.run.distill, params, opt_state, buffers, models.teacher_variables, latents)
  _, _, plain, dbg_plain = step(*args, zero_term)
  _, _, with_lpips, dbg = step(*args, loss_params)
  for i in (0, 1):  # identical: same losses, gradients and outputs
    assert with_lpips['loss'][i] == plain['loss'][i]
    jax.tree.map(np.testing.assert_array_equal, dbg['grads'][i], dbg_plain['grads'][i])
    np.testing.assert_array_equal(dbg['out'][i], dbg_plain['out'][i])
  out, target = dbg['out'][2], dbg['targets'][2]
  np.testing.assert_array_equal(out, dbg_plain['out'][2])
  term = float(jax.jit(lpips.second_stage_lpips)(loss_params, out, target))
  assert term > 1e-3
  np.testing.assert_allclose(with_lpips['loss'][2] - plain['loss'][2], term * out.size / 2, rtol=1e-5)
  differs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), dbg['grads'][2], dbg_plain['grads'][2])
  assert max(jax.tree.leaves(differs)) > 1e-3


# float32 vs the float64 rerun of the same second-stage iteration, measured on CPU (2026-12-02):
# teacher trajectory 1.5e-5 abs (1 ulp of its largest values, ~170), student output 7.5e-7 abs,
# loss 3.1e-8 relative (4.7e-7 after the step was split into programs: another float32
# summation order; the loss is now checked against its float32 error bound below), gradients 2.1e-5 of each tensor's max, params after Adam 3.6e-8 abs
# (~1 ulp of O(0.5) weights). Tolerances: 4 ulps of the trajectory's largest value, and ~3-5x
# the other measured gaps.
OUT_TOL, GRAD_REL_TOL, PARAM_TOL = 3e-6, 6e-5, 2e-7


@pytest.mark.slow
def test_iteration_equals_its_float64_rerun(sfd_teacher):
  s = stage2.prepare(stage2_run(sfd_teacher))
  models = train.load_models(s.run)
  params, buffers = sfd.split_variables(models.student_variables)
  latents = 80.0 * jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
  kw = dict(last_interval_loss=s.last_interval_loss)

  def run(cast):
    p, b, tv, lp = (jax.tree.map(cast, t) for t in (params, buffers, models.teacher_variables, s.loss_params))
    opt_state = sfd.make_optimizer(s.run.optim).init(p)
    new_params, _, metrics, debug = iteration(models, s, s.run.distill, p, opt_state, b, tv, cast(latents), lp, **kw)
    return jax.tree.map(lambda a: np.asarray(a, np.float64) if a is not None else None,
                        (new_params, metrics, debug))

  p32, m32, d32 = run(lambda a: jnp.asarray(a, jnp.float32))
  with jax.enable_x64(True):
    p64, m64, d64 = run(lambda a: jnp.asarray(a, jnp.float64))
  assert d64['trajectory'].dtype == np.float64
  gaps = dict(traj=np.abs(d32['trajectory'] - d64['trajectory']).max(),
              out=np.abs(d32['out'][1] - d64['out'][1]).max())
  # Each interval's loss Σ|out − target| / B may differ from its float64 rerun by no more than its
  # inputs do (triangle inequality) plus float32 summation rounding (n·u·Σ, u = 2^-24), plus, on
  # the last interval, the LPIPS term's own float32 gap (n·|Δ mean LPIPS|/B, at most 2e-6 of the loss).
  batch, n = latents.shape[0], latents.size
  loss_slack = []
  for i in range(len(m64['loss'])):
    inputs = (np.abs(d32['out'][i] - d64['out'][i]).sum() + np.abs(d32['targets'][i] - d64['targets'][i]).sum()) / batch
    bound = inputs + n * 2.0 ** -24 * abs(m64['loss'][i]) + (2e-6 * abs(m64['loss'][i]) if i == len(m64['loss']) - 1 else 0)
    loss_slack.append(abs(m32['loss'][i] - m64['loss'][i]) / bound)
  gaps['loss'] = max(loss_slack)
  g32, g64 = jax.tree.leaves(d32['grads'][0]), jax.tree.leaves(d64['grads'][0])
  gaps['grad'] = max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30) for a, b in zip(g32, g64))
  # Adam's first step is lr·sign(g) where |g| ≫ eps: compare where the float64 gradient is clear of noise.
  clear = [np.abs(b) > 1e-3 * np.abs(b).max() for b in g64]
  gaps['param'] = max(np.abs(a - b)[c].max() for a, b, c in
                      zip(jax.tree.leaves(p32), jax.tree.leaves(p64), clear) if c.any())
  print('float32 vs float64 gaps:', {k: float(v) for k, v in gaps.items()})
  traj_tol = 4 * float(np.spacing(np.float32(np.abs(d64['trajectory']).max())))
  assert gaps['traj'] < traj_tol and gaps['out'] < OUT_TOL and gaps['loss'] <= 1.0
  assert gaps['grad'] < GRAD_REL_TOL and gaps['param'] < PARAM_TOL
  assert m64['loss'][1] > 0 and len(d64['grads']) == 1  # AFS interval 0 takes no Adam step


def cli_env():
  e = dict(os.environ)
  e.update(XLA_FLAGS=cpu_devices.xla_flags(os.environ.get('XLA_FLAGS', ''), num_devices=2), JAX_PLATFORMS='cpu',
           PYTHONPATH=str(ROOT))
  return e


def cli(*args, timeout=900):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_both_stages_end_to_end_and_sample_without_flags(tmp_path):
  """Digits teacher → first stage (num_steps 7) → second stage (1 NFE, LPIPS) on 2 devices → sample."""
  w1, w2 = tmp_path / 'stage1', tmp_path / 'stage2'
  tiny = ['--config.train.batch=2', '--config.train.total_kimg=0.004', '--config.train.kimg_per_tick=0.002',
          '--config.train.checkpoint_ticks=2', '--config.train.grid_size=2']
  r = cli('sfd_jax.main', '--config=configs/demo.py', f'--workdir={w1}', '--config.distill.num_steps=7', *tiny)
  assert r.returncode == 0, r.stderr[-3000:]
  r = cli('sfd_jax.main', '--config=configs/demo_stage2.py', f'--workdir={w2}', f'--config.teacher={w1}', *tiny)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'loss' in r.stdout
  config, variables, stored = checkpoint.load_student(w2)
  assert stored.second_stage and stored.num_steps == 3 and stored.afs  # 1 NFE
  lines = [json.loads(l) for l in (w2 / 'metrics.jsonl').read_text().splitlines()]
  assert len(lines) == 2 and len(lines[-1]['loss']) == 2
  # The student moved away from its teacher.
  _, teacher_vars, _ = checkpoint.load_student(w1)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), variables['params'], teacher_vars['params'])
  assert max(jax.tree.leaves(moved)) > 1e-4
  grid = tmp_path / 'grid.png'
  r = cli('sfd_jax.sample', f'--student={w2}', '--seeds=0-3', f'--grid={grid}', '--noprogress')
  assert r.returncode == 0, r.stderr[-3000:]
  assert grid.is_file()
  r = cli('sfd_jax.sample', f'--student={w2}', '--seeds=0-3', f'--grid={grid}', '--num_steps=4')
  assert r.returncode == 2 and 'second-stage 1-NFE model' in r.stderr


# ---------------------------------------------------------------------------------------------
# The engine's options in the second stage: train.precision=bfloat16, train.batch_per_device
# (micro-batches) and several devices, each combined with the Euler student teacher
# (`stage2.make_targets_fn`) and the LPIPS term of the last interval. The networks' own bf16 and
# accumulation arithmetic is tested on the fixture U-Net by tests/test_step_options.py, whose
# stated tolerances these tests reuse; what is new here is how the second stage's two hooks
# meet those options. So the networks are a toy convolutional denoiser (it compiles in a fraction
# of a second; the gradient of the smallest SongUNet takes ~5 s) and the hook is sfd_jax's own
# LPIPS term, resize to 224x224 included, with random VGG weights 8 channels wide (same code,
# ~1/60 of the cost).

# A 7-point Euler teacher and three intervals: 0 AFS, 1 Adam, 2 Adam + LPIPS.
OPTIONS_SETTINGS = config_types.DistillSettings(num_steps=4, M=1, afs=True, sampler_tea='euler')
OPTIONS_BATCH = 8
# One float32 teacher trajectory against another computed on fewer rows: ~16 float32 unit
# roundoffs (2^-24) of the largest target value, 2.5x the measured 3.9e-7.
TARGETS_RTOL = 1e-6


def conv_denoise(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None, *,
                 train=False, dropout_rng=None, dtype=jnp.float32):
  """EDM-preconditioned two-layer convolution: images of a batch never mix. `dtype` is the
  convolutions' operand precision, with float32 results (as the networks' bfloat16 mode)."""
  del class_labels, augment_labels, step_condition, train, dropout_rng
  p = variables['params']
  conv = lambda h, k: jax.lax.conv_general_dilated(h.astype(dtype), k.astype(dtype), (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                                   preferred_element_type=jnp.float32)
  s2 = sigma ** 2 + 0.25
  h = jnp.tanh(conv(x / jnp.sqrt(s2), p['k0']) + p['b0'] * jnp.log(sigma) / 4)
  return 0.25 / s2 * x + 0.5 * sigma / jnp.sqrt(s2) * conv(h, p['k1'])


CONV_DENOISERS = sfd.Denoisers(conv_denoise, conv_denoise, functools.partial(conv_denoise, dtype=jnp.bfloat16),
                               functools.partial(conv_denoise, dtype=jnp.bfloat16))


def conv_params(rng, channels=8):
  # numpy draws: each jax.random.normal shape is one more compilation (~1 s on a loaded CPU).
  return {'k0': np.float32(rng.standard_normal((3, 3, 3, channels)) / np.sqrt(27.0)),
          'b0': np.float32(rng.standard_normal(channels)),
          'k1': np.float32(rng.standard_normal((3, 3, channels, 3)) / np.sqrt(9.0 * channels))}


def narrow_lpips_params(rng, width=8):
  """`lpips.load_params`' structure, every layer `width` channels; positive biases keep the ReLUs
  (and so the unit-normalised features) away from all-zero vectors."""
  vgg, cin = {}, 3
  for name in lpips.CONV_NAMES:
    vgg[name] = dict(kernel=np.float32(rng.standard_normal((3, 3, cin, width)) * np.sqrt(2.0 / (9 * cin))),
                     bias=np.full((width,), 0.1, np.float32))
    cin = width
  return dict(vgg=vgg, lin={name: np.full((width,), 0.1, np.float32) for name in lpips.FEATURE_LAYERS})


@pytest.fixture(scope='module')
def options_inputs():
  """(teacher variables, LPIPS params, latents): the second stage starts from its teacher's weights."""
  rng = np.random.default_rng(6)
  teacher = {'params': conv_params(rng)}
  lpips_params = narrow_lpips_params(rng)
  return teacher, lpips_params, np.float32(80.0 * rng.standard_normal((OPTIONS_BATCH, 8, 8, 3)))


def options_step(inputs, train_settings, num_devices, *, targets_fn=None):
  """A debug second-stage step with `train.step_options(train_settings, num_devices)` on a
  `num_devices` mesh. Returns `run(lpips_params) -> host (params, metrics, debug)` of one
  iteration from the teacher's weights (state replicated, batch sharded); runs share programs."""
  teacher_variables, _, latents = inputs
  opts = train.step_options(train_settings, num_devices)
  # eps = 1: the update is Lipschitz in the gradient, so runs that round differently stay comparable
  # after interval 1's Adam step (tests/test_step_options.py, LIPSCHITZ_OPTIM).
  optimizer = sfd.make_optimizer(config_types.OptimSettings(lr=5e-4, eps=1.0))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), (train.DATA_AXIS,))
  place = lambda tree, *spec: jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  step = sfd.make_step(CONV_DENOISERS, optimizer, opts, mesh=mesh, data_axis=train.DATA_AXIS, debug=True,
                       targets_fn=targets_fn or stage2.make_targets_fn(True, None),
                       last_interval_loss=stage2.lpips_last_interval_loss)

  def run(lpips_params):
    params = teacher_variables['params']
    state = place(sfd.TrainState(params, optimizer.init(params), {}))  # a fresh copy: the step donates it
    state, metrics = step(state, teacher_variables, place(latents, train.DATA_AXIS), None, jax.random.key(9),
                          np.float32(5e-4), OPTIONS_SETTINGS, lpips_params)
    debug = metrics.pop('debug')
    return jax.device_get((state.params, metrics, debug))
  return run


@pytest.fixture(scope='module')
def options_reference(options_inputs):
  """float32, one device, the whole batch at once."""
  return options_step(options_inputs, config_types.TrainSettings(batch=OPTIONS_BATCH), 1)(options_inputs[1])


def max_rel_diff(tree, ref):
  """max over tensors of max|a − b| / max|b|."""
  return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))


def test_second_stage_accumulation_on_two_devices_equals_full_batch(options_inputs, options_reference):
  """batch_per_device=2 on 2 devices: 2 micro-batches of 4 rows (2 per device) for the student's
  gradients, the LPIPS term (a batch mean: Σ over micro-batches of mean · size = the full batch's
  mean · size) and the Euler teacher, which runs one micro-batch at a time as in the first stage."""
  seen = []

  def recording_targets_fn(teacher_denoise, teacher_variables, latents, *args):
    seen.append(latents.shape[0])
    return stage2.make_targets_fn(True, None)(teacher_denoise, teacher_variables, latents, *args)

  settings = config_types.TrainSettings(batch=OPTIONS_BATCH, batch_per_device=2)
  _, m, debug = options_step(options_inputs, settings, 2, targets_fn=recording_targets_fn)(options_inputs[1])
  _, ref, ref_debug = options_reference
  assert seen == [4]  # the teacher was traced on one micro-batch
  gaps = dict(loss=float(np.max(np.abs(m['loss'] - ref['loss']) / ref['loss'])),
              targets=max_rel_diff(debug['targets'], ref_debug['targets']),
              grads=max(max_rel_diff(g, r) for g, r in zip(debug['grads'], ref_debug['grads'])))
  print('second stage, 2 devices x 2 micro-batches vs full batch:', gaps)
  # The first stage's float32 tolerances (tests/test_step_options.py). Measured (CPU, 2026-12-02):
  # loss 2.1e-6, gradients 7.4e-7 relative; targets 3.9e-7 of their largest value (a few float32
  # ulps after the 6 Euler steps: the convolutions round differently on 4 rows than on 8). A bf16
  # teacher would be 2e-3 off: TARGETS_RTOL tells the two apart.
  assert gaps['loss'] <= LOSS_SUM_RTOL and gaps['grads'] <= ACCUM_GRAD_RTOL
  assert gaps['targets'] <= TARGETS_RTOL
  assert np.all(m['nonfinite'] == 0) and len(debug['grads']) == 2


def test_second_stage_bfloat16_with_accumulation_on_two_devices(options_inputs, options_reference):
  """Every option at once: bf16 students, 2 devices x 2 micro-batches. The losses stay within the
  first stage's bf16 tolerance of float32, the teacher stays float32 (its targets are float32's),
  parameters stay float32, and LPIPS changes the last interval only: the same programs run with
  LPIPS weights whose linear layers are zero (an LPIPS term of exactly 0) give the same first
  two intervals, bit for bit."""
  settings = config_types.TrainSettings(batch=OPTIONS_BATCH, batch_per_device=2, precision='bfloat16')
  run = options_step(options_inputs, settings, 2)
  lpips_params = options_inputs[1]
  params, m, debug = run(lpips_params)
  _, ref, ref_debug = options_reference
  rel = np.abs(m['loss'] - ref['loss']) / ref['loss']
  print('second stage, bf16 vs float32 relative loss gap per interval:', rel)
  # Measured (CPU, 2026-12-02): 7.4e-7 (AFS: only the targets' float32 rounding), 1.0e-3, 8.8e-4.
  np.testing.assert_allclose(m['loss'], ref['loss'], rtol=BF16_LOSS_RTOL)
  assert np.any(m['loss'] != ref['loss'])  # bf16 really ran
  assert max_rel_diff(debug['targets'], ref_debug['targets']) <= TARGETS_RTOL  # a float32 teacher
  assert m['redo'].tolist() == [0, 0, 0] and int(m['teacher_redo']) == 0 and np.all(m['nonfinite'] == 0)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
  assert all(o.dtype == np.float32 for o in debug['out'])
  # LPIPS enters the last interval only.
  _, plain, plain_debug = run(dict(lpips_params, lin=jax.tree.map(np.zeros_like, lpips_params['lin'])))
  np.testing.assert_array_equal(m['loss'][:2], plain['loss'][:2])
  jax.tree.map(np.testing.assert_array_equal, debug['grads'][0], plain_debug['grads'][0])
  for i in range(3):
    np.testing.assert_array_equal(debug['out'][i], plain_debug['out'][i])
  out, target = debug['out'][2], debug['targets'][2]
  term = float(jax.jit(lpips.second_stage_lpips)(lpips_params, out, target))  # eager: 5x slower
  assert term > 1e-3
  # The two micro-batches' terms against the whole batch's, seen through a difference of two float32
  # loss sums ~10x the term (~1e-6 relative rounding). Measured: term 8.8e-3, difference exact.
  np.testing.assert_allclose(m['loss'][2] - plain['loss'][2], term * out.size / OPTIONS_BATCH, rtol=1e-5)
  assert max_rel_diff(debug['grads'][1], plain_debug['grads'][1]) > 1e-3
