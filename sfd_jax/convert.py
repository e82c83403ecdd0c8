"""Convert EDM networks: snapshot pickle → converted directory, or any network → EDM `.pt`.

  python -m sfd_jax.convert --src=edm-cifar10-32x32-uncond-vp.pkl --dst=teachers/cifar10
  python -m sfd_jax.convert --src=teachers/cifar10 --dst=cifar10.pt
  python -m sfd_jax.convert --src=runs/cifar10 --dst=student.pt     # a distilled student

A converted directory loads later without torch and without the pickle (`load_teacher`).
A `.pt` destination gets an EDM-named state dict that `torch.load(..., weights_only=True)`
and EDM's `net.load_state_dict` accept. Errors are one line on stderr, exit status 2.
"""
import argparse
import sys

from sfd_jax import networks, teacher


def _parse(argv):
  parser = argparse.ArgumentParser(prog="python -m sfd_jax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="EDM snapshot .pkl, converted directory or SFD workdir")
  parser.add_argument("--dst", required=True, help="new directory, or FILE.pt for a PyTorch state dict")
  return parser.parse_args(argv)


def convert(src, dst) -> str:
  """Converts `src` into `dst` (a new directory, or a `.pt` file) and describes the result."""
  config, variables = teacher.load_network(src)
  count = networks.count_params(variables)
  if str(dst).endswith(".pt"):
    teacher.export_state_dict(variables, dst)
  else:
    teacher.save_converted(dst, config, variables)
  return f"wrote {dst} ({count:,} parameters)"


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    print(convert(args.src, args.dst))
  except (ValueError, OSError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
