"""Flax ports of EDM's networks: configuration, initialisation, denoiser and state-dict I/O.

A network is described by a hashable `NetworkConfig` (built from an EDM pickle's class name
and constructor kwargs) and held as variables `{'params': ..., 'buffers': ...}` whose nested
keys are EDM's state-dict names, so converting to and from EDM's layout is a renaming.
"""
import collections
import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.networks.precond import build_precond, iddpm_u_table, model_class, precond_defaults, vp_sigma
from sfd_jax.networks.precond import precond_class as _precond_class

__all__ = ["NetworkConfig", "init_variables", "make_denoise", "make_raw_model", "state_dict_to_variables",
           "variables_to_state_dict", "count_params", "build_module", "expected_shapes", "is_step_condition_name"]

# Model kwargs that the preconditioner derives and passes itself.
_MODEL_DERIVED = ("img_resolution", "in_channels", "out_channels", "label_dim", "use_step_condition",
                  "parent", "name")
_STEP_CONDITION_LAYERS = ("map_step", "map_step_layer0", "map_step_layer1", "affine_step")


def _plain(value):
  """Pickled kwarg → hashable plain Python value (lists → tuples, numpy scalars → Python)."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return _plain(value.tolist())
  return value


def _json_value(value):
  """Hashable config value → JSON-safe value (tuples → lists, ±inf/nan → strings)."""
  if isinstance(value, tuple):
    return [_json_value(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _from_json_value(value):
  """Inverse of `_json_value` for the values configs hold."""
  if isinstance(value, list):
    return tuple(_from_json_value(v) for v in value)
  if isinstance(value, str) and value in ("inf", "-inf", "nan"):
    return float(value)
  return value


def model_defaults(model_type: str) -> dict:
  """Constructor defaults of an EDM U-Net besides what the preconditioner passes."""
  cls = model_class(model_type)
  return {f.name: _plain(f.default) for f in dataclasses.fields(cls) if f.name not in _MODEL_DERIVED}


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """Everything needed to build an EDM network; hashable and JSON round-trippable.

  Attributes:
    precond: 'EDMPrecond' | 'VPPrecond' | 'VEPrecond' | 'iDDPMPrecond'.
    model_type: 'SongUNet' | 'DhariwalUNet'.
    img_resolution, img_channels, label_dim: image shape and number of classes (0: none).
    precond_kwargs: sorted (name, value) pairs of the preconditioner's constants, defaults
      filled in (use_fp16, sigma_data, beta_d, ...).
    model_kwargs: sorted (name, value) pairs of the U-Net's kwargs, defaults filled in.
    use_step_condition: SFD-v step-condition layers present.
  """

  precond: str
  model_type: str
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  precond_kwargs: tuple = ()
  model_kwargs: tuple = ()
  use_step_condition: bool = False

  def __post_init__(self):
    # Normalise so that equal networks compare (and hash) equal however they were built.
    precond = _precond_class(self.precond).__name__
    model_class(self.model_type)
    pk = precond_defaults(precond)
    pk.pop("model_type")
    pk.update(_check_names(dict(self.precond_kwargs), pk, f"{precond} kwarg"))
    mk = model_defaults(self.model_type)
    mk.update(_check_names(dict(self.model_kwargs), mk, f"{self.model_type} kwarg"))
    object.__setattr__(self, "precond", precond)
    object.__setattr__(self, "img_resolution", int(self.img_resolution))
    object.__setattr__(self, "img_channels", int(self.img_channels))
    object.__setattr__(self, "label_dim", int(self.label_dim))
    object.__setattr__(self, "precond_kwargs", tuple(sorted((k, _plain(v)) for k, v in pk.items())))
    object.__setattr__(self, "model_kwargs", tuple(sorted((k, _plain(v)) for k, v in mk.items())))
    object.__setattr__(self, "use_step_condition", bool(self.use_step_condition))

  @classmethod
  def from_edm(cls, precond_class: str, init_kwargs: dict, *,
               use_step_condition: bool = False) -> "NetworkConfig":
    """Config of a network pickled by EDM (`class_name`, `_init_kwargs`).

    Args:
      precond_class: e.g. 'EDMPrecond' (a dotted path is accepted).
      init_kwargs: the constructor kwargs as recorded in the pickle.
      use_step_condition: add SFD-v's step-condition layers.

    Raises:
      ValueError: unknown class, missing image shape or unknown kwarg (named).
    """
    precond = _precond_class(precond_class).__name__
    kwargs = {k: _plain(v) for k, v in init_kwargs.items()}
    for key in ("img_resolution", "img_channels"):
      if key not in kwargs:
        raise ValueError(f"{precond} init_kwargs: missing {key!r}")
    shape = {key: kwargs.pop(key) for key in ("img_resolution", "img_channels")}
    label_dim = kwargs.pop("label_dim", 0)
    pk = precond_defaults(precond)
    model_type = kwargs.pop("model_type", pk.pop("model_type"))
    pk.pop("model_type", None)
    precond_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in pk}
    return cls(precond=precond, model_type=model_type, label_dim=label_dim, **shape,
               precond_kwargs=tuple(precond_kwargs.items()), model_kwargs=tuple(kwargs.items()),
               use_step_condition=use_step_condition)

  def to_dict(self) -> dict:
    """JSON-safe dict (lists for tuples, 'inf' for infinity)."""
    return {"precond": self.precond, "model_type": self.model_type, "img_resolution": self.img_resolution,
            "img_channels": self.img_channels, "label_dim": self.label_dim,
            "precond_kwargs": {k: _json_value(v) for k, v in self.precond_kwargs},
            "model_kwargs": {k: _json_value(v) for k, v in self.model_kwargs},
            "use_step_condition": self.use_step_condition}

  @classmethod
  def from_dict(cls, d: dict) -> "NetworkConfig":
    """Inverse of `to_dict`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"NetworkConfig.from_dict: unknown key {unknown[0]!r}")
    d = dict(d)
    for key in ("precond_kwargs", "model_kwargs"):
      d[key] = tuple((k, _from_json_value(v)) for k, v in dict(d.get(key, {})).items())
    return cls(**d)

  def replace_model(self, **kwargs) -> "NetworkConfig":
    """Copy with some U-Net kwargs changed, e.g. `replace_model(dropout=0.0)`."""
    mk = dict(self.model_kwargs)
    mk.update(_check_names(kwargs, mk, f"{self.model_type} kwarg"))
    return dataclasses.replace(self, model_kwargs=tuple(mk.items()))

  @property
  def precond_kwargs_dict(self) -> dict:
    return dict(self.precond_kwargs)

  @property
  def model_kwargs_dict(self) -> dict:
    return dict(self.model_kwargs)

  @property
  def dropout(self) -> float:
    return float(self.model_kwargs_dict["dropout"])

  @property
  def augment_dim(self) -> int:
    return int(self.model_kwargs_dict["augment_dim"])

  @property
  def sigma_min(self) -> float:
    """EDM's `net.sigma_min` (VP: σ(epsilon_t); iDDPM: u[M−1])."""
    return self._sigma_range()[0]

  @property
  def sigma_max(self) -> float:
    """EDM's `net.sigma_max` (VP: σ(1); iDDPM: u[0])."""
    return self._sigma_range()[1]

  def _sigma_range(self):
    pk = self.precond_kwargs_dict
    if self.precond == "VPPrecond":
      return (float(vp_sigma(pk["epsilon_t"], pk["beta_d"], pk["beta_min"])),
              float(vp_sigma(1, pk["beta_d"], pk["beta_min"])))
    if self.precond == "iDDPMPrecond":
      u = _u_table(pk["M"], pk["C_1"], pk["C_2"])
      return float(u[pk["M"] - 1]), float(u[0])
    return float(pk["sigma_min"]), float(pk["sigma_max"])


@functools.lru_cache(maxsize=8)
def _u_table(M, C_1, C_2):
  return iddpm_u_table(M, C_1, C_2)


def _check_names(given: dict, allowed: dict, what: str) -> dict:
  for key in given:
    if key not in allowed:
      raise ValueError(f"unknown {what} {key!r} (known: {', '.join(sorted(allowed))})")
  return given


def build_module(config: NetworkConfig):
  """The (unbound) Flax preconditioner module for `config`."""
  pk = config.precond_kwargs_dict
  return build_precond(config.precond, config.img_resolution, config.img_channels, config.label_dim,
                       pk, config.model_kwargs_dict, config.use_step_condition, model_type=config.model_type)


def _init_inputs(config: NetworkConfig):
  """Dummy inputs that reach every layer (labels, augment labels, step condition)."""
  x = jnp.zeros([1, config.img_resolution, config.img_resolution, config.img_channels], jnp.float32)
  class_labels = jnp.zeros([1, config.label_dim], jnp.float32) if config.label_dim else None
  augment = jnp.zeros([1, config.augment_dim], jnp.float32) if config.augment_dim else None
  step = 1.0 if config.use_step_condition else None
  return x, jnp.ones([1], jnp.float32), class_labels, augment, step


def init_variables(config: NetworkConfig, rng) -> dict:
  """Freshly initialised variables with EDM's init modes.

  Args:
    config: the network.
    rng: a `jax.random.key`.

  Returns:
    {'params': ..., 'buffers': ...}, nested by EDM state-dict names, float32.
  """
  module = build_module(config)
  x, sigma, class_labels, augment, step = _init_inputs(config)

  @jax.jit
  def init(rng):
    # Parameters are drawn from an RngBitGenerator key derived from `rng`: one threefry
    # stream per tensor makes XLA compile the initialiser ~4x slower.
    rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
    return module.init({"params": rbg}, x, sigma, class_labels, augment, step)

  variables = init(rng)
  return {"params": _as_dict(variables["params"]), "buffers": _as_dict(variables.get("buffers", {}))}


def _as_dict(tree):
  if hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _nest(flat: dict) -> dict:
  out = {}
  for name, value in flat.items():
    node = out
    *path, leaf = name.split(".")
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def expected_shapes(config: NetworkConfig) -> "collections.OrderedDict[str, tuple]":
  """{EDM state-dict name: (collection, shape)} in EDM's order, without computing anything."""
  shapes = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
  flat = {name: (coll, tuple(leaf.shape)) for coll in ("params", "buffers")
          for name, leaf in _flatten(shapes[coll]).items()}
  return collections.OrderedDict((name, flat[name]) for name in edm_order(flat))


def is_step_condition_name(name: str) -> bool:
  """Whether a state-dict name belongs to SFD-v's step-condition layers."""
  return any(part in _STEP_CONDITION_LAYERS for part in name.split("."))


def _check_x(config: NetworkConfig, x):
  want = (config.img_resolution, config.img_resolution, config.img_channels)
  if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != want:
    raise ValueError(f"denoise: x has shape {tuple(jnp.shape(x))}, expected [N, {want[0]}, {want[1]}, "
                     f"{want[2]}] (NHWC)")


def _make_apply(config: NetworkConfig, return_model_output: bool) -> Callable:
  module = build_module(config)
  needs_rng = config.dropout > 0 or float(config.model_kwargs_dict.get("label_dropout", 0)) > 0

  def apply(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None, *,
            train=False, dropout_rng=None):
    _check_x(config, x)
    if step_condition is not None and not config.use_step_condition:
      raise ValueError("denoise: step_condition given but the network has no step-condition layers "
                       "(config.use_step_condition is False)")
    if train and needs_rng and dropout_rng is None:
      raise ValueError("denoise: train=True with dropout needs dropout_rng")
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    out = module.apply({"params": variables["params"], "buffers": variables.get("buffers", {})},
                       x, sigma, class_labels, augment_labels, step_condition, train=train,
                       return_model_output=return_model_output, rngs=rngs)
    return out[1] if return_model_output else out

  return apply


def make_denoise(config: NetworkConfig) -> Callable:
  """The denoiser D(x; σ) of `config` as a pure, jit-able function.

  Returns:
    `denoise(variables, x, sigma, class_labels=None, augment_labels=None, step_condition=None,
    *, train=False, dropout_rng=None) -> D` with x and D NHWC [N, H, W, C], sigma a scalar or
    [N]. Runs in float32 (float64 if x is float64 under x64); convolutions and matmuls
    use JAX's default precision, so on GPU/TPU wrap calls in
    `jax.default_matmul_precision('highest')` for EDM's float32 numbers.
  """
  return _make_apply(config, return_model_output=False)


def make_raw_model(config: NetworkConfig) -> Callable:
  """Like `make_denoise`, but returns the inner U-Net's raw output F_x (NHWC; iDDPM has
  2·img_channels channels)."""
  return _make_apply(config, return_model_output=True)


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
    fresh_vars = init_variables(config, rng)
    fresh = {**_flatten(fresh_vars["params"]), **_flatten(fresh_vars["buffers"])}
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
