"""sfd_jax: Simple and Fast Distillation of EDM diffusion models, in JAX/Flax."""

__version__ = "0.1.0"
