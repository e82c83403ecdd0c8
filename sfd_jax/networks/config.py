"""`NetworkConfig`: everything needed to build an EDM network, hashable and JSON round-trippable.

Built from an EDM pickle's class name and constructor kwargs (`from_edm`) or from its JSON form
(`from_dict`); defaults are filled in from the Flax modules' own fields, so equal networks
compare equal however they were described.
"""
import dataclasses
import math

import numpy as np

from sfd_jax.networks.precond import model_class, precond_defaults
from sfd_jax.networks.precond import precond_class as _precond_class

# Model kwargs that the preconditioner derives and passes itself.
_MODEL_DERIVED = ("img_resolution", "in_channels", "out_channels", "label_dim", "use_step_condition",
                  "parent", "name")


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
    return _precond_class(self.precond).sigma_range(self.precond_kwargs_dict)


def _check_names(given: dict, allowed: dict, what: str) -> dict:
  for key in given:
    if key not in allowed:
      raise ValueError(f"unknown {what} {key!r} (known: {', '.join(sorted(allowed))})")
  return given
