r"""SFD on EDM's FFHQ 64x64 unconditional teacher, NFE 2 (official settings).

  python -m sfd_jax.main --config=configs/ffhq.py \
      --config.teacher=edm-ffhq-64x64-uncond-vp.pkl --workdir=runs/ffhq
"""
from sfd_jax import config_types


def get_config():
  """Official: as CIFAR-10 but student dropout 0.05."""
  config = config_types.default_config()
  config.dataset_name = 'ffhq'
  config.img_resolution = 64
  config.label_dim = 0
  config.train.dropout = 0.05
  return config
