r"""SFD on EDM's AFHQv2 64x64 unconditional teacher, NFE 2 (official settings).

  python -m sfd_jax.main --config=configs/afhqv2.py \
      --config.teacher=edm-afhqv2-64x64-uncond-vp.pkl --workdir=runs/afhqv2
"""
from sfd_jax import config_types


def get_config():
  """Official: as CIFAR-10 but student dropout 0.05."""
  config = config_types.default_config()
  config.dataset_name = 'afhqv2'
  config.img_resolution = 64
  config.label_dim = 0
  config.train.dropout = 0.05
  return config
