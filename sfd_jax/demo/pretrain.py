"""Trains the demo's digits teacher (how `sfd_jax/demo/assets/digits_teacher` was made).

  python -m sfd_jax.demo.pretrain --config=configs/demo_teacher.py --workdir=runs/demo_teacher

The recipe is in `sfd_jax.demo.pretraining`; the config's fields and their meaning are in
configs/demo_teacher.py.
"""
import sys

from absl import flags
from ml_collections import config_flags

from sfd_jax import cli

PROG = 'python -m sfd_jax.demo.pretrain'


def main(argv=None) -> int:
  fv = cli.new_flags()
  config = config_flags.DEFINE_config_file('config', None, 'Teacher training config, e.g. configs/demo_teacher.py.',
                                           flag_values=fv)
  workdir = flags.DEFINE_string('workdir', None, 'Output folder for the teacher and the log.', flag_values=fv)
  cli.parse(PROG, __doc__, fv, sys.argv[1:] if argv is None else argv)
  if config.value is None or not workdir.value:
    cli.fail(PROG, '--config and --workdir are required '
             '(e.g. --config=configs/demo_teacher.py --workdir=runs/demo_teacher)')
  from sfd_jax.demo import pretraining  # imported late: flag errors stay fast
  return cli.run(PROG, lambda: pretraining.pretrain(config.value, workdir.value))


if __name__ == '__main__':
  sys.exit(main())
