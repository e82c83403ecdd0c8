"""Several CPU devices in one process (`--xla_force_host_platform_device_count`) that survive a busy machine.

XLA:CPU runs each fake device's share of a collective (the data-parallel step's gradient
all-reduce) on a thread of its own and waits at a rendezvous for all of them. When one thread
has not arrived after `xla_cpu_collective_call_terminate_timeout_seconds` (40 s by default),
XLA aborts the whole process (`rendezvous.cc: Termination timeout ... Expected 8 threads to join
the rendezvous, but only 5 of them arrived on time`, then SIGABRT). Eight device threads on two
busy cores can miss that deadline without anything being wrong. `xla_flags` adds generous
timeouts to `XLA_FLAGS` wherever fake devices are asked for; XLA reads the variable when JAX
first initialises its backend, so it must be set before any array is created.

The same goes for XLA:CPU's instruction scheduler. Its default, the concurrency-optimised
scheduler, starts independent instructions as early as it can: every transposed copy of a
convolution kernel that a network's forward pass needs is made at the start of the program and
held to its use (2.2 GiB for Stable Diffusion's UNet whatever the batch), and so are other
early-startable buffers. `use_memory_scheduler` (run at import) turns it off, so that XLA picks
its memory-minimising schedule: the same operations in another order, identical results
(experiments/RESULTS.md, "XLA:CPU's scheduler"). A value given in XLA_FLAGS is kept; GPU and TPU
backends ignore the flag.
"""
import os
from typing import Optional

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# An all-reduce whose threads have not all arrived after this long is given up (process aborted).
TERMINATE_FLAG = '--xla_cpu_collective_call_terminate_timeout_seconds'
# ... and after this long XLA logs that a thread "may be stuck".
WARN_STUCK_FLAG = '--xla_cpu_collective_call_warn_stuck_timeout_seconds'
TERMINATE_TIMEOUT_S = 3600   # XLA's default is 40 s
WARN_STUCK_TIMEOUT_S = 600   # XLA's default is 20 s
# XLA:CPU's default scheduler trades memory for concurrency between instructions (see above).
CONCURRENCY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def _names(flags: str) -> set:
  return {f.split('=', 1)[0] for f in flags.split()}


def xla_flags(flags: str = '', num_devices: Optional[int] = None, *,
              terminate_timeout_s: int = TERMINATE_TIMEOUT_S, warn_stuck_timeout_s: int = WARN_STUCK_TIMEOUT_S) -> str:
  """`flags` (an XLA_FLAGS string) with `num_devices` fake CPU devices and the collective timeouts.

  Every other flag of `flags` is kept, and so are timeouts given there.

  Args:
    flags: the XLA_FLAGS to extend.
    num_devices: fake CPU devices to ask for (replaces a device count in `flags`); None keeps
      whatever `flags` says.
    terminate_timeout_s, warn_stuck_timeout_s: the collective timeouts, in seconds.

  Returns:
    The new XLA_FLAGS string.
  """
  parts = flags.split()
  if num_devices is not None:
    parts = [f for f in parts if f.split('=', 1)[0] != DEVICE_COUNT_FLAG] + [f'{DEVICE_COUNT_FLAG}={int(num_devices)}']
  have = _names(' '.join(parts))
  for name, seconds in ((TERMINATE_FLAG, terminate_timeout_s), (WARN_STUCK_FLAG, warn_stuck_timeout_s)):
    if name not in have:
      parts.append(f'{name}={int(seconds)}')
  return ' '.join(parts)


def use_fake_cpu_devices(num_devices: int) -> None:
  """Asks for `num_devices` CPU devices, with the collective timeouts, in this process (call it
  before JAX creates its first array; an explicit device count already in XLA_FLAGS is kept)."""
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = xla_flags(flags, None if DEVICE_COUNT_FLAG in _names(flags) else num_devices)


def raise_collective_timeouts() -> None:
  """Adds the collective timeouts to XLA_FLAGS if it asks for fake CPU devices (run at import)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if DEVICE_COUNT_FLAG in _names(flags):
    os.environ['XLA_FLAGS'] = xla_flags(flags)


def use_memory_scheduler() -> None:
  """Asks XLA:CPU for its memory-minimising instruction schedule instead of the concurrency-optimised
  default, unless XLA_FLAGS already sets the flag (run at import, before JAX's backend starts)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if CONCURRENCY_SCHEDULER_FLAG not in _names(flags):
    os.environ['XLA_FLAGS'] = f'{flags} {CONCURRENCY_SCHEDULER_FLAG}=false'.strip()


# XLA:CPU's pass that drops `optimization_barrier`s; it runs before common-subexpression
# elimination, which then merges a rematerialised block's recomputation back into the forward pass.
BARRIER_EXPANDER_PASS = 'cse_barrier_expander'
DISABLE_PASSES_FLAG = '--xla_disable_hlo_passes'


def keep_barriers_options(platform: str) -> Optional[dict]:
  """`compiler_options` for a program whose rematerialisation must survive XLA:CPU, or None.

  JAX separates a recomputation from the forward pass by `optimization_barrier`s; XLA:CPU (jax
  0.10.2) removes them early and its CSE then merges the two, so per-block remat saved nothing
  (`experiments/ab_remat_cpu.py`: 448 MiB with remat, 112 MiB with the barriers kept, 392 without
  remat). The barriers are a no-op at run time. GPU and TPU compilers keep them to the end
  already: None there. Passes disabled in XLA_FLAGS stay disabled.

  Args:
    platform: the devices' platform ('cpu', 'gpu', 'tpu').

  Returns:
    A dict for `jax.jit(..., compiler_options=...)`, or None.
  """
  if platform != 'cpu':
    return None
  given = [f.split('=', 1)[1] for f in os.environ.get('XLA_FLAGS', '').split()
           if f.startswith(f'{DISABLE_PASSES_FLAG}=')]
  return {DISABLE_PASSES_FLAG.lstrip('-'): ','.join([*given, BARRIER_EXPANDER_PASS])}
