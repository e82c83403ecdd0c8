r"""SFD on EDM's class-conditional ImageNet 64x64 ADM teacher, NFE 2 (official settings).

  python -m sfd_jax.main --config=configs/imagenet64.py \
      --config.teacher=edm-imagenet-64x64-cond-adm.pkl --workdir=runs/imagenet64
"""
from sfd_jax import config_types


def get_config():
  """Official: DhariwalUNet at its default dropout 0.10; one-hot labels drawn uniformly."""
  config = config_types.default_config()
  config.dataset_name = 'imagenet64'
  config.img_resolution = 64
  config.label_dim = 1000
  config.train.dropout = 0.10
  return config
