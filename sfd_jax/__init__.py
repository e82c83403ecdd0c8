"""sfd_jax: Simple and Fast Distillation of EDM diffusion models, in JAX/Flax."""

__version__ = "0.1.0"

from sfd_jax import cpu_devices as _cpu_devices

# A run with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) gets collective
# timeouts that a busy machine cannot trip (see cpu_devices); nothing changes otherwise.
_cpu_devices.raise_collective_timeouts()
# XLA:CPU's default schedule holds e.g. every transposed convolution kernel at once (cpu_devices).
_cpu_devices.use_memory_scheduler()

__all__ = ["load_teacher", "Teacher"]


def __getattr__(name):
  # Lazy, so that `import sfd_jax` (and the CLIs' flag errors) stay fast.
  if name in __all__:
    from sfd_jax import teacher
    return getattr(teacher, name)
  raise AttributeError(f"module 'sfd_jax' has no attribute {name!r}")
