"""UNet block variants that no fixture exercises (scale-shift norm, ResBlock up/down sampling,
pooling without a convolution, `QKVAttention`'s q/k/v-first channel order, `num_heads`), against
the official computation written with torch's functional ops on NCHW tensors: a second path
through other code and another layout.

Tolerance 1e-5 absolute for outputs of magnitude ~1-10: both sides are float32 with differently
ordered reductions (measured ≤ 3.6e-6, 2026-12-07).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.latent import unet as unet_lib
from sfd_jax.latent.config import UNetConfig

TOL = 1e-5


def randomised(params, seed):
  """Every parameter redrawn: matrices randn/sqrt(fan_in), vectors 1 + 0.1·randn (norm weights) or 0.1·randn."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, name = leaf.shape, "/".join(str(getattr(k, "key", k)) for k in path)
    if len(shape) > 1:
      return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    base = 1.0 if "norm" in name.lower() or "layers/0/weight" in name else 0.0
    return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def torch_group_norm(torch, x, p, eps=1e-5):
  return torch.nn.functional.group_norm(x, 32, torch.tensor(p["weight"]), torch.tensor(p["bias"]), eps)


def torch_conv(torch, x, p, **kw):
  return torch.nn.functional.conv2d(x, torch.tensor(p["weight"]), torch.tensor(p["bias"]), **kw)


def torch_resblock(torch, x, emb, p, *, up, down, scale_shift):
  """ResBlock as openaimodel.py computes it, NCHW."""
  f = torch.nn.functional
  resample = ((lambda t: f.interpolate(t, scale_factor=2, mode="nearest")) if up
              else (lambda t: f.avg_pool2d(t, 2, 2)) if down else (lambda t: t))
  h = f.silu(torch_group_norm(torch, x, p["in_layers"]["0"]))
  h, x = resample(h), resample(x)
  h = torch_conv(torch, h, p["in_layers"]["2"], padding=1)
  emb_out = f.linear(f.silu(emb), torch.tensor(p["emb_layers"]["1"]["weight"]),
                     torch.tensor(p["emb_layers"]["1"]["bias"]))[:, :, None, None]
  if scale_shift:
    scale, shift = torch.chunk(emb_out, 2, dim=1)
    h = torch_group_norm(torch, h, p["out_layers"]["0"]) * (1 + scale) + shift
  else:
    h = torch_group_norm(torch, h + emb_out, p["out_layers"]["0"])
  h = torch_conv(torch, f.silu(h), p["out_layers"]["3"], padding=1)
  skip = torch_conv(torch, x, p["skip_connection"]) if "skip_connection" in p else x
  return skip + h


@pytest.mark.torch_reference
@pytest.mark.parametrize("up, down, scale_shift", [(False, True, True), (True, False, True), (False, False, False)])
def test_resblock_variants(up, down, scale_shift):
  import torch  # pylint: disable=g-import-not-at-top
  block = unet_lib.ResBlock(channels=32, emb_channels=48, out_channels=64, use_scale_shift_norm=scale_shift,
                            up=up, down=down)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  emb = jax.random.normal(jax.random.key(1), (2, 48))
  params = randomised(block.init(jax.random.key(2), x, emb, emb)["params"], seed=3)
  ours = np.asarray(jax.jit(block.apply)({"params": params}, x, emb))
  p = jax.tree.map(np.asarray, params)
  want = torch_resblock(torch, torch.tensor(np.moveaxis(np.asarray(x), -1, 1)), torch.tensor(np.asarray(emb)), p,
                        up=up, down=down, scale_shift=scale_shift).numpy()
  np.testing.assert_allclose(np.moveaxis(ours, -1, 1), want, rtol=0, atol=TOL)
  if scale_shift:  # the official ResBlock has no scale-shift variant of the step condition
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
      block.apply({"params": params}, x, emb, emb)


def torch_attention(torch, x, p, heads, new_order):
  """AttentionBlock with QKVAttentionLegacy (new_order False) or QKVAttention, NCHW."""
  b, c, hh, ww = x.shape
  x = x.reshape(b, c, -1)
  qkv = torch.nn.functional.conv1d(torch_group_norm(torch, x[..., None], p["norm"])[..., 0],
                                   torch.tensor(p["qkv"]["weight"]), torch.tensor(p["qkv"]["bias"]))
  ch = c // heads
  if new_order:
    q, k, v = (t.reshape(b * heads, ch, -1) for t in qkv.chunk(3, dim=1))
  else:
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
  scale = ch ** -0.25
  weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
  h = torch.nn.functional.conv1d(a, torch.tensor(p["proj_out"]["weight"]), torch.tensor(p["proj_out"]["bias"]))
  return (x + h).reshape(b, c, hh, ww)


@pytest.mark.torch_reference
@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_channel_orders(new_order):
  import torch  # pylint: disable=g-import-not-at-top
  block = unet_lib.AttentionBlock(channels=64, num_heads=4, new_order=new_order)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
  params = randomised(block.init(jax.random.key(1), x)["params"], seed=2)
  ours = np.asarray(jax.jit(block.apply)({"params": params}, x))
  want = torch_attention(torch, torch.tensor(np.moveaxis(np.asarray(x), -1, 1)), jax.tree.map(np.asarray, params),
                         4, new_order).numpy()
  np.testing.assert_allclose(np.moveaxis(ours, -1, 1), want, rtol=0, atol=TOL)


def test_heads_and_plan_of_variants():
  """num_heads vs num_head_channels, and a UNet with resblock_updown / scale-shift / pooling runs
  and has the official layer layout (ResBlock down/up in place of Downsample/Upsample)."""
  cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                   channel_mult=(1, 2), num_heads=4, use_scale_shift_norm=True, resblock_updown=True,
                   use_new_attention_order=True)
  assert cfg.attention_heads(64) == (4, 16)
  assert UNetConfig(4, 4, 32, 1, (1,), num_head_channels=8).attention_heads(64) == (8, 8)
  model = unet_lib.UNetModel(cfg)
  x = jnp.ones([1, 8, 8, 4])
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.ones([1])))["params"]
  assert "op" not in params["input_blocks"]["2"]["0"] and "in_layers" in params["input_blocks"]["2"]["0"]
  assert params["input_blocks"]["3"]["0"]["emb_layers"]["1"]["weight"].shape == (128, 128)  # 2 · 64 (scale, shift)
  assert "in_layers" in params["output_blocks"]["1"]["2"]  # ResBlock(up=True) at index 2
  pooled = UNetConfig(4, 4, 32, 1, (), channel_mult=(1, 2), num_heads=1, conv_resample=False)
  params = jax.eval_shape(lambda: unet_lib.UNetModel(pooled).init(jax.random.key(0), x, jnp.ones([1])))["params"]
  assert "2" not in params["input_blocks"] or not params["input_blocks"]["2"]  # avg-pool Downsample: no weights
