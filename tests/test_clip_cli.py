"""`python -m sfd_jax.fid calc --metrics=clip` (and `fid,clip`): the CLIP score of the official
`clip_score.py` from the command line, on fixture T1 (tests/fixtures/clip/README.md: a tiny member
of open_clip's ViT-g-14 family with random weights).

The images are the fixture's six 32x32 crops written as PNGs (the resize and crop are then
identities; test_clip_score.py proves the preprocessing itself bit-exact). Tolerances are those
of test_clip_score.py: four times the fixture's float32-vs-float64 gaps of the official code."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from sfd_jax.clip import score, weights
from sfd_jax.fid import __main__ as fid_main
from sfd_jax.fid import commands, metrics, sources
from sfd_jax.fid import detector as detector_lib
from sfd_jax.io import torch_files

CLIP = FIXTURES / 'clip'
T1 = json.loads((CLIP / 'clip_T1.json').read_text())
GAPS = T1['fp32_vs_fp64_max_abs']
TOL_SCORES, TOL_MEAN = 4 * GAPS['scores'], 4 * GAPS['mean_score']


@pytest.fixture(scope='module')
def t1():
  return np.load(CLIP / 'clip_T1.npz')


@pytest.fixture(scope='module')
def files(tmp_path_factory, t1):
  """PNGs of the six crops, captions.csv (the six captions, then two more), the model config
  (open_clip's `open_clip_config.json` layout) and the weights as open_clip's `.bin`."""
  root = tmp_path_factory.mktemp('clip')
  for i, crop in enumerate(t1['crop_uint8']):
    (root / 'png' / '000000').mkdir(parents=True, exist_ok=True)
    Image.fromarray(crop).save(root / 'png' / '000000' / f'{i:06d}.png')
  write_captions(root / 'captions.csv', list(t1['captions']) + ['an extra caption', 'and another'])
  (root / 'open_clip_config.json').write_text(json.dumps({'model_cfg': T1['open_clip_model_config']}))
  torch_files.save_state_dict(weights.read_state_dict(CLIP / 'clip_T1.safetensors'),
                              root / 'open_clip_pytorch_model.bin')
  return root


def write_captions(path, captions, column='text'):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['id', column])
    writer.writerows(enumerate(captions))


def run(argv, capsys):
  """Runs the CLI as the shell does; returns (status, stdout, stderr)."""
  try:
    code = fid_main.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def clip_flags(files, model='open_clip_pytorch_model.bin'):
  return [f'--clip_model={files / model}', f'--clip_config={files / "open_clip_config.json"}',
          f'--prompts={files / "captions.csv"}', '--noprogress']


def printed_score(stdout):
  line = next(line for line in stdout.splitlines() if 'CLIP score' in line)
  return float(line.split()[-1])


def test_clip_alone_needs_no_ref_and_matches_the_official_score(files, t1, capsys):
  """Both weight formats; the printed mean is the official float64 run's 10.667766 (README)."""
  for model in ('open_clip_pytorch_model.bin', str(CLIP / 'clip_T1.safetensors')):
    code, out, err = run(['calc', '--metrics=clip', f'--images={files / "png"}', '--clip_batch=4',
                          *clip_flags(files, model)], capsys)
    assert code == 0, err
    assert out.startswith(f'{files / "png"}: 6 images, CLIP score ')
    assert abs(printed_score(out) - float(t1['mean_score_f64'])) <= TOL_MEAN


def test_a_random_subset_pairs_the_kth_chosen_image_with_caption_k(files, t1, capsys):
  """`--num=4 --seed=1`: EDM's sorted random subset of the images, captions 0..3 in order
  (clip_score.py slices the captions by batch position, not by the chosen file)."""
  chosen = sources.subset(6, 4, seed=1)
  assert chosen.tolist() != [0, 1, 2, 3]
  want = score.pair_scores(t1['image_features_f64'][chosen], t1['text_features_f64'][:4]).mean()
  code, out, err = run(['calc', '--metrics=clip', f'--images={files / "png"}', '--num=4', '--seed=1',
                        *clip_flags(files)], capsys)
  assert code == 0, err
  assert ': 4 images, CLIP score ' in out
  assert abs(printed_score(out) - float(want)) <= TOL_MEAN


def test_fid_and_clip_together_equal_each_alone(files, tmp_path, capsys, monkeypatch):
  """`--metrics=fid,clip`: a CLIP line, then the FID line last; each number as its metric alone."""
  inception = detector_lib.random_detector(seed=0, resolution=75)
  monkeypatch.setattr(commands, '_load_detector', lambda path: inception)
  stats = []
  monkeypatch.setattr(metrics, 'frechet_distance', lambda *a: stats.append(a) or 1.5)
  ref = tmp_path / 'ref.npz'
  metrics.save_stats(ref, np.zeros(2048), np.eye(2048))
  argv = ['calc', f'--images={files / "png"}', f'--ref={ref}', '--batch=6']
  code, both, err = run(argv + ['--metrics=fid,clip', *clip_flags(files)], capsys)
  assert code == 0, err
  clip_line, fid_line = both.strip().splitlines()
  assert 'CLIP score' in clip_line and fid_line.endswith('6 images, FID 1.5')
  code, fid_alone, err = run(argv + ['--metrics=fid', '--noprogress'], capsys)
  assert code == 0 and fid_alone.strip() == fid_line, err
  np.testing.assert_array_equal(stats[0][0], stats[1][0])
  code, clip_alone, err = run(['calc', '--metrics=clip', f'--images={files / "png"}', *clip_flags(files)], capsys)
  assert code == 0 and clip_alone.strip() == clip_line, err


def test_running_score_equals_one_call_whatever_the_batches(files, t1):
  """The streaming scorer (used on samples as they are generated) gives the scores of
  `clip_score` on all pairs at once, fed in uneven batches."""
  params, config = score.load_open_clip(CLIP / 'clip_T1.safetensors', T1['open_clip_model_config'])
  crops, captions = t1['crop_uint8'], list(t1['captions'])
  running = score.RunningScore(params, config, batch_size=4)
  for lo, hi in ((0, 1), (1, 6)):
    running.update(crops[lo:hi], captions[lo:hi])
  result = running.result()
  np.testing.assert_allclose(result.scores, t1['scores_f64'], rtol=0, atol=TOL_SCORES)
  np.testing.assert_allclose(result.scores, score.clip_score(crops, captions, params, config).scores,
                             rtol=0, atol=TOL_SCORES)


@pytest.mark.parametrize('extra, message', [
    (['--prompts=P'], '--clip_model: --metrics=clip needs the open_clip ViT-g-14 weights'),
    (['--clip_model=M'], '--prompts: --metrics=clip needs the captions CSV'),
    (['--clip_model=M', '--prompts=P', '--prompt=a cat'], '--prompts or --prompt: give one, not both'),
    (['--clip_model=M', '--prompts=/no/such.csv'], '/no/such.csv: no such prompts file'),
    (['--clip_model=M', '--prompts=P', '--clip_batch=0'], '--clip_batch: need at least 1'),
])
def test_flag_errors_are_one_line(extra, message, capsys):
  code, _, err = run(['calc', '--metrics=clip', '--images=I', *extra], capsys)
  assert code == 2 and err.startswith('python -m sfd_jax.fid: error: ') and message in err, err
  assert err.count('\n') == 1 and 'Traceback' not in err


def test_file_errors_name_the_file(files, tmp_path, capsys):
  images = f'--images={files / "png"}'
  config = f'--clip_config={files / "open_clip_config.json"}'
  model = f'--clip_model={files / "open_clip_pytorch_model.bin"}'
  write_captions(tmp_path / 'caption_column.csv', ['a', 'b'], column='caption')
  (tmp_path / 'header_only.csv').write_text('id,text\n')
  (tmp_path / 'empty.csv').write_text('')
  write_captions(tmp_path / 'five.csv', ['a'] * 5)
  (tmp_path / 'bad.json').write_text('{"embed_dim": 24}')
  cases = [
      ([images, model, config, f'--prompts={tmp_path / "caption_column.csv"}'], "caption_column.csv: no 'text' column"),
      ([images, model, config, f'--prompts={tmp_path / "header_only.csv"}'], 'header_only.csv: holds no prompts'),
      ([images, model, config, f'--prompts={tmp_path / "empty.csv"}'], "empty.csv: no 'text' column"),
      ([images, model, config, f'--prompts={tmp_path / "five.csv"}'],
       'five.csv: holds 5 captions, but image 5 takes caption 5'),
      ([images, f'--clip_model={tmp_path / "none.bin"}', config, f'--prompts={files / "captions.csv"}'],
       'none.bin: no such file'),
      ([images, model, f'--clip_config={tmp_path / "bad.json"}', f'--prompts={files / "captions.csv"}'],
       'bad.json: not an open_clip model config'),
      ([images, model, f'--prompts={files / "captions.csv"}'],  # ViT-g-14's sizes for the tiny weights
       "open_clip_pytorch_model.bin: 'positional_embedding' has shape"),
  ]
  for argv, message in cases:
    code, _, err = run(['calc', '--metrics=clip', '--noprogress', *argv], capsys)
    assert code == 2 and message in err and err.count('\n') == 1, (argv, err)
  code, _, err = run(['ref', '--metrics=clip', '--data=D', '--dest=x.npz'], capsys)
  assert code == 2 and '--metrics=clip: a score of generated images (calc)' in err, err
