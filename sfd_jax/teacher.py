"""A frozen teacher network: `load_teacher(path)` → `Teacher(config, params, denoise, source)`.

`path` may be an EDM snapshot pickle (read by a restricted unpickler: nothing in it runs), a
converted directory, or an SFD workdir (a distilled student, e.g. the second stage's teacher).
Neither path ever imports torch; the formats themselves live in `sfd_jax.io`.
"""
import dataclasses
import os
from typing import Callable

from sfd_jax.io import load_network
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


def load_teacher(path) -> Teacher:
  """Loads a teacher from an EDM snapshot pickle, a converted directory or an SFD workdir.

  Returns:
    The `Teacher`, with float32 variables.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a one-line message naming `path` (unknown format, refused or corrupt
      pickle, state dict not fitting the network config).
  """
  config, variables = load_network(path)
  return Teacher(config=config, params=variables, denoise=make_denoise(config), source=os.fspath(path))
