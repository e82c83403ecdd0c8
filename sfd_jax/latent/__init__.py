"""Latent-space teachers: CompVis LDM / Stable Diffusion networks in Flax behind a pure `denoise`.

`config.py` (architectures, presets, yaml), `unet.py` (UNetModel with SFD's step condition),
`autoencoder.py` (first-stage decoders), `vp.py` (the discrete VP table: sigma, sigma_inv),
`model.py` (init, `make_denoise` = CFGPrecond, `make_decode`), `state_dict.py` (checkpoint names
↔ variables, LitEma shadows), `teacher.py` (`LatentTeacher`, `load_latent_teacher`, `convert_latent_teacher`).
"""
from sfd_jax.latent.config import PRESETS, FirstStageConfig, LatentConfig, UNetConfig, resolve_arch
from sfd_jax.latent.model import init_variables, make_decode, make_denoise, make_unet
from sfd_jax.latent.state_dict import state_dict_to_variables, variables_to_state_dict
from sfd_jax.latent.vp import VPDiscrete

__all__ = ["PRESETS", "FirstStageConfig", "LatentConfig", "UNetConfig", "resolve_arch", "init_variables",
           "make_decode", "make_denoise", "make_unet", "state_dict_to_variables", "variables_to_state_dict",
           "VPDiscrete"]
