"""A frozen teacher network: `load_teacher(path)` → `Teacher(config, params, denoise, source)`.

`path` may be an EDM snapshot pickle (read by a restricted unpickler: nothing in it runs), a
converted directory, or an SFD workdir (a distilled student, e.g. the second stage's teacher).
With `arch` (or a `.ckpt` / `.safetensors` file) it is a CompVis LDM / Stable Diffusion
checkpoint and the result a `sfd_jax.latent.teacher.LatentTeacher`. No path ever imports
torch; the formats themselves live in `sfd_jax.io`.
"""
import dataclasses
import os
from typing import Callable

from sfd_jax.io import load_network
from sfd_jax.io import latent_converted
from sfd_jax.latent.teacher import load_latent_teacher
from sfd_jax.networks import NetworkConfig, make_denoise


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher network.

  Attributes:
    config: the network's architecture and preconditioning.
    params: network variables `{'params': ..., 'buffers': ...}` (EDM names and layouts).
    denoise: pure `denoise(params, x, sigma, class_labels=None, augment_labels=None,
      step_condition=None, *, train=False, dropout_rng=None)`; x NHWC, returns D(x; sigma).
    source: the file or directory it was loaded from.
  """

  config: NetworkConfig
  params: dict
  denoise: Callable
  source: str


_LATENT_SUFFIXES = (".ckpt", ".safetensors")


def is_latent(path, arch=None) -> bool:
  """Whether `path` (with `arch`) names a latent teacher: an architecture is given, the file is
  an LDM / SD checkpoint, or the directory a converted latent teacher."""
  path = os.fspath(path)
  return (arch is not None or path.endswith(_LATENT_SUFFIXES)
          or (os.path.isdir(path) and latent_converted.is_latent_converted(path)))


def load_teacher(path, arch=None):
  """Loads a teacher from an EDM snapshot pickle, a converted directory or an SFD workdir, or
  (with `arch`) a latent teacher from an LDM / SD checkpoint.

  Args:
    path: the file or directory.
    arch: None for EDM formats and converted latent teachers; for `.ckpt` / `.safetensors`
      checkpoints a preset name (`ldm-lsun-bedroom`, `ldm-ffhq`, `sd-v1`) or an LDM yaml path.

  Returns:
    The `Teacher` (EDM), or a `LatentTeacher` with `.denoise(params, x, sigma, condition=None,
    step_condition=None)` and `.decode(params, z)`; float32 variables.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a one-line message naming `path` (unknown format, refused or corrupt
      pickle, state dict not fitting the network config).
  """
  if is_latent(path, arch):
    return load_latent_teacher(path, arch)
  config, variables = load_network(path)
  return Teacher(config=config, params=variables, denoise=make_denoise(config), source=os.fspath(path))
