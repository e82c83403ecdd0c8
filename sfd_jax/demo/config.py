"""The demo's distillation config: SFD's official first stage at NFE 2, sized for a laptop CPU."""
import pathlib

from sfd_jax import config_types

# The shipped teacher: an 8x8 EDM model of scikit-learn's digits (see assets/README.md).
TEACHER_DIR = pathlib.Path(__file__).resolve().parent / 'assets' / 'digits_teacher'


def distill_config():
  """Official SFD first stage (num_steps 4, AFS, M = 3, DPM-Solver++(3) teacher) on the digits teacher."""
  config = config_types.default_config()
  config.teacher = str(TEACHER_DIR)
  config.dataset_name = 'digits'
  # Digits saturate at +-1, so the official dynamic thresholding clips the teacher's good x0
  # predictions: with it the teacher's 12-step targets are 2x farther from the converged ODE.
  config.distill.thresholding = False
  config.optim.lr = 5e-4              # 10x the official lr: 8 kimg instead of 200 (dropped 10x at half)
  config.train.batch = 64
  config.train.total_kimg = 8.0       # 125 iterations
  config.train.kimg_per_tick = 1.0
  config.train.checkpoint_ticks = 8   # one checkpoint, at the end
  config.train.max_checkpoints = 1
  config.train.dropout = 0.0          # a short run fits the teacher better without dropout
  return config
