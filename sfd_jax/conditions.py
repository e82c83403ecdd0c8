"""Where the step's per-sample `condition` comes from: none, one-hot class labels, or (Stable
Diffusion) text embeddings of prompts drawn per iteration.

The step carries a `condition` array without knowing its kind; a `ConditionSource` says how a
batch of them is drawn from a key (traced under `jit`, sharded with the batch) and which fixed
conditions a sample grid shows. Nothing here imports Flax.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ConditionSource(NamedTuple):
  """How conditions are made.

  Attributes:
    draw: `draw(variables, key, n)` → `[n, ...]` float32 conditions, or None (traced under jit).
    grid: `grid(variables, n)` → the conditions of an n-image sample grid, or None.
    variables: arrays `draw` and `grid` need (a frozen text encoder, a token table), put on the
      devices once; None when they need none.
  """
  draw: Callable
  grid: Callable
  variables: Any = None


def unconditional() -> ConditionSource:
  """No condition: the step's `condition` is None."""
  return ConditionSource(draw=lambda variables, key, n: None, grid=lambda variables, n: None)


def one_hot_labels(label_dim: int) -> ConditionSource:
  """Uniform one-hot class labels `[n, label_dim]` (EDM's conditional teachers); grids cycle the
  classes. `label_dim` 0 is `unconditional()`."""
  if not label_dim:
    return unconditional()

  def draw(variables, key, n):
    del variables
    return jax.nn.one_hot(jax.random.randint(key, (n,), 0, label_dim), label_dim, dtype=jnp.float32)

  def grid(variables, n):
    del variables
    return jax.nn.one_hot(jnp.arange(n) % label_dim, label_dim, dtype=jnp.float32)

  return ConditionSource(draw=draw, grid=grid)


def text_prompts(token_ids, encode: Callable, encoder_variables) -> ConditionSource:
  """Text embeddings of prompts (Stable Diffusion): each draw picks `n` distinct prompts from the
  key (the official loop's `random.sample(captions, batch)`; Python's `random` stream itself
  cannot be replayed in JAX) and encodes them with the frozen text encoder, inside the caller's
  jit. Grids show the first `n` prompts (cycled when there are fewer).

  Args:
    token_ids: `[P, L]` ids of every prompt, tokenised once on the host.
    encode: pure `encode(encoder_variables, ids [n, L]) -> [n, L, D]` float32 (e.g. a latent
      teacher's `encode_tokens`).
    encoder_variables: the text encoder's weights (frozen).

  Returns:
    The source; its `variables` hold the weights and the id table.
  """
  num_prompts = int(np.shape(token_ids)[0])

  def draw(variables, key, n):
    if n > num_prompts:
      raise ValueError(f'cannot draw {n} distinct prompts out of {num_prompts}')
    index = jax.random.choice(key, num_prompts, (n,), replace=False)
    return encode(variables['encoder'], jnp.take(jnp.asarray(variables['token_ids']), index, axis=0))

  def grid(variables, n):
    return encode(variables['encoder'], jnp.asarray(variables['token_ids'])[jnp.arange(n) % num_prompts])

  return ConditionSource(draw=draw, grid=grid,
                         variables=dict(encoder=encoder_variables, token_ids=np.asarray(token_ids, np.int32)))
