"""Load a frozen EDM teacher: an EDM snapshot pickle or a converted directory → `Teacher`.

A converted directory (written by `save_converted`, e.g. through `python -m sfd_jax.convert`)
holds `network.json` (the `NetworkConfig`) and an Orbax checkpoint of the network variables;
reading it needs neither torch nor the pickle. Neither path ever imports torch.
"""
import dataclasses
import json
import os
import pathlib
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from sfd_jax import edm_pickle, torch_format
from sfd_jax.networks import NetworkConfig, make_denoise, state_dict_to_variables, variables_to_state_dict

NETWORK_JSON = "network.json"
VARIABLES_DIR = "variables"


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


def save_converted(directory, config: NetworkConfig, variables: dict) -> None:
  """Writes a converted network: `network.json` and an Orbax checkpoint of `variables`.

  Args:
    directory: the directory to create; it must not exist yet.
    config: the network config (stored as `config.to_dict()`).
    variables: `{'params': ..., 'buffers': ...}` of numpy or jax arrays.

  Raises:
    FileExistsError: `directory` already exists.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory}: already exists (choose a new directory for the converted network)")
  directory.mkdir(parents=True)
  variables = {"params": variables["params"], "buffers": variables.get("buffers") or {}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
  checkpointer.wait_until_finished()
  checkpointer.close()
  # Written last: its presence marks a complete directory.
  (directory / NETWORK_JSON).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_converted(directory) -> tuple[NetworkConfig, dict]:
  """Reads a directory written by `save_converted` (torch is never imported).

  Args:
    directory: the converted network directory.

  Returns:
    (config, variables) with variables `{'params': ..., 'buffers': ...}`, float32.

  Raises:
    FileNotFoundError: the directory or one of its parts is missing.
    ValueError: `network.json` is not a valid network config, or the stored variables do
      not fit it (one line naming the directory).
  """
  directory = pathlib.Path(directory).absolute()
  config_path = directory / NETWORK_JSON
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: no such file (not a converted network directory)")
  if not (directory / VARIABLES_DIR).is_dir():
    raise FileNotFoundError(f"{directory / VARIABLES_DIR}: no such directory (incomplete converted network)")
  try:
    config = NetworkConfig.from_dict(json.loads(config_path.read_text()))
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{config_path}: not a valid network config ({e})") from None
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory / VARIABLES_DIR)
  restored = {"params": restored["params"], "buffers": restored.get("buffers") or {}}
  # Validate names and shapes against the config, as for a pickle.
  state_dict = variables_to_state_dict(restored)
  return config, state_dict_to_variables(config, state_dict, source=str(directory))


def load_network(path) -> tuple[NetworkConfig, dict]:
  """Reads (config, variables) from an EDM snapshot pickle or a converted directory.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: one line naming `path` if it is neither format, is refused or corrupt,
      or holds tensors whose names or shapes do not fit its network config.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, NETWORK_JSON)):
      return load_converted(path)
    from sfd_jax import checkpoint  # a distilled student (e.g. the second stage's teacher)
    if checkpoint.is_student_checkpoint(path):
      config, variables, _ = checkpoint.load_student(path)
      return config, variables
    raise ValueError(f"{path}: unknown teacher format (a directory without {NETWORK_JSON} or student "
                     "checkpoints; expected an EDM snapshot .pkl, a converted directory or an SFD workdir)")
  with open(path, "rb") as f:
    head = f.read(2)
  if not head.startswith(b"\x80"):
    raise ValueError(f"{path}: unknown teacher format (expected an EDM snapshot .pkl "
                     "or a converted directory)")
  snapshot = edm_pickle.read_edm_snapshot(path)
  try:
    config = NetworkConfig.from_edm(snapshot.precond_class, snapshot.init_kwargs)
    variables = state_dict_to_variables(config, snapshot.state_dict, source=path)
  except (ValueError, KeyError, TypeError) as e:
    message = str(e).strip("'\"")
    raise ValueError(message if path in message else f"{path}: {message}") from None
  return config, variables


def load_teacher(path) -> Teacher:
  """Loads a teacher from an EDM snapshot pickle or a converted directory.

  Args:
    path: an EDM snapshot `.pkl` (read with a restricted unpickler: nothing in it runs)
      or a directory written by `save_converted` / `python -m sfd_jax.convert`.

  Returns:
    The `Teacher`, with float32 variables.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a one-line message naming `path` (unknown format, refused or corrupt
      pickle, state dict not fitting the network config).
  """
  config, variables = load_network(path)
  return Teacher(config=config, params=variables, denoise=make_denoise(config), source=os.fspath(path))


def export_state_dict(variables: dict, path) -> None:
  """Writes network variables as an EDM-named PyTorch state dict `.pt` (no torch needed).

  Args:
    variables: `{'params': ..., 'buffers': ...}` of a network.
    path: the `.pt` file; `torch.load(path, weights_only=True)` then EDM's
      `load_state_dict` restore the network.
  """
  torch_format.save_state_dict(variables_to_state_dict(variables), path)
