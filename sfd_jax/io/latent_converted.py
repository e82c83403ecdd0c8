"""Converted latent-teacher directories: `latent_teacher.json` (the `LatentConfig`) plus an Orbax
checkpoint of the raw variables and, when the source had them, the LitEma UNet weights.
Reading one needs neither torch nor the original checkpoint.
"""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from sfd_jax.latent.config import LatentConfig, config_from_dict, config_to_dict
from sfd_jax.latent.state_dict import ema_state_dict, variables_to_state_dict

LATENT_JSON = "latent_teacher.json"
VARIABLES_DIR = "variables"


def is_latent_converted(directory) -> bool:
  """Whether `directory` holds a converted latent teacher (its JSON marks completion)."""
  return (pathlib.Path(directory) / LATENT_JSON).is_file()


def save_latent_converted(directory, config: LatentConfig, raw: dict, ema=None) -> None:
  """Writes a converted latent teacher.

  Args:
    directory: the directory to create; it must not exist yet.
    config: the architecture.
    raw: the raw variables `{'params', 'buffers'}`.
    ema: variables with the LitEma UNet weights, or None.

  Raises:
    FileExistsError: `directory` already exists.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory}: already exists (choose a new directory for the converted teacher)")
  directory.mkdir(parents=True)
  tree = {"raw": raw}
  if ema is not None:
    tree["ema_unet"] = ema["params"]["model"]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VARIABLES_DIR, jax.tree.map(np.asarray, tree))
  checkpointer.wait_until_finished()
  checkpointer.close()
  # Written last: its presence marks a complete directory.
  (directory / LATENT_JSON).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_latent_converted(directory) -> tuple:
  """Reads a directory written by `save_latent_converted`.

  Returns:
    (config, state_dict): the architecture and a state dict in the checkpoint's names (raw
    weights, `alphas_cumprod` and the `model_ema.*` shadows when present), for
    `sfd_jax.latent.teacher.build_teacher` to validate.

  Raises:
    FileNotFoundError: missing parts; ValueError: an invalid JSON config (one line).
  """
  directory = pathlib.Path(directory).absolute()
  config_path = directory / LATENT_JSON
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: no such file (not a converted latent teacher)")
  if not (directory / VARIABLES_DIR).is_dir():
    raise FileNotFoundError(f"{directory / VARIABLES_DIR}: no such directory (incomplete converted teacher)")
  try:
    config = config_from_dict(json.loads(config_path.read_text()))
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from None
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(directory / VARIABLES_DIR)
  state_dict = dict(variables_to_state_dict(tree["raw"]))
  if "ema_unet" in tree:
    state_dict.update(ema_state_dict({"params": {"model": tree["ema_unet"]}}))
  return config, state_dict
