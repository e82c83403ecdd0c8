r"""The embedded demo: SFD at NFE 2 on the bundled digits teacher (< 5 min on 2 CPUs).

  python -m sfd_jax.demo --workdir=runs/demo                          # distil, then the report
  python -m sfd_jax.main --config=configs/demo.py --workdir=runs/demo  # distil only

The config itself lives in `sfd_jax.demo.config`, so that an installed package runs the demo.
"""
from sfd_jax.demo import config as demo_config


def get_config():
  """Official SFD first stage (NFE 2: num_steps 4, AFS, M = 3, DPM-Solver++(3) teacher), sized for a laptop."""
  return demo_config.distill_config()
