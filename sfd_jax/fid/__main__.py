r"""FID by EDM's protocol: `python -m sfd_jax.fid ref|calc --flag=...`.

Reference statistics (EDM's .npz: mu, sigma) of a data set:

  python -m sfd_jax.fid ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

FID of sampled images (folder, zip or .npz), or of a student sampled on the devices:

  python -m sfd_jax.fid calc --images=out --ref=fid-refs/cifar10-32x32.npz
  python -m sfd_jax.fid calc --student=runs/cifar10 --num=50000 --ref=fid-refs/cifar10-32x32.npz

CLIP score as the official clip_score.py (open_clip ViT-g-14; image i with caption i of the CSV's
`text` column: the i-th image in sorted file order, or the image of seed i), alone or with FID:

  python -m sfd_jax.fid calc --metrics=clip --images=out --prompts=captions.csv \
      --clip_model=ViT-g-14/open_clip_pytorch_model.bin
  python -m sfd_jax.fid calc --metrics=fid,clip --student=runs/sd --num=30000 --prompts=captions.csv \
      --clip_model=ViT-g-14/open_clip_pytorch_model.bin --ref=fid-refs/ms_coco-512x512.npz

`calc` prints one line per metric; with fid, the last number printed is the FID.
"""
import sys

from absl import logging

from sfd_jax import cli
from sfd_jax.fid import commands

PROG = 'python -m sfd_jax.fid'


def main(argv=None) -> int:
  fv = cli.new_flags()
  commands.define_flags(fv)
  args = cli.parse(PROG, __doc__, fv, sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only checkpoint directories
  return cli.run(PROG, lambda: commands.run(fv, args))


if __name__ == '__main__':
  sys.exit(main())
