"""Fake CPU devices get collective timeouts that the installed jaxlib honours (sfd_jax/cpu_devices.py).

A data-parallel all-reduce on 8 fake devices waits until every device thread has arrived; the
program below holds device 0 back for a few seconds on purpose (a host callback that sleeps),
as a busy 2-core machine does by accident. With a terminate timeout shorter than the hold-up
XLA aborts the process, which shows that the flag names are real for this jaxlib (an unknown
flag name would abort at start-up instead, with 'Unknown flag'); with the project's timeouts the
same program finishes.
"""
import os
import subprocess
import sys

import pytest

from sfd_jax import cpu_devices

HOLD_DEVICE_0 = r'''
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P

def hold(x):
  if x[0] == 0:  # device 0's shard
    time.sleep(float(sys.argv[1]))
  return x

def body(x):
  x = jax.pure_callback(hold, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  return jax.lax.psum(x, 'i')

mesh = Mesh(np.array(jax.devices()), ('i',))
assert len(jax.devices()) == 8
print(float(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('i'), out_specs=P()))(jnp.arange(8.0))[0]))
'''


def run_held(flags, seconds):
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', HOLD_DEVICE_0, str(seconds)], env=env, capture_output=True, text=True,
                        timeout=300)


def test_short_terminate_timeout_aborts_and_the_projects_does_not():
  short = cpu_devices.xla_flags(num_devices=8, terminate_timeout_s=1, warn_stuck_timeout_s=1)
  aborted = run_held(short, 4)
  assert aborted.returncode != 0 and 'Termination timeout' in aborted.stderr, aborted.stderr[-2000:]
  finished = run_held(cpu_devices.xla_flags(num_devices=8), 4)
  assert finished.returncode == 0, finished.stderr[-2000:]
  assert float(finished.stdout.split()[-1]) == sum(range(8))


def test_project_timeouts_exceed_xlas_defaults():
  assert cpu_devices.TERMINATE_TIMEOUT_S >= 40 * 10 and cpu_devices.WARN_STUCK_TIMEOUT_S > 20


@pytest.mark.parametrize('flags, num_devices, expected', [
    ('', 8, {cpu_devices.DEVICE_COUNT_FLAG: '8'}),
    (f'{cpu_devices.DEVICE_COUNT_FLAG}=8 --xla_cpu_use_xnnpack=false', 2,
     {cpu_devices.DEVICE_COUNT_FLAG: '2', '--xla_cpu_use_xnnpack': 'false'}),
    (f'{cpu_devices.TERMINATE_FLAG}=7', None, {cpu_devices.TERMINATE_FLAG: '7'}),
])
def test_xla_flags_keeps_other_flags_and_replaces_the_device_count(flags, num_devices, expected):
  got = dict(f.split('=', 1) for f in cpu_devices.xla_flags(flags, num_devices).split())
  assert len(got) == len(cpu_devices.xla_flags(flags, num_devices).split())  # each flag once
  assert {k: got[k] for k in expected} == expected
  assert cpu_devices.TERMINATE_FLAG in got and cpu_devices.WARN_STUCK_FLAG in got


def test_this_test_session_runs_with_the_timeouts():
  flags = os.environ['XLA_FLAGS']
  assert cpu_devices.DEVICE_COUNT_FLAG in flags and cpu_devices.TERMINATE_FLAG in flags


def test_this_test_session_runs_with_the_memory_scheduler():
  """`import sfd_jax` asked XLA:CPU for its memory-minimising schedule (conftest imports it first)."""
  assert f'{cpu_devices.CONCURRENCY_SCHEDULER_FLAG}=false' in os.environ['XLA_FLAGS'].split()


@pytest.mark.parametrize('flags,expected', [
    ('', 'false'),
    (f'{cpu_devices.DEVICE_COUNT_FLAG}=2', 'false'),
    (f'{cpu_devices.CONCURRENCY_SCHEDULER_FLAG}=true', 'true'),  # the user's choice is kept
])
def test_memory_scheduler_flag_is_added_once_unless_given(monkeypatch, flags, expected):
  monkeypatch.setenv('XLA_FLAGS', flags)
  cpu_devices.use_memory_scheduler()
  cpu_devices.use_memory_scheduler()
  got = [f.split('=', 1) for f in os.environ['XLA_FLAGS'].split()]
  assert [v for k, v in got if k == cpu_devices.CONCURRENCY_SCHEDULER_FLAG] == [expected]
  assert len(got) == len(flags.split()) + (cpu_devices.CONCURRENCY_SCHEDULER_FLAG not in flags)  # others kept


@pytest.mark.parametrize('flags,expected', [
    ('', 'cse_barrier_expander'),
    ('--xla_disable_hlo_passes=fusion --xla_cpu_foo=1', 'fusion,cse_barrier_expander'),  # the user's kept
])
def test_keep_barriers_options_on_cpu_only(monkeypatch, flags, expected):
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert cpu_devices.keep_barriers_options('cpu') == {'xla_disable_hlo_passes': expected}
  assert cpu_devices.keep_barriers_options('gpu') is None
  assert cpu_devices.keep_barriers_options('tpu') is None


def test_kept_barriers_keep_a_rematerialised_gradient_small_and_equal():
  """The toy of experiments/ab_remat_cpu.py: eight checkpointed blocks of six `tanh(x @ w)`. With
  the barriers kept the gradient program holds the blocks' inputs only (112 MiB on jax 0.10.2,
  448 MiB without, 392 MiB without remat) and gives the same gradient, bit for bit."""
  import jax
  import jax.numpy as jnp

  def loss(ws, x, remat):
    block = lambda w, x: jnp.tanh(jnp.tanh(jnp.tanh(jnp.tanh(jnp.tanh(jnp.tanh(x @ w) @ w) @ w) @ w) @ w) @ w)
    for w in ws:
      x = (jax.checkpoint(block) if remat else block)(w, x)
    return jnp.sum(x)

  ws = [jax.random.normal(jax.random.key(i), (512, 512)) * 0.05 for i in range(8)]
  x = jax.random.normal(jax.random.key(9), (4096, 512))
  plain = jax.jit(jax.grad(lambda ws, x: loss(ws, x, False))).lower(ws, x).compile()
  remat = jax.jit(jax.grad(lambda ws, x: loss(ws, x, True)),
                  compiler_options=cpu_devices.keep_barriers_options('cpu')).lower(ws, x).compile()
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(remat) <= 0.5 * temp(plain), (temp(remat), temp(plain))
  for a, b in zip(plain(ws, x), remat(ws, x)):
    assert jax.numpy.array_equal(a, b)
