r"""SFD-v on EDM's CIFAR-10 teacher: one student for num_steps 4..7 (NFE 2..5), official settings.

  python -m sfd_jax.main --config=configs/cifar10_sfdv.py \
      --config.teacher=edm-cifar10-32x32-uncond-vp.pkl --workdir=runs/cifar10_sfdv
"""
from configs import cifar10


def get_config():
  """Official: step condition on, 800 kimg, M = 3, num_steps drawn from {4, 5, 6, 7}."""
  config = cifar10.get_config()
  config.distill.use_step_condition = True
  config.train.total_kimg = 800.0
  return config
