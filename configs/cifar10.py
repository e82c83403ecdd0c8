r"""SFD on EDM's CIFAR-10 32x32 unconditional teacher, NFE 2 (official settings).

  python -m sfd_jax.main --config=configs/cifar10.py \
      --config.teacher=edm-cifar10-32x32-uncond-vp.pkl --workdir=runs/cifar10
"""
from sfd_jax import config_types


def get_config():
  """Official: batch 128, lr 5e-5, 200 kimg, student dropout 0.13."""
  config = config_types.default_config()
  config.dataset_name = 'cifar10'
  config.img_resolution = 32
  config.label_dim = 0
  config.train.dropout = 0.13
  return config
