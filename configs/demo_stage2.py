r"""The demo's second stage: a 1-NFE digits student from a first-stage demo run with num_steps 7.

  python -m sfd_jax.main --config=configs/demo.py --workdir=runs/demo_n7 --config.distill.num_steps=7
  python -m sfd_jax.main --config=configs/demo_stage2.py --config.teacher=runs/demo_n7 \
      --workdir=runs/demo_stage2
  python -m sfd_jax.sample --student=runs/demo_stage2 --seeds=0-63 --grid=grid.png

LPIPS compares the 8x8 digits bilinearly upsampled to 224x224 (grey repeated to RGB) with a
VGG trained on ImageNet photographs: on such images it is at best a weak signal. Every
iteration runs VGG16 at 224x224 on 2 x batch images, which is slow on a CPU.
"""
from sfd_jax import config_types
from sfd_jax.demo import config as demo_config


def get_config():
  """The official second stage (num_steps 3, M 2, AFS, Euler teacher, LPIPS), demo-sized."""
  config = demo_config.distill_config()
  config.teacher = ''                 # the first-stage demo workdir (required)
  config = config_types.second_stage(config, total_kimg=config.train.total_kimg)
  return config
