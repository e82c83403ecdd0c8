"""Flax ports of EDM's networks behind a pure `denoise(variables, x, sigma, ...)`.

A network is described by a hashable `NetworkConfig` (`networks/config.py`) and held as
variables `{'params': ..., 'buffers': ...}` whose nested keys are EDM's state-dict names
(`networks/state_dict.py`); `networks/denoiser.py` builds and initialises the module.
"""
from sfd_jax.networks.config import NetworkConfig, model_defaults
from sfd_jax.networks.denoiser import build_module, init_variables, make_denoise, make_raw_model
from sfd_jax.networks.state_dict import (count_params, edm_order, expected_shapes, is_step_condition_name,
                                         state_dict_to_variables, variables_to_state_dict)

__all__ = ["NetworkConfig", "model_defaults", "build_module", "init_variables", "make_denoise", "make_raw_model",
           "count_params", "edm_order", "expected_shapes", "is_step_condition_name", "state_dict_to_variables",
           "variables_to_state_dict"]
