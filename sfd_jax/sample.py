r"""Sample images from an EDM teacher or a distilled SFD student: `python -m sfd_jax.sample`.

Teacher (any solver of `sfd_jax.solvers`):

  python -m sfd_jax.sample --network=edm-cifar10-32x32-uncond-vp.pkl --solver=dpmpp \
      --num_steps=6 --afs --seeds=0-63 --grid=grid.png

Latent teacher (an LDM / SD checkpoint with its architecture, or a converted directory; decoded
by its first stage; default DPM-Solver++ with 10 NFE on the discrete schedule):

  python -m sfd_jax.sample --network=lsun_bedrooms/model.ckpt --arch=ldm-lsun-bedroom --seeds=0-63 --grid=grid.png

Student (Euler with the settings stored in its checkpoint):

  python -m sfd_jax.sample --student=runs/cifar10 --seeds=0-49999 --batch=500 --outdir=out

Stable Diffusion student (seed i takes caption i of the CSV's `text` column, as the official
sample.py; classifier-free guidance runs both passes in one batch, so the NFE doubles):

  python -m sfd_jax.sample --student=runs/sd --prompts=captions.csv --guidance=7.5 --seeds=0-29999 --outdir=out/sd
  python -m sfd_jax.sample --student=runs/sd --prompt="a photo of a cat" --seeds=0-15 --grid=cats.png

An image depends on its seed only, not on --batch or the number of devices (see `sfd_jax.sampling`).
"""
import sys

from absl import flags
from absl import logging

from sfd_jax import cli, sampling

PROG = 'python -m sfd_jax.sample'


def main(argv=None) -> int:
  fv = cli.new_flags()
  cli.define_model_flags(fv)
  flags.DEFINE_string('outdir', None, 'write PNGs as OUTDIR/000000/000123.png', flag_values=fv)
  flags.DEFINE_string('npz', None, 'write all images to one .npz (arr_0: uint8 NHWC, seeds)', flag_values=fv)
  flags.DEFINE_string('grid', None, f'write a PNG grid of the first {sampling.GRID_MAX_IMAGES} images', flag_values=fv)
  cli.parse(PROG, __doc__, fv, sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only checkpoint directories

  def body():
    if not (fv.outdir or fv.npz or fv.grid):
      raise ValueError('--outdir, --npz or --grid: give at least one output')
    batches, seeds, model = cli.model_batches(fv)
    sampling.write_outputs(batches, outdir=fv.outdir, npz=fv.npz, grid=fv.grid)
    where = ', '.join(str(p) for p in (fv.outdir, fv.npz, fv.grid) if p)
    guided = f' (guidance {model.guidance:g}: conditional and unconditional passes)' if model.guided else ''
    print(f'{len(seeds)} images from {fv.network or fv.student} -> {where}, NFE {model.nfe}{guided}')
  return cli.run(PROG, body)


if __name__ == '__main__':
  sys.exit(main())
