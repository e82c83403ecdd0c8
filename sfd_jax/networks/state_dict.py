"""EDM state dicts ↔ network variables: names, shapes, and torch's `state_dict()` order.

Variables are `{'params': ..., 'buffers': ...}` nested by EDM's state-dict names split on '.',
so converting is a renaming (`flax.traverse_util` flattens and nests), validated against the
shapes the `NetworkConfig` implies.
"""
import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sfd_jax.networks.config import NetworkConfig
from sfd_jax.networks.denoiser import init_variables, initialiser

_STEP_CONDITION_LAYERS = ("map_step", "map_step_layer0", "map_step_layer1", "affine_step")


def _flatten(tree) -> dict:
  """{'a': {'b': x}} → {'a.b': x} (EDM state-dict names)."""
  return traverse_util.flatten_dict(dict(tree), sep=".") if tree else {}


def _nest(flat: dict) -> dict:
  """Inverse of `_flatten`."""
  return traverse_util.unflatten_dict(flat, sep=".")


def expected_shapes(config: NetworkConfig) -> "collections.OrderedDict[str, tuple]":
  """{EDM state-dict name: (collection, shape)} in EDM's order, without computing anything."""
  shapes = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
  flat = {name: (coll, tuple(leaf.shape)) for coll in ("params", "buffers")
          for name, leaf in _flatten(shapes[coll]).items()}
  return collections.OrderedDict((name, flat[name]) for name in edm_order(flat))


def init_named(config: NetworkConfig, rng, names) -> dict:
  """The variables of `init_variables(config, rng)` with the given EDM state-dict names only.

  Every variable draws from its own stream (Flax derives it from the variable's path), so these
  are bit-equal to the same names in `init_variables`; XLA drops the rest of the initialiser,
  which makes initialising a few layers (SFD-v's step condition) compile in a fraction of the
  time of the whole network.

  Returns:
    {name: array}.
  """
  init = initialiser(config)

  def named(rng):
    variables = init(rng)
    flat = {**_flatten(variables["params"]), **_flatten(variables["buffers"])}
    return {name: flat[name] for name in names}

  return jax.jit(named)(rng)


def is_step_condition_name(name: str) -> bool:
  """Whether a state-dict name belongs to SFD-v's step-condition layers."""
  return any(part in _STEP_CONDITION_LAYERS for part in name.split("."))


def state_dict_to_variables(config: NetworkConfig, state_dict, rng=None, *, source: str = "<state dict>") -> dict:
  """EDM state dict (torch names and layouts) → variables, validated against `config`.

  Args:
    config: the network the state dict should describe.
    state_dict: {EDM name: array}.
    rng: `jax.random.key` used to initialise step-condition layers absent from the state
      dict (only when `config.use_step_condition`).
    source: what to call the state dict in error messages (e.g. the file path).

  Returns:
    {'params': ..., 'buffers': ...} with float32 jax arrays.

  Raises:
    ValueError: one line naming `source` and the first missing, unexpected or misshapen key.
  """
  expected = expected_shapes(config)
  given = {name: np.asarray(value) for name, value in state_dict.items()}
  unexpected = [name for name in given if name not in expected]
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ValueError(f"{source}: unexpected key {unexpected[0]!r} with shape {given[unexpected[0]].shape}{more} "
                     f"for {config.precond}/{config.model_type}")
  missing = [name for name in expected if name not in given]
  hard_missing = [name for name in missing if not (config.use_step_condition and is_step_condition_name(name))]
  if hard_missing:
    more = f" (and {len(hard_missing) - 1} more)" if len(hard_missing) > 1 else ""
    raise ValueError(f"{source}: missing key {hard_missing[0]!r} (expected shape "
                     f"{expected[hard_missing[0]][1]}){more}")
  for name, value in given.items():
    if tuple(value.shape) != expected[name][1]:
      raise ValueError(f"{source}: {name!r} has shape {tuple(value.shape)}, expected {expected[name][1]}")

  fresh = {}
  if missing:
    if rng is None:
      raise ValueError(f"{source}: step-condition layers are missing (e.g. {missing[0]!r}); "
                       f"pass rng to initialise them")
    fresh = init_named(config, rng, missing)
  flat = {"params": {}, "buffers": {}}
  for name, (coll, _) in expected.items():
    value = given[name] if name in given else fresh[name]
    flat[coll][name] = jnp.asarray(value, dtype=jnp.float32)
  return {"params": _nest(flat["params"]), "buffers": _nest(flat["buffers"])}


def variables_to_state_dict(variables) -> "collections.OrderedDict[str, np.ndarray]":
  """Variables → EDM state dict: torch names, layouts and order, numpy arrays."""
  flat = {**_flatten(variables.get("buffers", {})), **_flatten(variables["params"])}
  return collections.OrderedDict((name, np.asarray(flat[name])) for name in edm_order(flat))


def count_params(variables) -> int:
  """Number of trainable parameters (EDM's `sum(p.numel() for p in net.parameters())`)."""
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables["params"])))


# ---------------------------------------------------------------------------------------------
# EDM's state-dict order. torch lists a module's own parameters, then its own buffers, then
# its children in registration order; the registration orders of EDM's classes are below.

_LEAF_RANK = {"weight": 0, "bias": 1, "resample_filter": 2, "freqs": 2, "u": 2}
_BLOCK_ORDER = ("norm0", "conv0", "affine", "norm1", "conv1", "affine_step", "skip", "norm2", "qkv", "proj")
_SONG_ORDER = ("map_noise", "map_label", "map_augment", "map_layer0", "map_layer1",
               "map_step", "map_step_layer0", "map_step_layer1", "enc", "dec")
_ADM_ORDER = ("map_noise", "map_augment", "map_layer0", "map_layer1", "map_label",
              "map_step", "map_step_layer0", "map_step_layer1", "enc", "dec", "out_norm", "out_conv")
_ENC_KINDS = ("conv", "down", "aux_down", "aux_skip", "aux_residual")
_DEC_KINDS = ("in0", "in1", "up")
_DEC_AUX = ("aux_up", "aux_norm", "aux_conv")
_RES_NAME = re.compile(r"^(\d+)x\d+_(.+)$")


def _kind_rank(kind: str, head: tuple, tail: tuple) -> int:
  if kind in head:
    return head.index(kind)
  if kind.startswith("block") and kind[5:].isdigit():
    return 100 + int(kind[5:])
  if kind in tail:
    return 10 ** 6 + tail.index(kind)
  return 10 ** 7


def _child_sort_key(parent: str, siblings: set):
  if parent in ("enc", "dec"):
    def key(name):
      m = _RES_NAME.match(name)
      if not m:
        return (1, 0, 0, name)
      res, kind = int(m.group(1)), m.group(2)
      if parent == "enc":  # from the input resolution down
        return (0, -res, _kind_rank(kind, _ENC_KINDS, ()), name)
      return (0, res, _kind_rank(kind, _DEC_KINDS, _DEC_AUX), name)
    return key
  order = _ADM_ORDER if "out_norm" in siblings else _SONG_ORDER
  if siblings & set(_BLOCK_ORDER):
    order = _BLOCK_ORDER
  return lambda name: ((0, order.index(name), name) if name in order else (1, 0, name))


def _ordered(tree: dict, parent: str, prefix: str):
  leaves = sorted((k for k, v in tree.items() if not isinstance(v, dict)), key=lambda k: (_LEAF_RANK.get(k, 9), k))
  children = [k for k, v in tree.items() if isinstance(v, dict)]
  children.sort(key=_child_sort_key(parent, set(children)))
  names = [prefix + k for k in leaves]
  for k in children:
    names += _ordered(tree[k], k, prefix + k + ".")
  return names


def edm_order(names) -> list:
  """EDM state-dict names sorted into torch's `state_dict()` order."""
  return _ordered(_nest({name: None for name in names}), "", "")
