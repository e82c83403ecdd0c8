"""Parity of the Flax network ports with EDM's PyTorch networks (tests/fixtures/edm) and the
SFD-v step-condition student (tests/fixtures/sfd)."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EDM_FIXTURES, EDM_NAMES, SFD_FIXTURES, torch
from sfd_jax import networks as nets
from sfd_jax.io.edm_pickle import read_edm_snapshot
from sfd_jax.networks.state_dict import init_named
from sfd_jax.networks.layers import Conv2d
from sfd_jax.networks.precond import iddpm_u_table


@functools.lru_cache(maxsize=None)
def _load(name):
  snap = read_edm_snapshot(EDM_FIXTURES / f"{name}.pkl")
  config = nets.NetworkConfig.from_edm(snap.precond_class, snap.init_kwargs)
  variables = nets.state_dict_to_variables(config, snap.state_dict, source=name)
  meta = json.loads((EDM_FIXTURES / f"{name}.json").read_text())
  return snap, config, variables, meta


@functools.lru_cache(maxsize=None)
def _arrays(name):
  return dict(np.load(EDM_FIXTURES / f"{name}.npz"))


@functools.lru_cache(maxsize=None)
def _jitted(config, raw=False):
  return jax.jit(nets.make_raw_model(config) if raw else nets.make_denoise(config))


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def _per_sample_max(a, b):
  return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1).max(axis=1)


def _variants(arrays):
  """(suffix, kwargs) of the fixture's calls: plain, with augment labels, dense labels."""
  class_labels = arrays.get("class_labels")
  out = [("", dict(class_labels=class_labels))]
  if "augment_labels" in arrays:
    out.append(("_aug", dict(class_labels=class_labels, augment_labels=arrays["augment_labels"])))
  if "class_labels_dense" in arrays:
    out.append(("_dense", dict(class_labels=arrays["class_labels_dense"])))
  return out


# ------------------------------------------------------------------------------------------
# Configuration.

@pytest.mark.parametrize("name", EDM_NAMES)
def test_config_from_edm_defaults_and_json_round_trip(name):
  _, config, _, meta = _load(name)
  assert config.precond == meta["precond_class"]
  assert config.model_type == meta["model_class"]
  mk = config.model_kwargs_dict
  for key, value in meta["model_init_kwargs"].items():
    if key not in ("img_resolution", "in_channels", "out_channels", "label_dim"):
      assert mk[key] == (tuple(value) if isinstance(value, list) else value), key
  assert config.dropout == meta["model_init_kwargs"]["dropout"]
  again = nets.NetworkConfig.from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False)))
  assert again == config and hash(again) == hash(config)
  attrs = meta["precond_attributes"]
  assert config.sigma_min == float(attrs["sigma_min"])
  if config.precond == "iDDPMPrecond":
    # u[0] comes from a float32 recursion over 1000 steps; torch's vectorised float32 sin
    # and ours (correctly rounded) differ by an ulp here and there: measured 1.3e-6 rel.
    np.testing.assert_allclose(config.sigma_max, attrs["sigma_max"], rtol=2e-6)
  else:
    assert config.sigma_max == float(attrs["sigma_max"])


def test_config_defaults_follow_edm():
  # EDMPrecond's default model is DhariwalUNet, VP/VE's SongUNet, iDDPM's DhariwalUNet.
  for precond, model in (("EDMPrecond", "DhariwalUNet"), ("VPPrecond", "SongUNet"),
                         ("VEPrecond", "SongUNet"), ("iDDPMPrecond", "DhariwalUNet")):
    cfg = nets.NetworkConfig.from_edm(precond, dict(img_resolution=8, img_channels=3))
    assert cfg.model_type == model
  song = nets.NetworkConfig.from_edm("VPPrecond", dict(img_resolution=8, img_channels=3)).model_kwargs_dict
  assert song["channel_mult"] == (1, 2, 2, 2) and song["attn_resolutions"] == (16,) and song["dropout"] == 0.1
  adm = nets.NetworkConfig.from_edm("EDMPrecond", dict(img_resolution=8, img_channels=3)).model_kwargs_dict
  assert adm["model_channels"] == 192 and adm["attn_resolutions"] == (32, 16, 8) and adm["num_blocks"] == 3
  vp = nets.NetworkConfig.from_edm("VPPrecond", dict(img_resolution=8, img_channels=3)).precond_kwargs_dict
  assert vp == dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, use_fp16=False)
  cfg = nets.NetworkConfig.from_edm("training.networks.EDMPrecond", dict(img_resolution=8, img_channels=3))
  assert cfg.replace_model(dropout=0.0).dropout == 0.0 and cfg.dropout == 0.1
  assert {cfg: 1}[nets.NetworkConfig.from_dict(cfg.to_dict())] == 1


@pytest.mark.parametrize("bad, match", [
    (("FooPrecond", dict(img_resolution=8, img_channels=3)), "FooPrecond"),
    (("EDMPrecond", dict(img_channels=3)), "img_resolution"),
    (("EDMPrecond", dict(img_resolution=8, img_channels=3, model_type="UNet3")), "UNet3"),
    (("EDMPrecond", dict(img_resolution=8, img_channels=3, embedding_type="fourier")), "embedding_type"),
])
def test_config_errors_name_the_culprit(bad, match):
  with pytest.raises(ValueError, match=match):
    nets.NetworkConfig.from_edm(*bad)


# ------------------------------------------------------------------------------------------
# State dicts.

@pytest.mark.parametrize("name", EDM_NAMES)
def test_layout_matches_edm_state_dict(name):
  snap, config, variables, meta = _load(name)
  listing = [(d["name"], tuple(d["shape"])) for d in meta["state_dict"]]
  assert [(k, shape) for k, (_, shape) in nets.expected_shapes(config).items()] == listing
  kinds = {d["name"]: d["kind"] for d in meta["state_dict"]}
  for k, (coll, _) in nets.expected_shapes(config).items():
    assert coll == ("params" if kinds[k] == "parameter" else "buffers"), k
  assert nets.count_params(variables) == meta["num_parameters"]
  fresh = jax.eval_shape(functools.partial(nets.init_variables, config), jax.random.key(1))
  assert sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(fresh["params"])) == meta["num_parameters"]


@pytest.mark.parametrize("name", EDM_NAMES)
def test_state_dict_round_trip_is_exact(name):
  snap, config, variables, _ = _load(name)
  # A tree_map rebuilds dicts with sorted keys: the EDM order must not depend on dict order.
  shuffled = jax.tree_util.tree_map(lambda a: a, variables)
  back = nets.variables_to_state_dict(shuffled)
  assert list(back) == list(snap.state_dict)
  for key, value in snap.state_dict.items():
    assert back[key].dtype == np.float32 and np.array_equal(back[key], value), key
  again = nets.state_dict_to_variables(config, back)
  chex.assert_trees_all_equal(again, variables)
  assert variables["params"]["model"]["enc"]["16x16_conv"]["weight"].shape == snap.state_dict[
      "model.enc.16x16_conv.weight"].shape


def test_state_dict_errors_are_one_line_and_name_source_and_key():
  snap, config, _, _ = _load("edm_ddpmpp_uncond")
  sd = dict(snap.state_dict)
  missing = {k: v for k, v in sd.items() if k != "model.map_layer1.bias"}
  extra = {**sd, "model.bogus.weight": np.zeros(3, np.float32)}
  misshapen = {**sd, "model.enc.16x16_conv.weight": np.zeros((16, 3, 1, 1), np.float32)}
  for bad, key in ((missing, "model.map_layer1.bias"), (extra, "model.bogus.weight"),
                   (misshapen, "model.enc.16x16_conv.weight")):
    with pytest.raises(ValueError) as err:
      nets.state_dict_to_variables(config, bad, source="teacher.pkl")
    msg = str(err.value)
    assert "teacher.pkl" in msg and key in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------
# Forward parity with EDM (float32 fixtures).

@pytest.mark.parametrize("name", EDM_NAMES)
def test_denoiser_matches_edm_fp32(name):
  _, config, variables, _ = _load(name)
  arrays = _arrays(name)
  x, sigma = _nhwc(arrays["x"]), jnp.asarray(arrays["sigma"])
  # Tolerance from the fixture README: fp32 rounding gives |ΔD| up to ~1e-5·(1+σ).
  tol = 2e-5 * (1 + arrays["sigma"])
  for suffix, kwargs in _variants(arrays):
    D = _jitted(config)(variables, x, sigma, **kwargs)
    assert D.dtype == jnp.float32 and D.shape == x.shape
    err = _per_sample_max(_nchw(D), arrays[f"denoised{suffix}_fp32"])
    assert np.all(err <= tol), (suffix, err, tol)
  # The raw network output F_x (iDDPM: 6 channels). Tolerance: the fixture's own
  # fp32-vs-fp64 gap of F_x reaches 1.6e-5 of max|F|; this port measures ≤ 2.5e-6.
  F = _jitted(config, raw=True)(variables, x, sigma, class_labels=arrays.get("class_labels"))
  ref = arrays["F_x_fp32"]
  assert F.shape == (4, 16, 16, ref.shape[1])
  err = _per_sample_max(_nchw(F), ref)
  assert np.all(err <= 2e-5 * np.abs(ref).max()), err


def test_denoiser_accepts_scalar_sigma_and_default_labels():
  _, config, variables, _ = _load("vp_ddpmpp_cond")
  arrays = _arrays("vp_ddpmpp_cond")
  x = _nhwc(arrays["x"])
  denoise = _jitted(config)
  per_sample = denoise(variables, x, jnp.full([4], 5.0), class_labels=np.zeros([4, 10], np.float32))
  # Broadcast [1, E] embeddings fuse differently from [N, E]: fp32 rounding, 2e-5·(1+σ).
  chex.assert_trees_all_close(denoise(variables, x, 5.0), per_sample, atol=2e-5 * 6, rtol=0)
  with pytest.raises(ValueError, match="NHWC"):
    denoise(variables, jnp.asarray(arrays["x"]), 5.0)


@pytest.mark.parametrize("name", ["ve_ncsnpp_uncond", "iddpm_adm_cond"])
def test_denoiser_in_float64_matches_edm_fp64(name):
  """Under x64 the port runs in float64 end to end, as the fixture's `_fp64` run did.
  Agreement to ~1e-15 relative shows the computation is EDM's, not merely close to it."""
  _, config, variables, _ = _load(name)
  arrays = _arrays(name)
  with jax.enable_x64(True):
    x = _nhwc(arrays["x"].astype(np.float64))
    sigma = jnp.asarray(arrays["sigma"], jnp.float64)
    D = jax.jit(nets.make_denoise(config))(variables, x, sigma, class_labels=arrays.get("class_labels"))
    assert D.dtype == jnp.float64
    err = _per_sample_max(_nchw(D), arrays["denoised_fp64"])
  assert np.all(err <= 1e-12 * (1 + arrays["sigma"])), err


# ------------------------------------------------------------------------------------------
# Fresh initialisation (EDM's init modes), layers.

def test_fresh_init_follows_edm_init_modes():
  _, song_cfg, song_loaded, _ = _load("ve_ncsnpp_uncond")
  song = nets.init_variables(song_cfg, jax.random.key(0))
  p = song["params"]["model"]
  # xavier_uniform: |w| ≤ sqrt(6 / (fan_in + fan_out)), bias 0; init_zero scales by 1e-5.
  w = np.asarray(p["map_layer0"]["weight"])
  bound = np.sqrt(6 / (32 + 64))
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  assert not np.any(np.asarray(p["map_layer0"]["bias"]))
  conv1 = np.asarray(p["enc"]["16x16_block0"]["conv1"]["weight"])
  assert 0 < np.abs(conv1).max() <= 1e-5 * np.sqrt(6 / (2 * 16 * 9))
  assert np.all(np.asarray(p["enc"]["16x16_block0"]["norm0"]["weight"]) == 1)
  # Buffers: resampling filters as EDM builds them; Fourier frequencies ~ 16·N(0, 1).
  chex.assert_trees_all_equal(
      {k: v for k, v in song["buffers"]["model"]["enc"].items()},
      {k: v for k, v in song_loaded["buffers"]["model"]["enc"].items()})
  freqs = np.asarray(song["buffers"]["model"]["map_noise"]["freqs"])
  assert freqs.shape == (16,) and 5 < freqs.std() < 40

  _, adm_cfg, _, _ = _load("iddpm_adm_cond")
  adm = nets.init_variables(adm_cfg, jax.random.key(0))
  q = adm["params"]["model"]
  assert not np.any(np.asarray(q["out_conv"]["weight"])) and not np.any(np.asarray(q["out_conv"]["bias"]))
  bias = np.asarray(q["map_layer0"]["bias"])  # kaiming_uniform · sqrt(1/3): |b| ≤ 1/sqrt(fan_in)
  assert 0 < np.abs(bias).max() <= 1 / np.sqrt(32)
  # The u table is rebuilt in float32 like EDM (up to an ulp of sin here and there).
  u_ref = read_edm_snapshot(EDM_FIXTURES / "iddpm_adm_cond.pkl").state_dict["u"]
  np.testing.assert_allclose(np.asarray(adm["buffers"]["u"]), u_ref, rtol=2e-5)
  np.testing.assert_allclose(iddpm_u_table(1000, 0.001, 0.008)[:-1], u_ref[:-1], rtol=2e-5)


def _torch_conv_reference(x, w, b, f, up, down, fused):
  """Conv2d semantics written with torch.nn.functional ops (an independent path), NCHW."""
  F = torch.nn.functional
  c_in = x.shape[1]
  w_pad = w.shape[-1] // 2 if w is not None else 0
  f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
  if fused and up and w is not None:
    x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=w_pad + f_pad)
    x = F.conv2d(x, w)
  elif fused and down and w is not None:
    x = F.conv2d(x, w, padding=w_pad + f_pad)
    x = F.conv2d(x, f.tile([w.shape[0], 1, 1, 1]), groups=w.shape[0], stride=2)
  else:
    if up:
      x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
    if down:
      x = F.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
    if w is not None:
      x = F.conv2d(x, w, padding=w_pad)
  return x if b is None else x + b.reshape(1, -1, 1, 1)


@pytest.mark.torch_reference
@pytest.mark.parametrize("kernel", [0, 1, 3])
@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode", ["up", "down", "fused_up", "fused_down"])
def test_conv2d_resampling_matches_torch(kernel, filt, mode):
  fused = mode.startswith("fused")  # without weights (kernel 0) EDM falls back to plain resampling
  up, down = mode.endswith("up"), mode.endswith("down")
  layer = Conv2d(in_channels=4, out_channels=6 if kernel else 4, kernel=kernel, up=up, down=down,
                 resample_filter=filt, fused_resample=fused, init_bias=0.5)
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x)
  p = variables.get("params", {})
  to_t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
  ref = _torch_conv_reference(
      to_t(x.transpose(0, 3, 1, 2)), to_t(p["weight"]) if kernel else None, to_t(p["bias"]) if kernel else None,
      to_t(variables["buffers"]["resample_filter"]), up, down, fused).numpy()
  assert y.shape == ref.transpose(0, 2, 3, 1).shape
  np.testing.assert_allclose(_nchw(y), ref, atol=2e-6)


@pytest.mark.torch_reference
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode", ["up", "down", "fused_up", "fused_down", "none"])
def test_conv2d_gradients_match_torch(kernel, filt, mode):
  """The gradients with respect to the input, weight and bias equal torch autograd's.

  Tolerance, relative to the largest element: each gradient element is a float32 sum of up to
  ~500 products (2 x 16 x 16 positions for a weight), so its rounding is about
  eps·sqrt(500) ≈ 2.7e-6 of the largest term; measured here up to 7.8e-7. A wrong tap, flip or
  padding gives errors of order 1."""
  fused = mode.startswith("fused")
  up, down = mode.endswith("up"), mode.endswith("down")
  layer = Conv2d(in_channels=4, out_channels=6, kernel=kernel, up=up, down=down, resample_filter=filt,
                 fused_resample=fused, init_bias=0.5)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  variables = layer.init(jax.random.key(0), x)
  y, vjp = jax.vjp(lambda params, x: layer.apply({**variables, "params": params}, x), variables["params"], x)
  ct = rng.standard_normal(y.shape).astype(np.float32)
  g_params, g_x = vjp(ct)
  to_t = lambda a: torch.from_numpy(np.array(a)).requires_grad_(True)  # noqa: E731
  tx, tw, tb = to_t(x.transpose(0, 3, 1, 2)), to_t(variables["params"]["weight"]), to_t(variables["params"]["bias"])
  f = torch.from_numpy(np.array(variables["buffers"]["resample_filter"])) if up or down else None
  ref = _torch_conv_reference(tx, tw, tb, f, up, down, fused)
  ref.backward(torch.from_numpy(_nchw(ct).copy()))
  np.testing.assert_allclose(_nchw(y), ref.detach().numpy(), atol=2e-6)
  for ours, ref in ((_nchw(g_x), tx.grad), (g_params["weight"], tw.grad), (g_params["bias"], tb.grad)):
    ref = ref.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-6 * np.abs(ref).max())


def _skip_songunet():
  init = dict(img_resolution=8, img_channels=2, model_type="SongUNet", model_channels=8, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[4], dropout=0.3, label_dim=3, encoder_type="skip",
              decoder_type="skip")
  return nets.NetworkConfig.from_edm("VEPrecond", init)


def test_songunet_skip_variant_and_dropout_only_in_training():
  """The 'skip' encoder/decoder, which no fixture covers (names follow EDM, output finite),
  and dropout: active only with train=True, driven by dropout_rng alone."""
  cfg = _skip_songunet()
  names = set(nets.expected_shapes(cfg))
  assert {"model.enc.4x4_aux_down.resample_filter", "model.enc.4x4_aux_skip.weight",
          "model.dec.8x8_aux_up.resample_filter", "model.dec.4x4_aux_conv.weight"} <= names
  variables = nets.init_variables(cfg, jax.random.key(0))
  # EDM's near-zero output layers would hide dropout: perturb every parameter.
  rng = np.random.default_rng(5)  # numpy: drawing per leaf with jax compiles a sampler per shape (30 s)
  params = jax.tree_util.tree_map(lambda p: np.asarray(p) + 0.3 * rng.standard_normal(p.shape, np.float32),
                                  variables["params"])
  variables = {**variables, "params": params}
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  sigma = jnp.array([0.5, 3.0])
  denoise = nets.make_denoise(cfg)
  jitted = jax.jit(chex.assert_max_traces(denoise, n=1))  # new values must not retrace
  labels = jnp.zeros([2, 3])
  out = jitted(variables, x, sigma, class_labels=labels)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  other = jitted(variables, x, sigma * 2, class_labels=jnp.eye(3)[:2])
  assert float(jnp.abs(other - out).max()) > 1e-4
  train = jax.jit(functools.partial(denoise, train=True))
  a = train(variables, x, sigma, class_labels=labels, dropout_rng=jax.random.key(1))
  b = train(variables, x, sigma, class_labels=labels, dropout_rng=jax.random.key(1))
  c = train(variables, x, sigma, class_labels=labels, dropout_rng=jax.random.key(2))
  chex.assert_trees_all_equal(a, b)
  assert float(jnp.abs(a - out).max()) > 1e-4 and float(jnp.abs(a - c).max()) > 1e-4
  with pytest.raises(ValueError, match="dropout_rng"):
    denoise(variables, x, sigma, train=True)


def test_init_named_equals_those_names_of_init_variables():
  """Initialising a few layers alone (the step condition's, in `state_dict_to_variables`) gives
  bit for bit what the whole network's initialiser gives them."""
  cfg = _skip_songunet()  # the initialiser the test above compiles
  full = nets.variables_to_state_dict(nets.init_variables(cfg, jax.random.key(0)))
  names = ["model.enc.4x4_aux_skip.weight", "model.dec.4x4_aux_conv.bias", "model.map_layer1.weight",
           "model.enc.8x8_block0.conv0.weight", "model.dec.8x8_aux_up.resample_filter"]
  some = init_named(cfg, jax.random.key(0), names)
  assert set(some) == set(names)
  for name in names:
    assert np.array_equal(some[name], full[name]), name
  other = init_named(cfg, jax.random.key(1), names)
  assert not np.array_equal(other["model.map_layer1.weight"], full["model.map_layer1.weight"])


# ------------------------------------------------------------------------------------------
# SFD-v step condition.

@functools.lru_cache(maxsize=None)
def _student():
  snap, teacher_cfg, teacher_vars, _ = _load("edm_ddpmpp_uncond")
  cfg = nets.NetworkConfig.from_edm(snap.precond_class, snap.init_kwargs, use_step_condition=True)
  cfg = cfg.replace_model(dropout=0.0)
  arrays = dict(np.load(SFD_FIXTURES / "sfd_iter_A.npz"))
  before = {k[len("params_before/"):]: v for k, v in arrays.items() if k.startswith("params_before/")}
  return cfg, before, arrays


def test_step_condition_student_loads_sfd_params_exactly():
  cfg, before, arrays = _student()
  assert len(before) == 171
  variables = nets.state_dict_to_variables(cfg, before, source="params_before")
  back = nets.variables_to_state_dict(variables)
  assert list(back) == list(before)
  for key, value in before.items():
    assert np.array_equal(back[key], value), key
  step_names = [k for k in before if nets.is_step_condition_name(k)]
  assert len(step_names) == 4 + 2 * 10  # map_step_layer0/1 + affine_step in 10 UNetBlocks

  # The student's first denoiser call of iteration 1 (step 1, parameters before training),
  # replayed from the fixture's own float32 inputs: x = (x_prev / t_cur) · t'0.
  t_cur, t0 = arrays["t_steps"][1], arrays["student_inner_t_iter1"][1, 0]
  x = (arrays["student_out_iter1"][0] / t_cur) * t0
  D = _jitted(cfg)(variables, _nhwc(x), t0)
  err = _per_sample_max(_nchw(D), arrays["student_denoised_iter1"][0])
  assert np.all(err <= 2e-5 * (1 + t0)), err


def test_step_condition_changes_output_and_none_reproduces_teacher():
  cfg, before, _ = _student()
  _, teacher_cfg, teacher_vars, _ = _load("edm_ddpmpp_uncond")
  student_vars = nets.state_dict_to_variables(cfg, before)
  arrays = _arrays("edm_ddpmpp_uncond")
  x, sigma = _nhwc(arrays["x"]), jnp.asarray(arrays["sigma"])
  teacher = _jitted(teacher_cfg)(teacher_vars, x, sigma)
  student = _jitted(cfg)
  chex.assert_trees_all_equal(student(student_vars, x, sigma), teacher)
  d4 = student(student_vars, x, sigma, step_condition=4.0)
  d5 = student(student_vars, x, sigma, step_condition=5.0)
  assert float(jnp.abs(d4 - teacher).max()) > 1e-2 and float(jnp.abs(d4 - d5).max()) > 1e-3
  with pytest.raises(ValueError, match="step_condition"):
    _jitted(teacher_cfg)(teacher_vars, x, sigma, step_condition=4.0)


@pytest.mark.parametrize("name", ["edm_ddpmpp_uncond", "edm_adm_cond"])
def test_missing_step_layers_are_initialised_from_rng(name):
  snap, teacher_cfg, teacher_vars, _ = _load(name)
  # dropout 0 as the SFD student (shares compiled functions with the tests above).
  cfg = nets.NetworkConfig.from_edm(snap.precond_class, snap.init_kwargs, use_step_condition=True)
  cfg = cfg.replace_model(dropout=0.0)
  with pytest.raises(ValueError, match="rng"):
    nets.state_dict_to_variables(cfg, snap.state_dict, source=name)
  variables = nets.state_dict_to_variables(cfg, snap.state_dict, jax.random.key(3), source=name)
  sd = nets.variables_to_state_dict(variables)
  fresh = {k: v for k, v in sd.items() if nets.is_step_condition_name(k)}
  assert fresh and set(sd) - set(fresh) == set(snap.state_dict)
  for key, value in snap.state_dict.items():
    assert np.array_equal(sd[key], value), key
  w = fresh["model.map_step_layer0.weight"]
  if cfg.model_type == "SongUNet":  # sfd-main: xavier-uniform weights, zero biases
    assert np.abs(w).max() <= np.sqrt(6 / sum(w.shape))
    assert not any(np.any(v) for k, v in fresh.items() if k.endswith(".bias"))
  else:  # EDM's ADM init: kaiming-uniform · sqrt(1/3) weights and biases
    assert np.abs(w).max() <= 1 / np.sqrt(w.shape[1])
    assert np.any(fresh["model.map_step_layer0.bias"])
  arrays = _arrays(name)
  x, sigma = _nhwc(arrays["x"]), jnp.asarray(arrays["sigma"])
  labels = arrays.get("class_labels")
  student = _jitted(cfg)
  chex.assert_trees_all_equal(student(variables, x, sigma, class_labels=labels),
                              _jitted(teacher_cfg)(teacher_vars, x, sigma, class_labels=labels))
  changed = student(variables, x, sigma, class_labels=labels, step_condition=4.0)
  assert float(jnp.abs(changed - student(variables, x, sigma, class_labels=labels)).max()) > 1e-3
