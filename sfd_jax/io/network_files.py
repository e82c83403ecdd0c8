"""Any network file sfd_jax reads or writes: one `load_network(path)` over the formats, and
the EDM-named `.pt` export.

Formats read: an EDM snapshot pickle (restricted unpickler), a converted directory, or an
SFD training workdir (a distilled student, e.g. the second stage's teacher).
"""
import os

from sfd_jax import checkpoint
from sfd_jax.io import converted, edm_pickle, latent_converted, torch_files
from sfd_jax.networks import NetworkConfig, state_dict_to_variables, variables_to_state_dict


def load_network(path) -> tuple[NetworkConfig, dict]:
  """Reads (config, variables) from an EDM snapshot pickle, a converted directory or an SFD workdir.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: one line naming `path` if it is none of these formats, is refused or corrupt,
      or holds tensors whose names or shapes do not fit its network config.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if converted.is_converted(path):
      return converted.load_converted(path)
    if checkpoint.is_student_checkpoint(path):
      student = checkpoint.load_student(path)
      return student.config, student.variables
    raise ValueError(f"{path}: unknown teacher format (a directory without {converted.NETWORK_JSON} or student "
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


def export_state_dict(variables: dict, path) -> None:
  """Writes network variables as an EDM-named PyTorch state dict `.pt` (no torch needed).

  Args:
    variables: `{'params': ..., 'buffers': ...}` of a network.
    path: the `.pt` file; `torch.load(path, weights_only=True)` then EDM's
      `load_state_dict` restore the network.
  """
  torch_files.save_state_dict(variables_to_state_dict(variables), path)


def convert_network(src, dst, arch=None) -> str:
  """Converts `src` (any format `load_network` reads) into `dst`: a new converted directory, or
  an EDM-named `.pt` when `dst` ends in `.pt`; returns a one-line description. With `arch`, or
  for an LDM / SD `.ckpt` / `.safetensors`, `src` is a latent teacher and `dst` a new converted
  latent-teacher directory."""
  from sfd_jax.networks import count_params  # pylint: disable=g-import-not-at-top
  from sfd_jax.latent import teacher as latent_teacher  # pylint: disable=g-import-not-at-top
  if arch is not None or os.fspath(src).endswith((".ckpt", ".safetensors")) or latent_converted.is_latent_converted(src):
    if str(dst).endswith(".pt"):
      raise ValueError(f"{dst}: latent teachers convert to a directory only (no .pt export)")
    return latent_teacher.convert_latent_teacher(src, dst, arch)
  config, variables = load_network(src)
  if str(dst).endswith(".pt"):
    export_state_dict(variables, dst)
  else:
    converted.save_converted(dst, config, variables)
  return f"wrote {dst} ({count_params(variables):,} parameters)"
