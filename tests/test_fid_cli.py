"""Tests for `python -m sfd_jax.fid`: ref / calc on folders, zips and .npz, `calc --student`
equal to sampling then `calc`, prdc, and one-line errors. A random Inception at 75 px stands in
for the real weights here (test_fid_inception.py checks those)."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from sfd_jax import checkpoint, images, sample, sampling
from sfd_jax.config_types import SamplingSettings
from sfd_jax.demo.config import TEACHER_DIR as DIGITS_TEACHER
from sfd_jax.fid import __main__ as cli
from sfd_jax.fid import commands
from sfd_jax.fid import detector as detector_lib
from sfd_jax.fid import evaluate, metrics, sources



# Every detector call below uses batches of 8 images of 8x8x1: one compilation for the file.
BATCH = '--batch=8'


@pytest.fixture(scope='module')
def random_inception():
  return detector_lib.random_detector(seed=0, resolution=75)


def _fast_frechet(mu1, s1, mu2, s2):
  """The Fréchet distance through symmetric eigenvalues (equal to EDM's sqrtm route to 1e-6,
  test_fid_metrics.py), because scipy's sqrtm of a 2048^2 matrix takes ~90 s on the test CPU."""
  w, v = np.linalg.eigh(s1)
  r = (v * np.sqrt(np.maximum(w, 0))) @ v.T
  ev = np.linalg.eigvalsh(r @ s2 @ r)
  return float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.maximum(ev, 0)).sum())


@pytest.fixture(autouse=True)
def use_random_inception(monkeypatch, random_inception):
  monkeypatch.setattr(commands, '_load_detector', lambda path: random_inception)
  calls = []
  monkeypatch.setattr(metrics, 'frechet_distance', lambda *a: calls.append(a) or _fast_frechet(*a))
  return calls


def _run(argv, capsys):
  """Runs the CLI like the shell does; returns (status, stdout, stderr)."""
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _fid_of(stdout):
  return float(stdout.strip().splitlines()[-1].split()[-1])


@pytest.fixture(scope='module')
def student_dir(tmp_path_factory):
  """A 'student' checkpoint holding the shipped digits teacher (Euler + AFS, 3 time points)."""
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  teacher = load_teacher(str(DIGITS_TEACHER))
  settings = SamplingSettings(num_steps=3, schedule_type='polynomial', schedule_rho=7.0, afs=True, sigma_min=0.002,
                              sigma_max=80.0, use_step_condition=False).to_dict()
  path = tmp_path_factory.mktemp('student') / 'run'
  manager = checkpoint.make_manager(path)
  checkpoint.save(manager, 1, teacher.params['params'], teacher.params['buffers'], {'count': np.zeros((), np.int32)},
                  dict(network=teacher.config.to_dict(), settings=settings, dataset_name='digits'))
  manager.wait_until_finished()
  manager.close()
  return str(path)


def _write_folder(root, pixels):
  for i, image in enumerate(pixels):
    images.save_png(root / f'{i // 10:02d}' / f'{i:05d}.png', image)


@pytest.mark.slow
def test_ref_from_folder_zip_and_npz_agree(tmp_path, capsys, random_inception):
  pixels = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  _write_folder(tmp_path / 'imgs', pixels)
  with zipfile.ZipFile(tmp_path / 'data.zip', 'w') as z:
    for p in sorted((tmp_path / 'imgs').rglob('*.png')):
      z.write(p, p.relative_to(tmp_path / 'imgs').as_posix())
    z.writestr('dataset.json', '{"labels": null}')
  np.savez(tmp_path / 'data.npz', arr_0=pixels)
  stats = {}
  for name in ('imgs', 'data.zip', 'data.npz'):
    code, out, _ = _run(['ref', f'--data={tmp_path / name}', f'--dest={tmp_path / name}.stats.npz',
                         BATCH, '--noprogress'], capsys)
    assert code == 0 and out.startswith('12 images from '), out
    stats[name] = metrics.load_stats(tmp_path / f'{name}.stats.npz')
  want = metrics.stats(detector_lib.features(random_inception, pixels, 8))
  for mu, sigma in stats.values():
    np.testing.assert_allclose(mu, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, want[1], rtol=1e-9, atol=1e-12)
  # EDM's --num: a seeded random subset.
  idx = sources.subset(12, 5, seed=3)
  assert len(idx) == 5 and list(idx) == sorted(idx)
  mu, _, _, n = evaluate.source_stats(random_inception, tmp_path / 'data.npz', num=5, seed=3, batch_size=8)
  assert n == 5
  np.testing.assert_allclose(mu, metrics.stats(detector_lib.features(random_inception, pixels[idx], 8))[0],
                             rtol=1e-12)


@pytest.mark.slow
def test_calc_student_equals_sampling_to_png_then_calc(tmp_path, capsys, student_dir, use_random_inception):
  ref = tmp_path / 'ref.npz'
  pixels = np.random.default_rng(1).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / 'real.npz', arr_0=pixels)
  assert _run(['ref', f'--data={tmp_path / "real.npz"}', f'--dest={ref}', '--metrics=fid,prdc', '--prdc_num=20',
               BATCH, '--noprogress'], capsys)[0] == 0
  assert sample.main(['--student', student_dir, '--seeds', '0-19', '--batch', '7', '--outdir', str(tmp_path / 'png'),
                      '--noprogress']) == 0
  capsys.readouterr()
  code, out_png, _ = _run(['calc', f'--images={tmp_path / "png"}', f'--ref={ref}', '--metrics=fid,prdc',
                           '--prdc_num=20', BATCH, '--noprogress'], capsys)
  assert code == 0, out_png
  code, out_student, err = _run(['calc', f'--student={student_dir}', '--num=20', f'--ref={ref}', BATCH,
                                 '--metrics=fid,prdc', '--prdc_num=20', '--noprogress'], capsys)
  assert code == 0, err
  fid_png, fid_student = _fid_of(out_png), _fid_of(out_student)
  assert fid_png > 0 and fid_student == fid_png
  (mu_png, sigma_png, *_), (mu_student, sigma_student, *_) = use_random_inception
  np.testing.assert_allclose(mu_student, mu_png, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma_student, sigma_png, rtol=1e-9, atol=1e-12)
  # prdc lines agree too (same features, same subset).
  assert out_png.splitlines()[0] == out_student.splitlines()[0]
  assert out_png.splitlines()[0].startswith('precision ')


@pytest.mark.slow
def test_calc_student_sampling_batch_does_not_change_the_fid(tmp_path, student_dir, random_inception):
  model = sampling.load_model(student=student_dir)
  batches = lambda b: evaluate.sample_batches(sampling.model_batches(model, list(range(12)), batch_size=b))
  a = evaluate.stats_of_batches(random_inception, batches(3), batch_size=8)
  b = evaluate.stats_of_batches(random_inception, batches(12), batch_size=8)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('argv, message', [
    ([], 'give one command, ref or calc (got none)'),
    (['ref'], '--data and --dest: ref needs both'),
    (['calc', '--ref=r.npz'], '--images, --student or --network: give exactly one'),
    (['calc', '--images=a', '--student=b', '--ref=r.npz'], 'give exactly one (got --images, --student)'),
    (['calc', '--images=a'], '--ref: give the reference statistics'),
    (['calc', '--images=a', '--ref=r.npz', '--metrics=is'], "--metrics: unknown metric 'is'"),
    (['calc', '--images=a', '--ref=r.npz', '--batch=0'], '--batch: need at least 1'),
    (['calc', '--images=a', '--ref=/no/such.npz'], '/no/such.npz: no such file'),
    (['ref', '--data=tfds:cifar10', '--dest=x.npz'], 'tfds:cifar10: needs tensorflow-datasets'),
    (['ref', '--data=/no/dir', '--dest=x.npz'], '/no/dir: no such file or directory'),
    (['calc', '--bogus'], "Unknown command line flag 'bogus'"),
])
def test_errors_are_one_line(argv, message, capsys):
  code, _, err = _run(argv, capsys)
  assert code == 2
  assert err.startswith('python -m sfd_jax.fid: error: ') and message in err, err
  assert err.count('\n') == 1 and 'Traceback' not in err


def test_errors_name_the_file(tmp_path, capsys):
  _write_folder(tmp_path / 'imgs', np.zeros((3, 8, 8, 1), np.uint8))
  (tmp_path / 'imgs' / '00' / '00001.png').write_bytes(b'not a png')
  code, _, err = _run(['ref', f'--data={tmp_path / "imgs"}', f'--dest={tmp_path / "s.npz"}', BATCH, '--noprogress'],
                      capsys)
  assert code == 2 and f'error: {tmp_path / "imgs" / "00" / "00001.png"}: unreadable image' in err, err
  np.savez(tmp_path / 'nomu.npz', sigma=np.eye(2))
  np.savez(tmp_path / 'ok.npz', arr_0=np.zeros((3, 8, 8, 1), np.uint8))
  code, _, err = _run(['calc', f'--images={tmp_path / "ok.npz"}', f'--ref={tmp_path / "nomu.npz"}'], capsys)
  assert code == 2 and 'nomu.npz: no mu in the statistics file' in err, err
  metrics.save_stats(tmp_path / 'd16.npz', np.zeros(16), np.eye(16))
  code, _, err = _run(['calc', f'--images={tmp_path / "ok.npz"}', f'--ref={tmp_path / "d16.npz"}', BATCH,
                       '--noprogress'], capsys)
  assert code == 2 and 'd16.npz: statistics of dimension 16, the detector gives 2048' in err, err
  code, _, err = _run(['calc', f'--images={tmp_path / "ok.npz"}', f'--ref={tmp_path / "d16.npz"}',
                       '--metrics=prdc'], capsys)
  assert code == 2 and 'd16.npz: no reference features for prdc' in err, err
  metrics.save_stats(tmp_path / 'd2048.npz', np.zeros(2048), np.eye(2048))
  code, _, err = _run(['calc', f'--images={tmp_path / "ok.npz"}', f'--ref={tmp_path / "d2048.npz"}', '--num=5'],
                      capsys)
  assert code == 2 and 'ok.npz: found 3 images, but expected at least 5' in err, err
  Image.fromarray(np.zeros((8, 8, 4), np.uint8), 'RGBA').save(tmp_path / 'imgs' / 'rgba.png')
  with pytest.raises(sources.SourceError, match=r'rgba.png: need an 8-bit grey or RGB image'):
    sources.open_source(tmp_path / 'imgs').load([3])


@pytest.fixture(scope='module')
def latent_student_dir(tmp_path_factory):
  """A latent student checkpoint: the tiny LDM fixture's UNet (Euler + AFS on the discrete
  schedule, 3 time points) with its VQ-f4 first stage in the buffers (16x16x3 latents -> 64x64x3)."""
  from conftest import FIXTURES  # pylint: disable=g-import-not-at-top
  from sfd_jax.latent.config import config_to_dict  # pylint: disable=g-import-not-at-top
  from sfd_jax.latent.student import student_variables  # pylint: disable=g-import-not-at-top
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  ldm = FIXTURES / 'ldm'
  teacher = load_teacher(ldm / 'ldm_bedroom_tiny.ckpt', arch=ldm / 'ldm_bedroom_tiny.yaml')
  variables = student_variables(teacher.raw_params)
  settings = SamplingSettings(num_steps=3, schedule_type='discrete', schedule_rho=1.0, afs=True,
                              sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, use_step_condition=False)
  path = tmp_path_factory.mktemp('latent_student') / 'run'
  manager = checkpoint.make_manager(path)
  checkpoint.save(manager, 1, variables['params'], variables['buffers'], {'count': np.zeros((), np.int32)},
                  dict(latent_network=config_to_dict(teacher.config), settings=settings.to_dict()))
  manager.wait_until_finished()
  manager.close()
  return str(path)


@pytest.mark.slow
def test_calc_latent_student_scores_decoded_images_without_pngs(tmp_path, capsys, monkeypatch, latent_student_dir,
                                                               use_random_inception):
  """`calc --student` on a latent student: the FID of the decoded 64x64 images, equal to writing
  them as PNGs with `sample --student` and scoring the folder, and no image file is written."""
  ref = tmp_path / 'ref.npz'
  np.savez(tmp_path / 'real.npz', arr_0=np.random.default_rng(2).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8))
  assert _run(['ref', f'--data={tmp_path / "real.npz"}', f'--dest={ref}', BATCH, '--noprogress'], capsys)[0] == 0
  assert sample.main(['--student', latent_student_dir, '--seeds', '0-7', '--batch', '8',
                      '--outdir', str(tmp_path / 'png'), '--noprogress']) == 0
  pngs = sorted((tmp_path / 'png').rglob('*.png'))
  assert len(pngs) == 8
  with Image.open(pngs[0]) as png:
    assert png.size == (64, 64) and png.mode == 'RGB'  # decoded images, not 16x16 latents
  capsys.readouterr()
  code, out_png, err = _run(['calc', f'--images={tmp_path / "png"}', f'--ref={ref}', BATCH, '--noprogress'], capsys)
  assert code == 0, err

  def no_files(*args, **kwargs):
    raise AssertionError('calc --student wrote an image file')
  monkeypatch.setattr(Image.Image, 'save', no_files)
  monkeypatch.setattr(images, 'save_png', no_files)
  code, out_student, err = _run(['calc', f'--student={latent_student_dir}', '--num=8', f'--ref={ref}', BATCH,
                                 '--noprogress'], capsys)
  assert code == 0, err
  assert out_student.startswith(f'{latent_student_dir}: 8 images, FID ')
  fid_png, fid_student = _fid_of(out_png), _fid_of(out_student)
  assert fid_png > 0 and fid_student == fid_png
  (mu_png, sigma_png, *_), (mu_student, sigma_student, *_) = use_random_inception
  np.testing.assert_allclose(mu_student, mu_png, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma_student, sigma_png, rtol=1e-9, atol=1e-12)


def test_calc_latent_network_equals_sampling_the_teacher_to_pngs(tmp_path, capsys, use_random_inception):
  """`calc --network model.ckpt --arch yaml`: a latent teacher sampled (Euler + AFS on the discrete
  schedule here, to keep it short) and decoded in memory: the FID of `sample --network`'s PNGs."""
  from conftest import FIXTURES  # pylint: disable=g-import-not-at-top
  ldm = FIXTURES / 'ldm'
  network = [f'--network={ldm / "ldm_bedroom_tiny.ckpt"}', f'--arch={ldm / "ldm_bedroom_tiny.yaml"}',
             '--solver=euler', '--num_steps=3', '--afs']
  ref = tmp_path / 'ref.npz'
  np.savez(tmp_path / 'real.npz', arr_0=np.random.default_rng(3).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8))
  assert _run(['ref', f'--data={tmp_path / "real.npz"}', f'--dest={ref}', BATCH, '--noprogress'], capsys)[0] == 0
  assert sample.main([*network, '--seeds=0-7', '--batch=8', f'--outdir={tmp_path / "png"}', '--noprogress']) == 0
  capsys.readouterr()
  code, out_png, err = _run(['calc', f'--images={tmp_path / "png"}', f'--ref={ref}', BATCH, '--noprogress'], capsys)
  assert code == 0, err
  code, out_network, err = _run(['calc', *network, '--num=8', f'--ref={ref}', BATCH, '--noprogress'], capsys)
  assert code == 0, err
  assert out_network.startswith(f'{ldm / "ldm_bedroom_tiny.ckpt"}: 8 images, FID ')
  assert _fid_of(out_png) > 0 and _fid_of(out_network) == _fid_of(out_png)
  (mu_png, sigma_png, *_), (mu_network, sigma_network, *_) = use_random_inception
  np.testing.assert_allclose(mu_network, mu_png, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma_network, sigma_png, rtol=1e-9, atol=1e-12)
