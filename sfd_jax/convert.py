"""Convert EDM networks: snapshot pickle → converted directory, or any network → EDM `.pt`;
and latent teachers: LDM / SD checkpoint → converted directory.

  python -m sfd_jax.convert --src=edm-cifar10-32x32-uncond-vp.pkl --dst=teachers/cifar10
  python -m sfd_jax.convert --src=teachers/cifar10 --dst=cifar10.pt
  python -m sfd_jax.convert --src=runs/cifar10 --dst=student.pt     # a distilled student
  python -m sfd_jax.convert --src=lsun_bedrooms/model.ckpt --arch=ldm-lsun-bedroom --dst=teachers/lsun

A converted directory loads later without torch and without the pickle (`load_teacher`).
A `.pt` destination gets an EDM-named state dict that `torch.load(..., weights_only=True)`
and EDM's `net.load_state_dict` accept. Errors are one line on stderr, exit status 2.
"""
import sys

from absl import flags

from sfd_jax import cli

PROG = 'python -m sfd_jax.convert'


def main(argv=None) -> int:
  fv = cli.new_flags()
  src = flags.DEFINE_string('src', None, 'EDM snapshot .pkl, converted directory or SFD workdir', flag_values=fv)
  dst = flags.DEFINE_string('dst', None, 'new directory, or FILE.pt for a PyTorch state dict', flag_values=fv)
  arch = flags.DEFINE_string('arch', None, 'latent teachers: ldm-lsun-bedroom, ldm-ffhq, sd-v1 or an LDM yaml',
                             flag_values=fv)
  cli.parse(PROG, __doc__, fv, sys.argv[1:] if argv is None else argv)
  for flag in (src, dst):
    if not flag.value:
      cli.fail(PROG, f'--{flag.name} is required')
  from sfd_jax import io  # imported late: flag errors stay fast
  return cli.run(PROG, lambda: print(io.convert_network(src.value, dst.value, arch.value)))


if __name__ == '__main__':
  sys.exit(main())
