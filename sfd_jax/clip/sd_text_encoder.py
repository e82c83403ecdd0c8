"""Stable Diffusion v1's text encoder (`FrozenCLIPEmbedder`: transformers' `CLIPTextModel` of
clip-vit-large-patch14) as pure JAX, returning `last_hidden_state` `[N, 77, width]`.

Parameters are the checkpoint's names below `cond_stage_model.transformer.text_model.` split on
'.' (`encoder.layers.0.self_attn.q_proj.weight` lives at `params['encoder']['layers']['0']
['self_attn']['q_proj']['weight']`), torch layouts kept. Checkpoints re-saved with transformers 5
lack the `text_model.` level; both layouts are read, and a missing tensor is an error, never
skipped. Blocks are pre-LayerNorm (`layer_norm1` → causal self-attention → residual,
`layer_norm2` → fc1 → quick GELU → fc2 → residual), then `final_layer_norm`; no padding mask
(SD pads with EOT and its cross-attention reads all 77 positions).
"""
import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.clip import layers, tokenizer, weights

PREFIX = 'cond_stage_model.transformer.'
TEXT_MODEL = 'text_model.'
# A buffer SD v1.x checkpoints hold (transformers 4.19 saved it); current transformers neither saves
# nor loads it (the official fixture's run ignored it too), so it is accepted and not used.
POSITION_IDS = 'embeddings.position_ids'
_ACTIVATIONS = {'quick_gelu': layers.quick_gelu, 'gelu': layers.gelu}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """A CLIP text transformer's sizes (defaults: clip-vit-large-patch14, SD v1's)."""
  vocab_size: int = 49408
  width: int = 768          # hidden_size
  layers: int = 12          # num_hidden_layers
  heads: int = 12           # num_attention_heads
  mlp: int = 3072           # intermediate_size
  positions: int = 77       # max_position_embeddings
  activation: str = 'quick_gelu'
  eps: float = 1e-5         # layer_norm_eps


SD_V1 = TextEncoderConfig()


def state_dict_shapes(config: TextEncoderConfig) -> dict:
  """Every weight below `text_model.`: name -> shape (`embeddings.position_ids` excluded)."""
  w, m = config.width, config.mlp
  shapes = {'embeddings.token_embedding.weight': (config.vocab_size, w),
            'embeddings.position_embedding.weight': (config.positions, w)}
  for i in range(config.layers):
    p = f'encoder.layers.{i}.'
    for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      shapes.update({f'{p}self_attn.{proj}.weight': (w, w), f'{p}self_attn.{proj}.bias': (w,)})
    shapes.update({f'{p}layer_norm1.weight': (w,), f'{p}layer_norm1.bias': (w,),
                   f'{p}mlp.fc1.weight': (m, w), f'{p}mlp.fc1.bias': (m,),
                   f'{p}mlp.fc2.weight': (w, m), f'{p}mlp.fc2.bias': (w,),
                   f'{p}layer_norm2.weight': (w,), f'{p}layer_norm2.bias': (w,)})
  shapes.update({'final_layer_norm.weight': (w,), 'final_layer_norm.bias': (w,)})
  return shapes


def _text_model_tensors(state_dict: Mapping[str, np.ndarray], prefix: str, source: str):
  """The tensors below `prefix` with `text_model.` (present or not) stripped from their names, and
  the prefix their names had in the file."""
  below = {name[len(prefix):]: v for name, v in state_dict.items() if name.startswith(prefix)}
  if not below:
    raise weights.CLIPWeightsError(f'{source}: no text-encoder tensors (no name starts with {prefix!r})')
  nested = {name for name in below if name.startswith(TEXT_MODEL)}
  if nested and len(nested) != len(below):
    flat = sorted(set(below) - nested)[0]
    raise weights.CLIPWeightsError(f'{source}: both layouts mixed: {prefix + TEXT_MODEL}* and {prefix + flat!r}')
  if nested:
    return {name[len(TEXT_MODEL):]: v for name, v in below.items()}, prefix + TEXT_MODEL
  return below, prefix


def text_encoder_params(state_dict: Mapping[str, np.ndarray], config: TextEncoderConfig = SD_V1,
                        prefix: str = PREFIX, source: str = 'state dict') -> dict:
  """The text encoder's parameter tree from a flat checkpoint state dict.

  Args:
    state_dict: name -> array, e.g. every tensor of `v1-5-pruned-emaonly.safetensors` (tensors
      outside `prefix` are ignored).
    config: the encoder's sizes.
    prefix: where the `CLIPTextModel` sits (`''` for a bare transformers text-encoder file).
    source: named in error messages (the file).

  Returns:
    float32 parameters, names below `text_model.` split on '.'.

  Raises:
    CLIPWeightsError: a tensor missing, unexpected or mis-shaped (the first one named with its
      full checkpoint name), or the two layouts mixed.
  """
  tensors, spelled = _text_model_tensors(state_dict, prefix, source)
  weights.check_state_dict(tensors, state_dict_shapes(config), source, optional=(POSITION_IDS,), spelled=spelled)
  tensors.pop(POSITION_IDS, None)  # positions are arange(L), as the fixture's transformers 4.57 uses them
  return weights.nest(tensors)


def encoder_layer(x, p, config: TextEncoderConfig, mask):
  """transformers' `CLIPEncoderLayer` on `[N, L, width]`."""
  h = layers.layer_norm(x, p['layer_norm1'], config.eps)
  a = p['self_attn']
  q, k, v = (layers.linear(h, a[n]['weight'], a[n]['bias']) for n in ('q_proj', 'k_proj', 'v_proj'))
  x = x + layers.linear(layers.attention(q, k, v, config.heads, mask), a['out_proj']['weight'], a['out_proj']['bias'])
  h = layers.layer_norm(x, p['layer_norm2'], config.eps)
  h = _ACTIVATIONS[config.activation](layers.linear(h, p['mlp']['fc1']['weight'], p['mlp']['fc1']['bias']))
  return x + layers.linear(h, p['mlp']['fc2']['weight'], p['mlp']['fc2']['bias'])


def encode(params, config: TextEncoderConfig, token_ids, dtype=jnp.float32):
  """`CLIPTextModel(input_ids).last_hidden_state`: `[N, L]` ids -> `[N, L, width]` in `dtype`."""
  token_ids = jnp.asarray(token_ids)
  emb = params['embeddings']
  length = token_ids.shape[1]
  x = emb['token_embedding']['weight'].astype(dtype)[token_ids]
  x = x + emb['position_embedding']['weight'][:length].astype(dtype)
  mask = layers.causal_mask(length)
  for i in range(config.layers):
    x = encoder_layer(x, params['encoder']['layers'][str(i)], config, mask)
  return layers.layer_norm(x, params['final_layer_norm'], config.eps)


encode_jit = jax.jit(encode, static_argnums=(1, 3))


def encode_prompts(params, config: TextEncoderConfig, prompts: Sequence[str], vocab=None):
  """SD's `get_learned_conditioning(prompts)`: tokenised as `FrozenCLIPEmbedder` does, encoded (jitted).

  Returns:
    `[len(prompts), 77, width]` float32.
  """
  return encode_jit(params, config, tokenizer.sd_tokenize(list(prompts), vocab, config.positions))
