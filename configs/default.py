r"""Default SFD distillation config: every field, with the official CIFAR-10 2-NFE values.

The fields, their defaults and their meaning are defined once, in the dataclasses of
`sfd_jax/config_types.py`; the per-data-set configs import this and override a few lines.
Any field can be overridden on the command line, e.g.:

  python -m sfd_jax.main --config=configs/default.py --config.teacher=PATH --workdir=runs/x \
      --config.train.total_kimg=10
"""
from sfd_jax import config_types


def get_config():
  """Returns the default config (official SFD first stage, CIFAR-10, NFE 2)."""
  return config_types.default_config()
