"""open_clip's `CLIP` model (the ViT-g-14 family) as pure JAX: image and text towers.

Parameters are open_clip's state dict split on '.' (`visual.transformer.resblocks.0.attn.
in_proj_weight` lives at `params['visual']['transformer']['resblocks']['0']['attn']
['in_proj_weight']`), torch layouts kept. Blocks are pre-LayerNorm: `x += MHA(ln_1(x))`,
`x += c_proj(GELU(c_fc(ln_2(x))))`, exact-erf GELU, LayerNorm eps 1e-5, no layer scale.

* image: patch convolution (kernel = stride = patch, no bias), class token first, positional
  embedding, `ln_pre`, blocks, `ln_post`, class token, `@ visual.proj`;
* text: token + positional embedding, blocks under a causal mask, `ln_final`, the position of
  the largest id (EOT, the first if repeated), `@ text_projection`.
"""
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from sfd_jax.clip import layers

# open_clip's `ViT-g-14.json` (the CLIP-score model, `laion2b_s34b_b88k`).
VIT_G_14 = {'embed_dim': 1024,
            'vision_cfg': {'image_size': 224, 'layers': 40, 'width': 1408, 'head_width': 88, 'mlp_ratio': 4.3637,
                           'patch_size': 14},
            'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 1024, 'heads': 16, 'layers': 24}}


@dataclasses.dataclass(frozen=True)
class OpenCLIPConfig:
  """The sizes of an open_clip `CLIP` model (ViT image tower, causal text tower)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp: int

  @classmethod
  def from_open_clip_json(cls, cfg: Mapping[str, Any]) -> 'OpenCLIPConfig':
    """Sizes from an open_clip model-config dict, with open_clip's defaults for absent keys.

    Vision heads are `width // head_width` (head_width defaults to 64), MLP widths
    `int(width * mlp_ratio)` (ratio 4.0 by default).
    """
    vision, text = cfg['vision_cfg'], cfg['text_cfg']
    return cls(embed_dim=cfg['embed_dim'], image_size=vision['image_size'], patch_size=vision['patch_size'],
               vision_width=vision['width'], vision_layers=vision['layers'],
               vision_heads=vision['width'] // vision.get('head_width', 64),
               vision_mlp=int(vision['width'] * vision.get('mlp_ratio', 4.0)),
               context_length=text.get('context_length', 77), vocab_size=text.get('vocab_size', 49408),
               text_width=text['width'], text_layers=text['layers'], text_heads=text.get('heads', 8),
               text_mlp=int(text['width'] * text.get('mlp_ratio', 4.0)))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def _block_shapes(prefix, width, mlp):
  return {f'{prefix}.ln_1.weight': (width,), f'{prefix}.ln_1.bias': (width,),
          f'{prefix}.attn.in_proj_weight': (3 * width, width), f'{prefix}.attn.in_proj_bias': (3 * width,),
          f'{prefix}.attn.out_proj.weight': (width, width), f'{prefix}.attn.out_proj.bias': (width,),
          f'{prefix}.ln_2.weight': (width,), f'{prefix}.ln_2.bias': (width,),
          f'{prefix}.mlp.c_fc.weight': (mlp, width), f'{prefix}.mlp.c_fc.bias': (mlp,),
          f'{prefix}.mlp.c_proj.weight': (width, mlp), f'{prefix}.mlp.c_proj.bias': (width,)}


def state_dict_shapes(config: OpenCLIPConfig) -> dict:
  """Every tensor of open_clip's `CLIP.state_dict()` for `config`: name -> shape."""
  c, wv, wt = config, config.vision_width, config.text_width
  shapes = {'positional_embedding': (c.context_length, wt), 'text_projection': (wt, c.embed_dim),
            'logit_scale': (), 'visual.class_embedding': (wv,),
            'visual.positional_embedding': (c.grid ** 2 + 1, wv), 'visual.proj': (wv, c.embed_dim),
            'visual.conv1.weight': (wv, 3, c.patch_size, c.patch_size),
            'visual.ln_pre.weight': (wv,), 'visual.ln_pre.bias': (wv,)}
  for i in range(c.vision_layers):
    shapes.update(_block_shapes(f'visual.transformer.resblocks.{i}', wv, c.vision_mlp))
  shapes.update({'visual.ln_post.weight': (wv,), 'visual.ln_post.bias': (wv,),
                 'token_embedding.weight': (c.vocab_size, wt)})
  for i in range(c.text_layers):
    shapes.update(_block_shapes(f'transformer.resblocks.{i}', wt, c.text_mlp))
  shapes.update({'ln_final.weight': (wt,), 'ln_final.bias': (wt,)})
  return shapes


def residual_block(x, p, heads, mask=None):
  """open_clip's `ResidualAttentionBlock` (torch `nn.MultiheadAttention` inside)."""
  h = layers.layer_norm(x, p['ln_1'])
  q, k, v = jnp.split(layers.linear(h, p['attn']['in_proj_weight'], p['attn']['in_proj_bias']), 3, axis=-1)
  h = layers.attention(q, k, v, heads, mask)
  x = x + layers.linear(h, p['attn']['out_proj']['weight'], p['attn']['out_proj']['bias'])
  h = layers.gelu(layers.linear(layers.layer_norm(x, p['ln_2']), p['mlp']['c_fc']['weight'], p['mlp']['c_fc']['bias']))
  return x + layers.linear(h, p['mlp']['c_proj']['weight'], p['mlp']['c_proj']['bias'])


def transformer(x, p, num_layers, heads, mask=None):
  """`num_layers` residual blocks `p['resblocks']['0']`, ... on `[N, L, W]`."""
  for i in range(num_layers):
    x = residual_block(x, p['resblocks'][str(i)], heads, mask)
  return x


def patch_embed(pixels, weight):
  """Conv2d with kernel = stride = patch and no bias, as a product over each patch.

  Args:
    pixels: `[N, H, W, 3]` normalised images.
    weight: `[width, 3, patch, patch]` (OIHW).

  Returns:
    `[N, grid * grid, width]`, patches in row-major order.
  """
  n, h, w, c = pixels.shape
  size = weight.shape[-1]
  patches = pixels.reshape(n, h // size, size, w // size, size, c)
  out = jnp.einsum('nyhxwc,ochw->nyxo', patches, weight.astype(pixels.dtype), precision=layers.HIGHEST)
  return out.reshape(n, -1, weight.shape[0])


def encode_image(params, config: OpenCLIPConfig, pixels):
  """`model.encode_image`: `[N, S, S, 3]` normalised pixels (S = image_size) -> `[N, embed_dim]`."""
  v = params['visual']
  x = patch_embed(pixels, v['conv1']['weight'])
  cls = jnp.broadcast_to(v['class_embedding'].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + v['positional_embedding'].astype(x.dtype)
  x = transformer(layers.layer_norm(x, v['ln_pre']), v['transformer'], config.vision_layers, config.vision_heads)
  pooled = layers.layer_norm(x[:, 0], v['ln_post'])
  return jnp.einsum('nw,we->ne', pooled, v['proj'].astype(x.dtype), precision=layers.HIGHEST)


def encode_text(params, config: OpenCLIPConfig, token_ids, dtype=jnp.float32):
  """`model.encode_text`: `[N, L]` open_clip token ids -> `[N, embed_dim]` in `dtype`.

  No padding mask: the causal mask already keeps the padding (id 0, also a real token) out of
  every position up to EOT, the pooled one.
  """
  token_ids = jnp.asarray(token_ids)
  x = params['token_embedding']['weight'].astype(dtype)[token_ids] + params['positional_embedding'].astype(dtype)
  mask = layers.causal_mask(token_ids.shape[1])
  x = layers.layer_norm(transformer(x, params['transformer'], config.text_layers, config.text_heads, mask),
                        params['ln_final'])
  pooled = jnp.take_along_axis(x, jnp.argmax(token_ids, axis=-1)[:, None, None], axis=1)[:, 0]
  return jnp.einsum('nw,we->ne', pooled, params['text_projection'].astype(dtype), precision=layers.HIGHEST)
