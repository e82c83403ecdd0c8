r"""SFD on CompVis' LSUN-Bedroom LDM-4 (256x256 images, 64x64x3 VQ-f4 latents, unconditional), NFE 2.

  python -m sfd_jax.main --config=configs/lsun_bedroom_ldm.py \
      --config.teacher=lsun_bedrooms/model.ckpt --workdir=runs/lsun_bedroom_ldm

`--config.teacher_arch=ldm-lsun-bedroom` is set here (the preset of the official yaml
`lsun_bedrooms-ldm-vq-4.yaml`); give '' with a converted teacher directory. SFD-v: add
`--config.distill.use_step_condition=True --config.train.total_kimg=800`.

The official launch.sh gives settings for CIFAR-10 only, and at the official commit its LDM
branch stops with an UnboundLocalError (tests/fixtures/ldm/README.md): the values below are
the official command-line defaults (train.py) and what `create_model` sets for
`lsun_bedroom_ldm`, except the schedule, chosen here
(`config_types.ldm4` says which and why).
"""
from sfd_jax import config_types


def get_config():
  """Official: batch 128, lr 5e-5, 200 kimg, M 3, DPM-Solver++ (launch.sh: max_order 3), AFS, sigma_min 0.006."""
  return config_types.ldm4(config_types.default_config(),
                           teacher_arch='ldm-lsun-bedroom', dataset_name='lsun_bedroom_ldm')
