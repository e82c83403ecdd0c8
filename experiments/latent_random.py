"""A latent (LDM) teacher of a real architecture with random weights, for the latent benchmarks.

Speed does not depend on the weight values: every conv / linear weight is N(0, 1/fan_in), biases
0, norm scales 1, the VQ codebook N(0, 1), and the DDPM table is LDM's `linear` schedule of the
config. The state dict goes through `sfd_jax.latent.teacher.build_teacher`, the path a real
checkpoint takes (drawn with numpy: Flax's init of a 274M-parameter UNet is slow on a CPU).
"""
import contextlib

import jax
import numpy as np

from sfd_jax.latent.config import resolve_arch
from sfd_jax.latent.state_dict import expected_shapes
from sfd_jax.latent.teacher import build_teacher


def linear_alphas_cumprod(config) -> np.ndarray:
  """LDM's 'linear' beta schedule (linspace of sqrt(beta), squared; float64, then float32)."""
  betas = np.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.timesteps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas).astype(np.float32)


def all_shapes(config) -> dict:
  """Every tensor of a checkpoint of `config`: the UNet and first stage, plus SD's CLIP text
  encoder (`cond_stage_model.transformer.text_model.*`) when the config has one."""
  shapes = dict(expected_shapes(config))
  if config.text_encoder is not None:
    from sfd_jax.clip.sd_text_encoder import state_dict_shapes  # pylint: disable=g-import-not-at-top
    prefix = 'cond_stage_model.transformer.text_model.'
    shapes.update({prefix + name: shape for name, shape in state_dict_shapes(config.text_encoder).items()})
  return shapes


def random_state_dict(config, seed: int = 0) -> dict:
  """{state-dict name: float32 array} of every parameter of `config`, plus `alphas_cumprod`."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in all_shapes(config).items():
    if name.endswith('embedding.weight'):  # the VQ codebook; CLIP's token / position tables
      value = rng.standard_normal(shape)
    elif len(shape) >= 2:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    else:  # biases 0; GroupNorm / LayerNorm scales 1
      value = np.zeros(shape) if name.endswith('bias') else np.ones(shape)
    out[name] = value.astype(np.float32)
  out['alphas_cumprod'] = linear_alphas_cumprod(config)
  return out


def random_teacher(arch='ldm-lsun-bedroom', seed: int = 0):
  """A `LatentTeacher` of architecture `arch` (preset or yaml path) with random weights."""
  config = resolve_arch(arch)
  return build_teacher(config, random_state_dict(config, seed), source=f'<random {arch}>')


@contextlib.contextmanager
def count_every_chunk():
  """While tracing inside this context, `jax.lax.map` runs unrolled (one traced call per element).

  XLA's cost analysis counts a loop body once, so a program with the query-chunked attention of
  `sfd_jax.latent.layers.attention` (over 1024 tokens: the first stages' 64x64 mid-block, SD's
  64x64 UNet levels) reports one chunk's FLOPs for all of them. Compile the program that is
  counted (not the one that is timed or measured for memory) inside this context: the same
  arithmetic, every chunk in the count. The solvers loop with `lax.scan`, which this leaves alone.
  """
  original = jax.lax.map

  def unrolled(f, xs, **kwargs):
    del kwargs  # batch_size: the unrolled map has none
    return jax.tree.map(lambda *ys: jax.numpy.stack(ys), *[f(jax.tree.map(lambda x: x[i], xs))
                                                          for i in range(jax.tree.leaves(xs)[0].shape[0])])
  jax.lax.map = unrolled
  try:
    yield
  finally:
    jax.lax.map = original
