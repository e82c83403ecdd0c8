r"""The embedded demo: SFD at NFE 2 on the bundled digits teacher, then a report (≤ 5 min on 2 CPUs).

  python -m sfd_jax.main --config=configs/demo.py --workdir=runs/demo

Distils sfd_jax/assets/digits_teacher (an 8x8 EDM model of scikit-learn's digits, trained by
configs/demo_teacher.py) and writes report.json, report.md and grid.png to the workdir.
"""
import os

import sfd_jax
from configs import default


def get_config():
  """Official SFD settings (NFE 2, M = 3, DPM-Solver++(3) teacher, AFS), sized for a laptop."""
  config = default.get_config()
  config.teacher = os.path.join(os.path.dirname(sfd_jax.__file__), 'assets', 'digits_teacher')
  config.dataset_name = 'digits'
  config.optim.lr = 2e-4              # a tiny network on a short budget takes larger steps
  config.train.batch = 128
  config.train.total_kimg = 20.0
  config.train.kimg_per_tick = 2.0
  config.train.checkpoint_ticks = 5
  config.train.max_checkpoints = 1
  config.train.demo_report = True
  return config
