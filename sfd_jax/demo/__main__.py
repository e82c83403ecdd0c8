"""The demo: distil the shipped digits teacher with SFD, then write the report.

  python -m sfd_jax.demo --workdir=runs/demo

Writes the student's checkpoints, metrics.jsonl and sample grids (as `sfd_jax.main` does), then
report.md, report.json and grid.png: the student against the training-free solvers at NFE 2..5.
Any distillation setting can be overridden with `--config.SECTION.FIELD=VALUE`.
"""
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from sfd_jax import cli
from sfd_jax.demo import config as demo_config

PROG = 'python -m sfd_jax.demo'


def main(argv=None) -> int:
  fv = cli.new_flags()
  config = config_flags.DEFINE_config_dict('config', demo_config.distill_config(), 'The distillation config.',
                                           flag_values=fv)
  workdir = flags.DEFINE_string('workdir', 'runs/demo', 'Output directory.', flag_values=fv)
  argv = sys.argv[1:] if argv is None else list(argv)
  cli.check_config_overrides(PROG, argv)
  cli.parse(PROG, __doc__, fv, argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from sfd_jax.demo import pipeline  # imported late: flag errors stay fast
  return cli.run(PROG, lambda: pipeline.run(config.value, workdir.value))


if __name__ == '__main__':
  sys.exit(main())
