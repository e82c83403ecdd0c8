"""Orbax training checkpoints of the SFD student, and `load_student` for sampling.

A checkpoint (one step directory under `WORKDIR/checkpoints/`) holds the student's params
and buffers, the optimizer state, and a JSON `meta` item: images seen, iteration, the base
PRNG key, the network config and the settings sampling needs. The frozen teacher is never
stored: it is reloaded from its own file. Orbax writes each step to a temporary directory and
renames it when complete, so a run killed mid-write resumes from the last complete step.
"""
import pathlib
from typing import Any, NamedTuple, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from sfd_jax.config_types import SamplingSettings

CHECKPOINT_DIR = 'checkpoints'
ITEMS = ('params', 'buffers', 'opt_state', 'meta')


def checkpoint_dir(workdir) -> pathlib.Path:
  """Where a run's checkpoints live."""
  return pathlib.Path(workdir).absolute() / CHECKPOINT_DIR


def make_manager(workdir, max_to_keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager over `WORKDIR/checkpoints` (async saves, tmp dirs cleaned)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, options=options)


def _non_empty(**trees) -> dict:
  """The trees that hold arrays. Orbax refuses to save an empty item ('Found empty item.'), e.g.
  the buffers of a network that resamples nothing; such an item is not written, and restores
  as its (equally empty) template."""
  return {name: tree for name, tree in trees.items() if jax.tree.leaves(tree)}


def _host_copies(tree):
  """Replicated arrays as one numpy copy each; other arrays unchanged.

  Orbax writes a replicated jax.Array cooperatively on CPU, one slice per device, each cut by an
  eager op: 150 small arrays on 8 devices took 11.5 s to save that way, 0.5 s from numpy
  (`experiments/bench_checkpoint_save.py`). Orbax writes a numpy array from process 0 only,
  which is right for data every process holds whole, and restores it onto any template sharding.
  """
  def host(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(host, tree)


def save(manager: ocp.CheckpointManager, step: int, params, buffers, opt_state, meta: dict) -> None:
  """Starts an (asynchronous) save of one training state; call `manager.wait_until_finished()`.

  Replicated arrays are copied to the host before this returns, so the caller may donate them.
  """
  trees = _non_empty(**_host_copies(dict(params=params, buffers=buffers, opt_state=opt_state)))
  manager.save(step, args=ocp.args.Composite(
      meta=ocp.args.JsonSave(meta), **{name: ocp.args.StandardSave(tree) for name, tree in trees.items()}))


def restore_latest(manager: ocp.CheckpointManager, params, buffers, opt_state):
  """Restores the latest complete checkpoint onto the structure/sharding of the given trees.

  Args:
    manager: from `make_manager`.
    params, buffers, opt_state: templates (arrays or ShapeDtypeStructs with shardings).

  Returns:
    (params, buffers, opt_state, meta) or None when there is no complete checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  templates = dict(params=params, buffers=buffers, opt_state=opt_state)
  stored = _non_empty(**templates)
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  out = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore(), **{name: ocp.args.StandardRestore(abstract(t)) for name, t in stored.items()}))
  trees = [out[name] if name in stored else template for name, template in templates.items()]
  return (*trees, out['meta'])


def _resolve(path) -> Tuple[pathlib.Path, int]:
  """Workdir, checkpoints dir or step dir → (checkpoints dir, step)."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such student checkpoint (give a workdir or a checkpoint step directory)')
  if (path / 'meta').is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'meta').is_dir()] if root.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'{path}: no complete student checkpoint found')
  return root, max(steps)


def is_student_checkpoint(path) -> bool:
  """Whether `path` is a workdir, checkpoints dir or step dir holding a complete checkpoint."""
  try:
    _resolve(path)
  except FileNotFoundError:
    return False
  return True


class Student(NamedTuple):
  """A distilled student: network config, variables (numpy) and how it samples."""
  config: Any
  variables: dict
  sampling: SamplingSettings


def _local_targets(metadata) -> dict:
  """Restore targets on this process's first device for the params and buffers items stored.

  A checkpoint records the devices that wrote it (e.g. 2 processes x 4 devices); restoring
  onto those fails elsewhere, so the student is always read onto one local device. An empty
  buffers collection is not stored (`save`) and gets no target.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
  trees = {name: getattr(metadata.get(name), 'tree', None) for name in ('params', 'buffers')}
  return {name: jax.tree.map(target, tree) for name, tree in trees.items() if tree}


def load_student(path) -> Student:
  """Loads a distilled student for sampling.

  Args:
    path: a training workdir, its `checkpoints/` directory, or one checkpoint step directory.

  Returns:
    `Student(config, variables, sampling)`: the `NetworkConfig` (a latent teacher's student: its
    `LatentConfig`), variables {'params', 'buffers'} as numpy arrays, and the `SamplingSettings`
    stored with the checkpoint.

  Raises:
    FileNotFoundError: one line naming the path when there is no complete checkpoint.
    ValueError: one line naming the checkpoint when its stored settings are not valid.
  """
  root, step = _resolve(path)
  handlers = dict(params=ocp.StandardCheckpointHandler(), buffers=ocp.StandardCheckpointHandler(),
                  meta=ocp.JsonCheckpointHandler())
  manager = ocp.CheckpointManager(root, item_handlers=handlers, options=ocp.CheckpointManagerOptions(read_only=True))
  on_host = _local_targets(manager.item_metadata(step))
  out = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore(), **{name: ocp.args.StandardRestore(t) for name, t in on_host.items()}))
  manager.close()
  meta = out['meta']
  variables = {name: jax.tree.map(np.asarray, out[name]) if name in on_host else {} for name in ('params', 'buffers')}
  sampling = SamplingSettings.from_dict(meta['settings'], where=f'{root / str(step)}:settings')
  return Student(_network_config(meta, root / str(step)), variables, sampling)


def _network_config(meta: dict, where):
  """The student's network config from the checkpoint meta: `network` (EDM) or `latent_network`."""
  if 'latent_network' in meta:
    from sfd_jax.latent.config import config_from_dict  # networks are only needed here, not for saving
    try:
      return config_from_dict(meta['latent_network'])
    except ValueError as e:
      raise ValueError(f'{where}:latent_network: {e}') from None
  from sfd_jax.networks import NetworkConfig  # networks are only needed here, not for saving
  return NetworkConfig.from_dict(meta['network'])
