r"""Command line for SFD distillation (kept short: the logic is in `sfd_jax.train`).

  python -m sfd_jax.main --config=configs/cifar10.py --config.teacher=PATH --workdir=DIR

Any config field can be overridden with `--config.SECTION.FIELD=VALUE` (the fields and their
meaning: `sfd_jax/config_types.py`). Rerunning the same command resumes from the latest
complete checkpoint in DIR.
"""
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from sfd_jax import cli

PROG = 'python -m sfd_jax.main'


def main(argv=None) -> int:
  fv = cli.new_flags()
  config = config_flags.DEFINE_config_file('config', None, 'Distillation config file, e.g. configs/cifar10.py.',
                                           flag_values=fv, lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, metrics, samples).', flag_values=fv)
  argv = sys.argv[1:] if argv is None else list(argv)
  cli.check_config_overrides(PROG, argv)
  rest = cli.parse(PROG, __doc__, fv, argv)
  if rest:
    cli.fail(PROG, f'unexpected arguments {rest}')
  if config.value is None or not workdir.value:
    cli.fail(PROG, '--config and --workdir are required')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from sfd_jax import train  # imported late: flag errors stay fast
  return cli.run(PROG, lambda: train.run(config.value, workdir.value))


if __name__ == '__main__':
  sys.exit(main())
