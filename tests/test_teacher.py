"""Tests of the torch-free `.pt` format, teacher loading, converted directories and the convert CLI."""
import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import chex
import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import EDM_FIXTURES, EDM_NAMES, torch
from sfd_jax import convert, io, networks, teacher
from sfd_jax.io import torch_files as torch_format
from sfd_jax.io.edm_pickle import EDMPickleError, read_edm_snapshot
from test_edm_pickle import _TorchModuleUnpickler

REPO_ROOT = EDM_FIXTURES.parents[2]
# Blocks torch in a child interpreter: `import torch` raises ImportError.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def _pkl(name):
  return EDM_FIXTURES / f"{name}.pkl"


def _torch_network(name):
  """The fixture network as torch modules, read by torch's own tensor code (independent path)."""
  with open(_pkl(name), "rb") as f:
    return _TorchModuleUnpickler(f).load()["ema"]


def _run(args, **kwargs):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=300, **kwargs)


def _error_line(result):
  """The CLI's stderr: exactly one line and no traceback."""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  return lines[0]


# ----------------------------------------------------------------------------------------
# torch_format


def _mixed_arrays():
  rng = np.random.default_rng(0)
  return collections.OrderedDict([
      ("conv.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
      ("transposed", rng.standard_normal((3, 5)).astype(np.float32).T),  # Not C-contiguous.
      ("f64", rng.standard_normal(7)),
      ("f16", rng.standard_normal((2, 2)).astype(np.float16)),
      ("bf16", rng.standard_normal(3).astype(ml_dtypes.bfloat16)),
      ("i64", np.arange(-3, 3, dtype=np.int64).reshape(2, 3)),
      ("i32", np.arange(4, dtype=np.int32)),
      ("u8", np.arange(250, 256, dtype=np.uint8)),
      ("bool", np.array([True, False, True])),
      ("scalar", np.array(2.5, np.float32)),
      ("empty", np.zeros((0, 3), np.float32)),
      ("big_endian", np.arange(3, dtype=">f4")),
  ])


def _as_numpy(tensor):
  if tensor.dtype == torch.bfloat16:
    return tensor.float().numpy().astype(ml_dtypes.bfloat16)
  return tensor.numpy()


@pytest.mark.torch_reference
def test_written_file_loads_in_torch(tmp_path):
  arrays = _mixed_arrays()
  path = tmp_path / "mixed.pt"
  torch_format.save_state_dict(arrays, path)
  for mmap in (False, True):  # mmap loading needs torch's 64-byte data alignment.
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(arrays)
    for key, expected in arrays.items():
      got = _as_numpy(loaded[key])
      assert got.shape == expected.shape and got.dtype == expected.dtype.newbyteorder("="), key
      np.testing.assert_array_equal(got, expected, err_msg=key)
  with zipfile.ZipFile(path) as archive:
    assert {"archive/data.pkl", "archive/byteorder", "archive/version"} <= set(archive.namelist())
    infos = archive.infolist()
  # Tensor data start on 64-byte boundaries, as in torch's own files (read from the local headers).
  raw = path.read_bytes()
  for info in infos:
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


@pytest.mark.torch_reference
def test_reader_round_trip_and_torch_files(tmp_path):
  arrays = _mixed_arrays()
  path = tmp_path / "mixed.pt"
  torch_format.save_state_dict(arrays, path)
  got = torch_format.load_state_dict(path)
  assert list(got) == list(arrays)
  for key, expected in arrays.items():
    assert got[key].shape == expected.shape and got[key].dtype == expected.dtype.newbyteorder("="), key
    np.testing.assert_array_equal(got[key], expected, err_msg=key)

  # A file written by torch: state-dict metadata, an int64 buffer, and views sharing storage.
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  base = torch.arange(24.0).reshape(4, 6)
  state = collections.OrderedDict(module.state_dict(), base=base, column=base[1:, 2], scalar=torch.tensor(7))
  torch.save(state, tmp_path / "torch.pt")
  got = torch_format.load_state_dict(tmp_path / "torch.pt")
  assert list(got) == list(state)
  for key, tensor in state.items():
    assert got[key].dtype == tensor.numpy().dtype, key
    np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


def test_reader_refuses_hostile_pt(tmp_path):
  marker = tmp_path / "marker"

  class Call:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  data = pickle.dumps(collections.OrderedDict(weight=Call()), protocol=2)
  pickle.loads(data)  # Control: the standard unpickler runs the payload.
  assert marker.exists()
  marker.unlink()
  path = tmp_path / "hostile.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/version", "3\n")
  with pytest.raises(torch_format.TorchFormatError) as err:
    torch_format.load_state_dict(path)
  assert str(err.value) == f"{path}: refused global posix.system (not part of a state dict)"
  assert not marker.exists()


def test_format_errors(tmp_path):
  text = tmp_path / "text.pt"
  text.write_text("hello")
  with pytest.raises(torch_format.TorchFormatError, match=f"^{text}: not a torch zip-format"):
    torch_format.load_state_dict(text)
  other_zip = tmp_path / "other.pt"
  with zipfile.ZipFile(other_zip, "w") as archive:
    archive.writestr("readme.txt", "hi")
  with pytest.raises(torch_format.TorchFormatError, match=f"^{other_zip}: no <archive>/data.pkl"):
    torch_format.load_state_dict(other_zip)
  with pytest.raises(FileNotFoundError, match="missing.pt"):
    torch_format.load_state_dict(tmp_path / "missing.pt")
  target = tmp_path / "complex.pt"
  with pytest.raises(torch_format.TorchFormatError, match=r"'z' has dtype complex64"):
    torch_format.save_state_dict({"z": np.ones(2, np.complex64)}, target)


# ----------------------------------------------------------------------------------------
# Export and round trips through the network variables


@pytest.mark.torch_reference
@pytest.mark.parametrize("name", EDM_NAMES)
def test_export_gives_fixture_tensors(tmp_path, name):
  snapshot = read_edm_snapshot(_pkl(name))
  config = networks.NetworkConfig.from_edm(snapshot.precond_class, snapshot.init_kwargs)
  variables = networks.state_dict_to_variables(config, snapshot.state_dict, source=name)
  path = tmp_path / f"{name}.pt"
  io.export_state_dict(variables, path)

  expected = _torch_network(name).state_dict()
  loaded = torch.load(path, weights_only=True)
  assert list(loaded) == list(expected)  # torch's own names and order
  for key, tensor in expected.items():
    assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
    assert torch.equal(loaded[key], tensor), key
  # The torch modules accept it as a strict state dict.
  net = _torch_network(name)
  net.load_state_dict(loaded, strict=True)

  # Our reader gives the same arrays; and back into variables, bit exact.
  read_back = torch_format.load_state_dict(path)
  assert list(read_back) == list(expected)
  for key, tensor in expected.items():
    np.testing.assert_array_equal(read_back[key], tensor.numpy(), err_msg=key)
  again = networks.state_dict_to_variables(config, read_back, source=str(path))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, again), jax.tree.map(np.asarray, variables))


def test_converted_directory_round_trip(tmp_path):
  name = "vp_ddpmpp_cond"
  config, variables = io.load_network(_pkl(name))
  directory = tmp_path / "converted"
  io.save_converted(directory, config, variables)
  assert json.loads((directory / io.converted.NETWORK_JSON).read_text()) == config.to_dict()
  loaded_config, loaded = io.load_converted(directory)
  assert loaded_config == config
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, variables))
  with pytest.raises(FileExistsError, match=str(directory)):
    io.save_converted(directory, config, variables)

  # Stored variables that do not fit network.json are refused, naming the directory.
  wrong = tmp_path / "wrong"
  params = jax.tree.map(np.asarray, variables["params"])
  params["model"]["map_augment"]["weight"] = params["model"]["map_augment"]["weight"][:, :8]
  io.save_converted(wrong, config, {"params": params, "buffers": variables["buffers"]})
  with pytest.raises(ValueError) as err:
    teacher.load_teacher(wrong)
  message = str(err.value)
  assert "\n" not in message and message.startswith(str(wrong))
  assert "model.map_augment.weight" in message and "(16, 8)" in message


def _patched_pickle(tmp_path, old: bytes, new: bytes, count=-1):
  data = _pkl(EDM_NAMES[0]).read_bytes()
  assert len(old) == len(new) and old in data  # Same length: pickle frames stay valid.
  target = tmp_path / "patched.pkl"
  target.write_bytes(data.replace(old, new, count))
  return target


def test_load_teacher_errors(tmp_path):
  missing = tmp_path / "missing.pkl"
  with pytest.raises(FileNotFoundError, match=f"^{missing}: no such file"):
    teacher.load_teacher(missing)
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(ValueError, match=f"^{empty_dir}: unknown teacher format"):
    teacher.load_teacher(empty_dir)
  text = tmp_path / "teacher.txt"
  text.write_text("not a network")
  with pytest.raises(ValueError, match=f"^{text}: unknown teacher format"):
    teacher.load_teacher(text)
  truncated = tmp_path / "truncated.pkl"
  truncated.write_bytes(_pkl(EDM_NAMES[0]).read_bytes()[:5000])
  with pytest.raises(EDMPickleError, match=f"^{truncated}: truncated"):
    teacher.load_teacher(truncated)

  # The first tensor (model.map_augment.weight, 16×9) rebuilt as 16×8: names fit, shape does not.
  misshapen = _patched_pickle(tmp_path, b"K\x10K\x09\x86\x94K\x09K\x01\x86", b"K\x10K\x08\x86\x94K\x08K\x01\x86", 1)
  with pytest.raises(ValueError) as err:
    teacher.load_teacher(misshapen)
  message = str(err.value)
  assert "\n" not in message and message.startswith(str(misshapen))
  assert "model.map_augment.weight" in message and "(16, 8)" in message

  # A renamed submodule: the state dict has a key the config does not know.
  renamed = _patched_pickle(tmp_path, b"\x8c\x0bmap_augment\x94", b"\x8c\x0bmap_augmenX\x94")
  with pytest.raises(ValueError) as err:
    teacher.load_teacher(renamed)
  message = str(err.value)
  assert "\n" not in message and message.startswith(str(renamed)) and "model.map_augmenX.weight" in message


# ----------------------------------------------------------------------------------------
# The convert CLI and torch-free loading of its output

_DENOISE_SCRIPT = NO_TORCH + textwrap.dedent("""
    import jax
    import numpy as np
    from sfd_jax.teacher import load_teacher
    directory, pkl, fixture, out = sys.argv[1:5]
    data = np.load(fixture)
    x = np.transpose(data['x'], (0, 2, 3, 1))
    labels = data['class_labels'] if 'class_labels' in data else None
    augment = data['augment_labels'] if 'augment_labels' in data else None
    from_dir, from_pkl = load_teacher(directory), load_teacher(pkl)
    assert from_dir.config == from_pkl.config
    # Equal configs give the same pure function; compile it once (2 CPU cores are shared).
    denoise = jax.jit(from_dir.denoise)
    outputs = {label: np.asarray(denoise(t.params, x, data['sigma'], labels, augment))
               for label, t in [('dir', from_dir), ('pkl', from_pkl)]}
    np.savez(out, **outputs)
""")


@pytest.mark.parametrize("name", ["vp_ddpmpp_cond", "iddpm_adm_cond"])
def test_convert_cli_then_load_without_torch(tmp_path, name):
  directory = tmp_path / "converted"
  # The CLI itself, run as `python -m sfd_jax.convert` with torch blocked.
  cli = NO_TORCH + "import runpy; runpy.run_module('sfd_jax.convert', run_name='__main__')"
  result = _run(["-c", cli, f"--src={_pkl(name)}", f"--dst={directory}"])
  assert result.returncode == 0, result.stderr
  assert f"wrote {directory}" in result.stdout
  assert (directory / io.converted.NETWORK_JSON).is_file()

  # Both the converted directory and the pickle load with torch blocked.
  fixture = EDM_FIXTURES / f"{name}.npz"
  out = tmp_path / "denoised.npz"
  result = _run(["-c", _DENOISE_SCRIPT, str(directory), str(_pkl(name)), str(fixture), str(out)])
  assert result.returncode == 0, result.stderr
  outputs = np.load(out)
  np.testing.assert_array_equal(outputs["dir"], outputs["pkl"])
  # And both are the EDM denoiser (README's fp32 tolerance, per sample).
  data = np.load(fixture)
  key = "denoised_aug_fp32" if "augment_labels" in data else "denoised_fp32"
  expected = np.transpose(data[key], (0, 2, 3, 1))
  err = np.abs(outputs["dir"] - expected).reshape(len(expected), -1).max(axis=1)
  assert np.all(err <= 2e-5 * (1 + data["sigma"])), err


@pytest.mark.torch_reference
def test_convert_cli_export_pt(tmp_path):
  name = "edm_adm_cond"
  directory = tmp_path / "converted"
  assert convert.main([f"--src={_pkl(name)}", f"--dst={directory}"]) == 0
  expected = _torch_network(name).state_dict()
  for src in (_pkl(name), directory):
    target = tmp_path / f"from_{src.name}.pt"
    result = _run(["-m", "sfd_jax.convert", f"--src={src}", f"--dst={target}"])
    assert result.returncode == 0, result.stderr
    loaded = torch.load(target, weights_only=True)
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
      assert torch.equal(loaded[key], tensor), key


def test_convert_cli_errors(tmp_path):
  missing = tmp_path / "missing.pkl"
  result = _run(["-m", "sfd_jax.convert", f"--src={missing}", f"--dst={tmp_path / 'out'}"])
  assert result.returncode == 2 and str(missing) in _error_line(result)

  hostile = tmp_path / "hostile.pkl"
  marker = tmp_path / "marker"

  class Call:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  hostile.write_bytes(pickle.dumps({"ema": Call()}, protocol=4))
  result = _run(["-m", "sfd_jax.convert", f"--src={hostile}", f"--dst={tmp_path / 'out'}"])
  line = _error_line(result)
  assert result.returncode == 2 and str(hostile) in line and "refused global posix.system" in line
  assert not marker.exists() and not (tmp_path / "out").exists()

  existing = tmp_path / "existing"
  existing.mkdir()
  result = _run(["-m", "sfd_jax.convert", f"--src={_pkl(EDM_NAMES[0])}", f"--dst={existing}"])
  assert result.returncode == 2 and f"{existing}: already exists" in _error_line(result)

  result = _run(["-m", "sfd_jax.convert", f"--src={_pkl(EDM_NAMES[0])}"])
  assert result.returncode == 2 and "--dst" in result.stderr


def test_top_level_load_teacher():
  """`sfd_jax.load_teacher` is the documented entry point (lazy import of the teacher module)."""
  import sfd_jax
  loaded = sfd_jax.load_teacher(EDM_FIXTURES / "edm_ddpmpp_uncond.pkl")
  assert isinstance(loaded, sfd_jax.Teacher)
  assert networks.count_params(loaded.params) == 189491
  with pytest.raises(AttributeError):
    sfd_jax.no_such_thing
