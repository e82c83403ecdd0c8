"""Multi-process training on JAX's own distributed runtime (CPU collectives through gloo).

Two local processes with 4 fake CPU devices each distil a tiny 8×8 teacher (the digits
teacher's network without attention, random weights, so compiling stays cheap)
(`config.train.distributed`, coordinator on a free localhost port). The result must equal one
process with the same 8 devices, and the checkpoints the two processes wrote must resume in
one process and end where an uninterrupted one-process run ends.

The two topologies sum gradients in a different order (gloo across processes versus XLA's
in-process all-reduce), so results agree to float32 rounding, not bit for bit: the per-tick
losses agree to 1e-5 relative (seen: 1.8e-6). Adam divides by sqrt(v), which blows a
rounding-level difference in a parameter with a near-zero gradient up to a learning-rate-sized
one (seen with the default eps: 0.37 of the change); the runs therefore use eps = 1 (Adam acts
as momentum SGD on these gradients, which are far below 1) so that parameters can be compared
tightly: to 1e-5 of the largest change training made to them (seen: 5e-7). A wrong global
batch, dropout mask or gradient reduction moves them by the whole change.
"""
import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = 8
TINY = [
    '--config=configs/demo.py', f'--config.train.batch={BATCH}',
    f'--config.train.kimg_per_tick={BATCH / 1000}', '--config.train.checkpoint_ticks=2',
    '--config.train.max_checkpoints=5', '--config.train.grid_size=2', '--config.train.seed=3',
    '--config.train.dropout=0.1', '--config.distill.num_steps=3', '--config.distill.M=1',
    '--config.optim.lr=1e-3', '--config.optim.eps=1.0', '--config.optim.lr_drop_factor=1.0',
]
PARAM_RTOL = 1e-5  # of the largest parameter change over the run (see the module docstring)
TIMEOUT = 600


def write_tiny_teacher(directory):
  """The digits teacher's network without attention, random weights."""
  import jax
  from sfd_jax import networks
  from sfd_jax.demo.config import TEACHER_DIR
  from sfd_jax.io import converted
  config = networks.NetworkConfig.from_dict(json.loads((TEACHER_DIR / converted.NETWORK_JSON).read_text()))
  config = config.replace_model(channel_mult=[1, 1], attn_resolutions=[])  # 2 levels: the checkpoints carry buffers too (resample filters)
  converted.save_converted(directory, config, networks.init_variables(config, jax.random.key(0)))
  return directory


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, teacher, cache_dir, iters: int, num_processes: int, devices_each: int):
  """Runs the CLI in `num_processes` processes; returns their (returncode, stdout, stderr)."""
  env = cli_env(devices_each, cache_dir)
  base = [sys.executable, '-m', 'sfd_jax.main', f'--workdir={workdir}', *TINY, f'--config.teacher={teacher}',
          f'--config.train.total_kimg={iters * BATCH / 1000}']
  if num_processes > 1:
    base += ['--config.train.distributed=True', f'--config.train.coordinator_address=localhost:{free_port()}',
             f'--config.train.num_processes={num_processes}']
  procs = []
  try:
    for i in range(num_processes):
      extra = [f'--config.train.process_id={i}'] if num_processes > 1 else []
      procs.append(subprocess.Popen(base + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    deadline = time.time() + TIMEOUT
    outs = [p.communicate(timeout=max(deadline - time.time(), 1)) for p in procs]
  finally:
    for p in procs:  # a failed or hung process must not leave its peers waiting forever
      if p.poll() is None:
        p.kill()
        p.wait()
  results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
  for code, _, err in results:
    assert code == 0, err[-3000:]
  return results


def params_at(path):
  from sfd_jax.checkpoint import load_student
  _, variables, _ = load_student(path)
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(variables['params'])}


def losses(workdir):
  return [json.loads(l)['loss'] for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def assert_params_close(got, want, start):
  """Equal up to PARAM_RTOL of the largest change any parameter made since `start`."""
  assert got.keys() == want.keys()
  scale = max(np.abs(want[n] - start[n]).max() for n in want)
  assert scale > 0
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=PARAM_RTOL * scale, err_msg=name)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One process × 8 devices for 6 iterations; 2 processes × 4 devices for 4; then that resumed to 6."""
  cache = tmp_path_factory.mktemp('jax_cache')
  teacher = write_tiny_teacher(tmp_path_factory.mktemp('teacher') / 'net')
  single, multi = tmp_path_factory.mktemp('single'), tmp_path_factory.mktemp('multi')
  launch(single, teacher, cache, iters=6, num_processes=1, devices_each=8)
  multi_out = launch(multi, teacher, cache, iters=4, num_processes=2, devices_each=4)
  ckpt4 = params_at(multi / 'checkpoints' / '4')  # before the resume adds steps 6 (and drops none)
  multi_losses = losses(multi)
  resumed = launch(multi, teacher, cache, iters=6, num_processes=1, devices_each=8)
  return dict(single=single, multi=multi, multi_out=multi_out, multi_ckpt4=ckpt4,
              multi_losses=multi_losses, resumed_out=resumed[0][1])


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
  (_, out0, _), (_, out1, _) = runs['multi_out']
  assert 'on 8 device(s)' in out0 and 'tick 3' in out0
  assert 'tick' not in out1  # only process 0 logs
  assert len(runs['multi_losses']) == 4  # each tick written once (by process 0)
  assert sorted(p.name for p in runs['multi'].glob('samples-*.png'))[:2] == [
      'samples-00000002.png', 'samples-00000004.png']
  np.testing.assert_allclose(runs['multi_losses'], losses(runs['single'])[:4], rtol=1e-5)
  start = params_at(runs['single'] / 'checkpoints' / '2')
  assert_params_close(runs['multi_ckpt4'], params_at(runs['single'] / 'checkpoints' / '4'), start)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
  assert 'Resuming from' in runs['resumed_out'] and 'checkpoints/4 ' in runs['resumed_out']
  np.testing.assert_allclose(losses(runs['multi']), losses(runs['single']), rtol=1e-5)
  start = params_at(runs['single'] / 'checkpoints' / '2')
  assert_params_close(params_at(runs['multi']), params_at(runs['single']), start)
