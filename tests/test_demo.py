"""Tests of the demo report: NFE accounting, latents, grid, and the demo command end to end."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfd_jax.demo import report as demo


@pytest.mark.parametrize('solver', ['euler', 'ipndm', 'dpmpp', 'heun'])
@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('nfe', [2, 3, 4, 5])
def test_baseline_num_steps_gives_the_stated_number_of_network_calls(solver, afs, nfe):
  num_steps = demo.baseline_num_steps(solver, nfe, afs)
  if num_steps is None:
    assert solver == 'heun'  # Heun spends 2 calls per interval: only every other NFE fits
    return
  calls = []

  def denoise(x, sigma):
    calls.append(float(sigma))
    return 0.5 * x

  schedule = dict(sigma_min=0.006, sigma_max=80.0, schedule_type='polynomial', rho=7.0)
  demo.make_sampler(denoise, solver, num_steps, afs, schedule)(jnp.ones((1, 2, 2, 1)))
  assert len(calls) == nfe


def test_heun_reaches_every_other_nfe_with_and_without_afs():
  assert [demo.baseline_num_steps('heun', n, False) for n in (2, 3, 4, 5)] == [2, None, 3, None]
  assert [demo.baseline_num_steps('heun', n, True) for n in (2, 3, 4, 5)] == [None, 3, None, 4]


def test_eval_latents_are_per_seed_and_unit_gaussian():
  z = demo.eval_latents(400, (8, 8, 1))
  assert z.shape == (400, 8, 8, 1) and z.dtype == np.float32
  # One generator per seed: the first samples do not depend on how many are drawn.
  np.testing.assert_array_equal(demo.eval_latents(3, (8, 8, 1)), z[:3])
  np.testing.assert_array_equal(
      z[5], np.random.RandomState(demo.EVAL_SEED_START + 5).standard_normal((8, 8, 1)).astype(np.float32))
  assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def test_rmse_closed_form():
  a = np.zeros((2, 4, 4, 1))
  assert demo.rmse(a + 0.5, a) == pytest.approx(0.5)
  b = a.copy()
  b[0, 0, 0, 0] = 4.0
  assert demo.rmse(b, a) == pytest.approx(np.sqrt(16 / 32))


def test_grid_has_one_row_per_method_and_the_same_columns(tmp_path):
  rows = [(f'row {i}', np.full((5, 8, 8, 1), -1.0 + i, np.float32)) for i in range(3)]
  path = tmp_path / 'grid.png'
  demo.save_grid(path, rows, scale=2)
  img = np.asarray(Image.open(path))
  assert img.shape == (3 * (16 + 2), demo.LABEL_WIDTH + 5 * (16 + 2))
  # Tile pixels carry the row's value: -1 -> 0, 0 -> 128, 1 -> 255.
  assert [img[r * 18 + 8, demo.LABEL_WIDTH + 8] for r in range(3)] == [0, 128, 255]


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
  """The README's first command at reduced size: distil the bundled teacher, then the report."""
  from configs import demo as demo_config
  from sfd_jax.demo import pipeline
  options = demo.EvalOptions(nfes=(2, 3), num_samples=24, reference_steps=9, check_steps=5, batch=24,
                             grid_columns=4)
  config = demo_config.get_config()
  assert os.path.isdir(config.teacher), 'the demo teacher must ship with the package'
  config.train.batch = 16
  config.train.total_kimg = 0.032
  config.train.kimg_per_tick = 0.016
  pipeline.run(config, str(tmp_path), options)
  report = json.loads((tmp_path / 'report.json').read_text())
  methods = set(report['method_order'])
  assert {'Euler', 'iPNDM', 'DPM-Solver++(3M)', 'Heun', 'SFD'} <= methods
  for row in report['results']:
    assert np.isfinite(row['rmse']) and row['rmse'] > 0 and np.isfinite(row['fd'])
  sfd_rows = [r for r in report['results'] if r['method'] == 'SFD']
  assert [(r['nfe'], r['num_steps']) for r in sfd_rows] == [(2, 4)]
  assert report['summary']['nfe'] == 2 and report['summary']['ratio'] > 0
  assert report['eval_seeds'] == [demo.EVAL_SEED_START, demo.EVAL_SEED_START + 23]
  md = (tmp_path / 'report.md').read_text()
  assert '| SFD |' in md and 'grid.png' in md
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  rows_at_nfe2 = 1 + sum(1 for m in report['method_order']
                         if any(r['method'] == m and r['nfe'] == 2 for r in report['results']))
  assert grid.shape[0] == rows_at_nfe2 * (8 * demo.GRID_SCALE + 2)
