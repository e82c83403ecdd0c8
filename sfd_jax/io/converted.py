"""Converted network directories: `network.json` (the `NetworkConfig`) plus an Orbax
checkpoint of the variables. Reading one needs neither torch nor the original pickle.
"""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from sfd_jax.networks import NetworkConfig, state_dict_to_variables, variables_to_state_dict

NETWORK_JSON = "network.json"
VARIABLES_DIR = "variables"


def is_converted(directory) -> bool:
  """Whether `directory` holds a converted network (its `network.json` marks completion)."""
  return (pathlib.Path(directory) / NETWORK_JSON).is_file()


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
