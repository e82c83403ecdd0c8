"""Where the step's per-sample `condition` comes from: none, one-hot class labels, or (Stable
Diffusion) text embeddings of prompts drawn per iteration.

The step carries a `condition` array without knowing its kind; a `ConditionSource` says how a
batch of them is drawn from a key (traced under `jit`, sharded with the batch) and which fixed
conditions a sample grid shows. Nothing here imports Flax.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


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
