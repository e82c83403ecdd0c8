"""The config: every default defined once (the dataclasses), every config file round-trips through the
typed settings, and mistakes give one-line errors with a suggestion."""
import ast
import dataclasses
import importlib
import pathlib

import pytest

from sfd_jax import config_types
from sfd_jax.config_types import RunConfig

CONFIGS = pathlib.Path(__file__).parent.parent / 'configs'
DISTILL_CONFIGS = sorted(p.stem for p in CONFIGS.glob('*.py') if p.stem not in ('__init__', 'demo_teacher'))


@pytest.mark.parametrize('name', DISTILL_CONFIGS)
def test_every_config_round_trips_through_the_typed_settings(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  run = config_types.from_config_dict(config)
  assert dataclasses.asdict(run) == config.to_dict()  # nothing lost, nothing added, types kept


def test_defaults_are_the_dataclass_defaults_and_written_nowhere_else():
  assert config_types.default_config().to_dict() == dataclasses.asdict(RunConfig())
  # configs/default.py assigns no value of its own: its config is built from the dataclasses.
  tree = ast.parse((CONFIGS / 'default.py').read_text())
  assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))]
  # The other configs only override: every key they set exists in the dataclasses.
  for name in DISTILL_CONFIGS:
    config = importlib.import_module(f'configs.{name}').get_config()
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize('path, message', [
    ('train.bacth', 'unknown config key train.bacth (did you mean train.batch?)'),
    ('trian.batch', 'unknown config key trian.batch (did you mean train.batch?)'),
    ('distill.sampler', 'unknown config key distill.sampler (did you mean distill.sampler_tea?)'),
    ('bogus', 'unknown config key bogus (valid: '),
])
def test_unknown_key_messages_suggest_the_closest_key(path, message):
  assert not config_types.is_config_key(path)
  assert config_types.unknown_key_message(path).startswith(message)
  assert '\n' not in config_types.unknown_key_message(path)


@pytest.mark.parametrize('section, message', [
    (dict(train=dict(bacth=1)), 'unknown config key train.bacth (did you mean train.batch?)'),
    (dict(distill=dict(num_steps=4.7)), 'config: distill.num_steps=4.7 is not a valid int'),
    (dict(train=dict(total_kimg='ten')), "config: train.total_kimg='ten' is not a valid float"),
    (dict(distill=dict(afs='maybe')), "config: distill.afs='maybe' is not a valid bool"),
    (dict(distill=dict(sampler_tea='rk4')), "config: distill.sampler_tea='rk4' unknown (valid: dpm, dpmpp"),
    (dict(distill=dict(schedule_type='cos')), "config: distill.schedule_type: unknown schedule 'cos'"),
    (dict(distill=dict(sampler_tea='ipndm', max_order=5)), 'config: distill.max_order: ipndm needs 1..4'),
])
def test_bad_values_are_one_line_errors(section, message):
  with pytest.raises(ValueError) as info:
    config_types.from_config_dict(section)
  assert str(info.value).startswith(message) and '\n' not in str(info.value)


def test_whole_numbers_are_accepted_for_int_fields_and_ints_for_floats():
  run = config_types.from_config_dict(dict(distill=dict(num_steps=5.0), train=dict(total_kimg=10)))
  assert run.distill.num_steps == 5 and isinstance(run.distill.num_steps, int)
  assert run.train.total_kimg == 10.0 and isinstance(run.train.total_kimg, float)


def test_sampling_settings_round_trip_and_reject_unknown_keys():
  s = config_types.DistillSettings(num_steps=5, schedule_rho=5.0).sampling()
  assert config_types.SamplingSettings.from_dict(s.to_dict()) == s
  with pytest.raises(ValueError, match=r'^unknown sampling settings key settings.rho \(did you mean settings.'):
    config_types.SamplingSettings.from_dict(dict(s.to_dict(), rho=7.0))


# Loads every config file by path, as `--config=PATH` does (ml_collections executes the file), in a
# fresh interpreter whose working directory and sys.path hold no `configs` package: a config that
# imports a sibling (`from configs import ...`) fails here as it fails for a user who runs from
# their own folder.
LOAD_BY_PATH = r'''
import importlib.util, json, sys
from sfd_jax import config_types
runs = {}
for path in sys.argv[1:]:
  spec = importlib.util.spec_from_file_location('user_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  runs[path] = config_types.from_config_dict(module.get_config()).train.is_second_stage
print(json.dumps(runs))
'''


def test_every_config_loads_from_any_working_directory(tmp_path):
  import json
  import os
  import subprocess
  import sys
  paths = [str(p.resolve()) for p in sorted(CONFIGS.glob('*.py')) if p.stem not in ('__init__', 'demo_teacher')]
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-c', LOAD_BY_PATH, *paths], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  second_stage = json.loads(result.stdout)
  assert sorted(second_stage) == sorted(paths)
  assert {pathlib.Path(p).stem for p, v in second_stage.items() if v} == {
      'cifar10_stage2', 'imagenet64_stage2', 'demo_stage2'}
  # The CLI from another folder reaches the teacher check (exit 2, one line), not an import error.
  cli = subprocess.run([sys.executable, '-m', 'sfd_jax.main', f'--config={CONFIGS.resolve() / "cifar10_sfdv.py"}',
                        '--config.teacher=/nonexistent/teacher.pkl', f'--workdir={tmp_path / "w"}'],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert cli.returncode == 2 and 'config.teacher=/nonexistent/teacher.pkl: no such file' in cli.stderr, cli.stderr[-2000:]


def test_second_stage_configs_keep_the_official_values():
  for name, kimg in (('cifar10_stage2', 2000.0), ('imagenet64_stage2', 2000.0)):
    run = config_types.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
    d, o, t = run.distill, run.optim, run.train
    assert (d.num_steps, d.M, d.sampler_tea, d.afs, o.lr, t.total_kimg, t.is_second_stage, t.lpips) == (
        3, 2, 'euler', True, 5e-4, kimg, True, True)
  sfdv = config_types.from_config_dict(importlib.import_module('configs.cifar10_sfdv').get_config())
  assert sfdv.distill.use_step_condition and sfdv.train.total_kimg == 800.0 and sfdv.train.dropout == 0.13
