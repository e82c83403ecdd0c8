r"""SFD-v on EDM's CIFAR-10 teacher: one student for num_steps 4..7 (NFE 2..5), official settings.

  python -m sfd_jax.main --config=configs/cifar10_sfdv.py \
      --config.teacher=edm-cifar10-32x32-uncond-vp.pkl --workdir=runs/cifar10_sfdv
"""
from sfd_jax import config_types


def get_config():
  """Official: step condition on, 800 kimg, M = 3, num_steps drawn from {4, 5, 6, 7}."""
  config = config_types.default_config()
  config.dataset_name = 'cifar10'     # as configs/cifar10.py
  config.img_resolution = 32
  config.label_dim = 0
  config.train.dropout = 0.13
  config.distill.use_step_condition = True
  config.train.total_kimg = 800.0
  return config
