"""Reading LDM checkpoints: the Lightning-era `.ckpt` through the restricted unpickler,
`.safetensors` without torch, presets and yaml architectures, refusals in one line, LitEma shadows."""
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import FIXTURES
from sfd_jax.io.ldm_checkpoint import read_ckpt, read_safetensors
from sfd_jax.latent import config as latent_config
from sfd_jax.latent.state_dict import ema_name, expected_shapes, flatten, state_dict_to_variables
from sfd_jax.latent.teacher import build_teacher
from sfd_jax.teacher import load_teacher

LDM = FIXTURES / "ldm"
CKPT, YAML = LDM / "ldm_bedroom_tiny.ckpt", LDM / "ldm_bedroom_tiny.yaml"


@pytest.fixture(scope="module")
def state_dict():
  return read_ckpt(CKPT)


@pytest.fixture(scope="module")
def config():
  return latent_config.resolve_arch(YAML)


def one_line_error(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_ckpt_state_dict(state_dict):
  """The Lightning checkpoint's state dict: every tensor the JSON lists, bit-exact names and shapes."""
  listing = json.loads((LDM / "ldm_bedroom_tiny.json").read_text())["state_dict"]
  assert list(state_dict) == [entry["name"] for entry in listing]
  for entry in listing:
    assert state_dict[entry["name"]].shape == tuple(entry["shape"])
    assert state_dict[entry["name"]].dtype == np.float32


def test_variables_are_the_state_dict(state_dict, config):
  """Variables hold the checkpoint's UNet and decoder tensors under their own names, unchanged."""
  variables, ema = state_dict_to_variables(config, state_dict, source="fixture")
  assert ema is None
  flat = flatten(variables["params"])
  assert set(flat) == set(expected_shapes(config))
  for name, value in flat.items():
    np.testing.assert_array_equal(value, state_dict[name], err_msg=name)
  np.testing.assert_array_equal(variables["buffers"]["alphas_cumprod"], state_dict["alphas_cumprod"])
  # The encoder is set aside (decoding only), not silently misnamed.
  assert not any(name.startswith("first_stage_model.encoder.") for name in flat)
  assert any(name.startswith("first_stage_model.encoder.") for name in state_dict)


def write_zip_pickle(path, payload: bytes, name="archive"):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{name}/data.pkl", payload)
    archive.writestr(f"{name}/byteorder", "little")
    archive.writestr(f"{name}/version", "3\n")


def test_hostile_ckpt_refused_and_nothing_runs(tmp_path):
  """A `.ckpt` whose pickle calls os.system is refused naming the global; the command never runs."""
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  payload = pickle.dumps({"state_dict": Exploit()}, protocol=2)
  assert b"system" in payload
  path = tmp_path / "hostile.ckpt"
  write_zip_pickle(path, payload)
  with pytest.raises(ValueError) as excinfo:
    load_teacher(path, arch=YAML)
  message = one_line_error(excinfo)
  assert str(path) in message and f"{os.system.__module__}.system" in message and "refused global" in message
  assert not marker.exists()


def fake_lightning_class(monkeypatch, module, name, base=object):
  """A class that pickles as the global `module.name` (the module is faked in sys.modules)."""
  cls = type(name, (base,), {"__module__": module, "__qualname__": name})
  parts = module.split(".")
  for i in range(1, len(parts) + 1):
    monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
  setattr(sys.modules[module], name, cls)
  return cls


def test_lightning_globals_are_inert(tmp_path, monkeypatch):
  """Lightning classes (as dict keys, as AttributeDict hyper-parameters) load as inert records;
  `eval` is refused."""
  fixture_globals = json.loads((LDM / "ldm_bedroom_tiny.json").read_text())["checkpoint"]["pickle_globals"]
  assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in fixture_globals  # read by every test
  checkpoint_cls = fake_lightning_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
  hparams_cls = fake_lightning_class(monkeypatch, "pytorch_lightning.utilities.parsing", "AttributeDict", dict)
  payload = pickle.dumps({"state_dict": {}, "hyper_parameters": hparams_cls(lr=1e-4),
                          "callbacks": {checkpoint_cls: {"monitor": "val/loss"}}}, protocol=2)
  monkeypatch.undo()
  path = tmp_path / "lightning.ckpt"
  write_zip_pickle(path, payload)
  with pytest.raises(ValueError) as excinfo:  # loads, but holds no tensors
    read_ckpt(path)
  assert "holds no state dict" in one_line_error(excinfo)
  write_zip_pickle(path, pickle.dumps({"state_dict": {"x": Evaluated("1+1")}}, protocol=2))
  with pytest.raises(ValueError) as excinfo:
    read_ckpt(path)
  assert "refused global __builtin__.eval" in one_line_error(excinfo)  # protocol 2 spells builtins so


class Evaluated:
  def __init__(self, source):
    self.source = source

  def __reduce__(self):
    return (eval, (self.source,))


def test_safetensors(tmp_path, state_dict, config):
  """The same tensors as `.safetensors` give the same teacher; a truncated file one clean line."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / "tiny.safetensors"
  save_file(dict(state_dict), str(path), metadata={"format": "pt"})
  loaded = read_safetensors(path)
  assert list(loaded) == list(state_dict) or set(loaded) == set(state_dict)
  teacher = load_teacher(path, arch=YAML)
  for name, value in flatten(teacher.params["params"]).items():
    np.testing.assert_array_equal(value, state_dict[name])
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
  with pytest.raises(ValueError) as excinfo:
    load_teacher(truncated, arch=YAML)
  assert str(truncated) in one_line_error(excinfo)


def test_state_dict_that_does_not_fit(state_dict, config):
  """Missing, misshapen and unexpected keys are refused in one line naming key and shapes."""
  cases = {
      "missing": ({k: v for k, v in state_dict.items() if k != "model.diffusion_model.out.2.weight"},
                  "missing key 'model.diffusion_model.out.2.weight' (expected shape (3, 32, 3, 3))"),
      "shape": ({**state_dict, "first_stage_model.post_quant_conv.weight": np.zeros([4, 3, 1, 1], np.float32)},
                "'first_stage_model.post_quant_conv.weight' has shape (4, 3, 1, 1), expected (3, 3, 1, 1)"),
      "unexpected": ({**state_dict, "model.diffusion_model.extra.weight": np.zeros([2], np.float32)},
                     "unexpected key 'model.diffusion_model.extra.weight' with shape (2,)"),
      "stranger": ({**state_dict, "foo.bar": np.zeros([2], np.float32)}, "unexpected key 'foo.bar'"),
  }
  for case, (sd, expected) in cases.items():
    with pytest.raises(ValueError) as excinfo:
      state_dict_to_variables(config, sd, source="ckpt")
    message = one_line_error(excinfo)
    assert message.startswith("ckpt: ") and expected in message, (case, message)
  # The fixture against the real LSUN-Bedroom architecture: refused at the first misfit.
  with pytest.raises(ValueError) as excinfo:
    load_teacher(CKPT, arch="ldm-lsun-bedroom")
  assert "has shape" in one_line_error(excinfo)


def test_missing_step_condition_layers_are_initialised(state_dict, config):
  """Released checkpoints lack `nfe_embed` / `emb_nfe_layers`: they are initialised, the rest kept."""
  sd = {k: v for k, v in state_dict.items() if "nfe" not in k}
  assert len(sd) < len(state_dict)
  variables, _ = state_dict_to_variables(config, sd, source="released")
  flat = flatten(variables["params"])
  for name in state_dict:
    if "nfe" in name:
      assert flat[name].shape == state_dict[name].shape and np.all(np.isfinite(flat[name]))
      assert not np.array_equal(flat[name], state_dict[name])
    elif name in flat:
      np.testing.assert_array_equal(flat[name], state_dict[name])


def test_lit_ema_shadows(state_dict, config):
  """With `model_ema.*` the teacher runs the shadows, `raw_params` keep the trained weights."""
  unet_names = [k for k in state_dict if k.startswith("model.diffusion_model.")]
  assert ema_name("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
  shadows = {ema_name(k): state_dict[k] * np.float32(0.5) for k in unet_names}
  meta = {"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(7)}
  teacher = build_teacher(config, {**state_dict, **shadows, **meta}, source="ema")
  assert teacher.has_ema
  teacher_flat, raw_flat = flatten(teacher.params["params"]), flatten(teacher.raw_params["params"])
  for name in unet_names:
    np.testing.assert_array_equal(teacher_flat[name], state_dict[name] * np.float32(0.5))
    np.testing.assert_array_equal(raw_flat[name], state_dict[name])
  name = "first_stage_model.post_quant_conv.weight"
  np.testing.assert_array_equal(teacher_flat[name], state_dict[name])
  incomplete = {k: v for k, v in shadows.items() if not k.endswith("out2weight")}
  with pytest.raises(ValueError) as excinfo:
    build_teacher(config, {**state_dict, **incomplete}, source="ema")
  assert "missing key 'model_ema.diffusion_modelout2weight'" in one_line_error(excinfo)


def test_presets_and_yaml(config):
  """Presets hold the official yaml values; the fixture's yaml gives its own tiny architecture."""
  bedroom = latent_config.resolve_arch("ldm-lsun-bedroom")
  assert bedroom.unet.model_channels == 224 and bedroom.unet.channel_mult == (1, 2, 3, 4)
  assert bedroom.unet.attention_resolutions == (8, 4, 2) and bedroom.unet.num_head_channels == 32
  assert bedroom.first_stage.kind == "vq" and bedroom.first_stage.n_embed == 8192
  assert bedroom.latent_resolution == 64 and bedroom.sigma_min == 0.006 and bedroom.guidance_type == "uncond"
  assert latent_config.resolve_arch("ldm-ffhq").unet == bedroom.unet
  sd = latent_config.resolve_arch("sd-v1")
  assert sd.first_stage.kind == "kl" and sd.scale_factor == 0.18215 and sd.sigma_min == 0.1
  assert sd.unet.attention_heads(320) == (8, 40) and sd.unet.attention_heads(1280) == (8, 160)
  assert config.unet.model_channels == 32 and config.unet.attention_heads(64) == (8, 8)
  assert config.first_stage.ch_mult == (1, 1, 2) and config.latent_resolution == 16
  with pytest.raises(ValueError) as excinfo:
    latent_config.resolve_arch("ldm-church")
  assert "ldm-lsun-bedroom" in one_line_error(excinfo)


def test_preset_parameter_counts():
  """The presets' UNets have the published sizes (without SFD's step-condition layers): SD v1's
  859,520,964 parameters, and the 274M the LDM paper reports for LDM-4 LSUN-Bedroom."""
  def unet_size(arch):
    shapes = expected_shapes(latent_config.resolve_arch(arch))
    return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("model.") and "nfe" not in k)

  assert unet_size("sd-v1") == 859_520_964
  assert round(unet_size("ldm-lsun-bedroom") / 1e6) == 274


def test_ckpt_needs_arch():
  with pytest.raises(ValueError) as excinfo:
    load_teacher(CKPT)
  assert "needs arch" in one_line_error(excinfo)


def test_convert_to_a_directory(tmp_path, state_dict):
  """`python -m sfd_jax.convert --arch=...`: the converted directory loads without arch or the
  checkpoint, with the same raw and LitEma weights."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from sfd_jax import convert  # pylint: disable=g-import-not-at-top
  shadows = {ema_name(k): v * np.float32(0.5) for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
  src = tmp_path / "with_ema.safetensors"
  save_file({**state_dict, **shadows}, str(src))
  dst = tmp_path / "teacher"
  assert convert.main([f"--src={src}", f"--dst={dst}", f"--arch={YAML}"]) == 0
  original, converted = load_teacher(src, arch=YAML), load_teacher(dst)
  assert converted.config == original.config and converted.has_ema
  for attr in ("params", "raw_params"):
    a, b = flatten(getattr(original, attr)), flatten(getattr(converted, attr))
    assert set(a) == set(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f"{attr} {name}")
  with pytest.raises(ValueError) as excinfo:
    load_teacher(dst, arch=YAML)
  assert "names its own architecture" in one_line_error(excinfo)
  with pytest.raises(SystemExit) as exit_info:  # one line on stderr, exit status 2
    convert.main([f"--src={CKPT}", f"--dst={tmp_path / 'x.pt'}", f"--arch={YAML}"])
  assert exit_info.value.code == 2
