r"""Command line for SFD distillation (kept short: the logic is in `sfd_jax.train`).

  python -m sfd_jax.main --config=configs/cifar10.py --config.teacher=PATH --workdir=DIR

Any config field can be overridden with `--config.SECTION.FIELD=VALUE`. Rerunning the same
command resumes from the latest complete checkpoint in DIR.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Distillation config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, metrics, samples).')


def run(config, workdir: str) -> None:
  """Converts the config, trains (or resumes) and, for the demo config, writes its report."""
  from sfd_jax import config_types, train  # imported late: flag errors stay fast
  typed = config_types.from_config_dict(config)
  models, variables, settings = train.train(typed, workdir)
  if typed.train.demo_report:
    from sfd_jax import demo
    demo.write_demo_report(workdir, models, variables, settings)


def parse_flags(argv):
  """absl flag parsing with one-line errors (an unknown --config.KEY otherwise prints a traceback)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    key = str(e).strip('"\' ')
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    what = f'unknown config key {bad[0]}' if bad else str(e).splitlines()[0]
    print(f'error: {what}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if len(argv) > 1:
    sys.exit(f'main.py: unexpected arguments {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    print('main.py: --config and --workdir are required', file=sys.stderr)
    sys.exit(2)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as e:
    # One clear line, no traceback: these are configuration or input errors.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
