"""Tests of the restricted EDM snapshot reader against the fixture pickles and hostile files."""
import collections
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import EDM_FIXTURES, EDM_NAMES, torch
from sfd_jax.io import edm_pickle
from sfd_jax.io.edm_pickle import EDMPickleError, read_edm_snapshot

REPO_ROOT = EDM_FIXTURES.parents[2]


def _fixture(name):
  return EDM_FIXTURES / f"{name}.pkl", json.loads((EDM_FIXTURES / f"{name}.json").read_text())


def _one_line(err):
  message = str(err.value)
  assert "\n" not in message, message
  return message


def _rewrite_ops(data: bytes, replace) -> bytes:
  """Re-emits a pickle op by op without its FRAME ops, letting `replace` swap single ops.

  `replace(op_name, arg)` returns the bytes to emit instead of that op, or None to keep it.
  Frames are optional in protocol 4, so an unframed copy loads identically.
  """
  ops = list(pickletools.genops(data))
  out = bytearray()
  for (op, arg, pos), (_, _, end) in zip(ops, ops[1:] + [(None, None, len(data))]):
    if op.name == "FRAME":
      continue
    new = replace(op.name, arg)
    out += data[pos:end] if new is None else new
  return bytes(out)


def _unicode_op(text: str) -> bytes:
  return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _rewrite_strings(data: bytes, replace) -> bytes:
  """Replaces string constants: `replace(s)` returns the new string or None to keep `s`."""
  def op(name, arg):
    if name in ("SHORT_BINUNICODE", "BINUNICODE") and replace(arg) is not None:
      return _unicode_op(replace(arg))
    return None
  return _rewrite_ops(data, op)


class _TorchModuleUnpickler(pickle.Unpickler):
  """An independent reading path: the real torch functions rebuild tensors, and every
  persistent object becomes a plain `torch.nn.Module` carrying the pickled state, so that
  torch itself computes `state_dict()` (names, order, non-persistent buffers)."""

  def find_class(self, module, name):
    if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
      return self._module_from_meta
    if module.startswith(("torch", "collections", "numpy")):
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"{module}.{name}")

  @staticmethod
  def _module_from_meta(meta):
    module = torch.nn.Module()
    module.__setstate__(dict(meta["state"]))
    return module


@pytest.mark.parametrize("name", EDM_NAMES)
def test_fixture_matches_json_listing(name):
  path, listing = _fixture(name)
  snapshot = read_edm_snapshot(path)
  assert snapshot.precond_class == listing["precond_class"]
  assert snapshot.init_kwargs == listing["init_kwargs"]
  assert [(k, list(v.shape)) for k, v in snapshot.state_dict.items()] == [
      (e["name"], e["shape"]) for e in listing["state_dict"]]
  assert all(v.dtype == np.float32 for v in snapshot.state_dict.values())
  kinds = {e["name"]: e["kind"] for e in listing["state_dict"]}
  counts = collections.Counter()
  for key, value in snapshot.state_dict.items():
    counts[kinds[key]] += value.size
  assert counts["parameter"] == listing["num_parameters"]
  assert sum(k == "buffer" for k in kinds.values()) == listing["num_buffers"]
  assert snapshot.other["loss_fn"]["class_name"] == listing["loss_fn"]["class_name"]
  assert snapshot.other["loss_fn"]["init_kwargs"] == listing["loss_fn"]["init_kwargs"]
  assert snapshot.other["dataset_kwargs"] == listing["dataset_kwargs"]
  assert snapshot.other["augment_pipe"] is None
  for key, value in listing["precond_attributes"].items():
    assert snapshot.other["ema_attributes"][key] == pytest.approx(float(value)), key


@pytest.mark.torch_reference
@pytest.mark.parametrize("name", EDM_NAMES)
def test_tensors_equal_torch_reading(name):
  path, _ = _fixture(name)
  with open(path, "rb") as f:
    ema = _TorchModuleUnpickler(f).load()["ema"]
  expected = ema.state_dict()
  got = read_edm_snapshot(path).state_dict
  assert list(got) == list(expected)
  for key, tensor in expected.items():
    np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


def test_fixtures_read_without_torch():
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None  # any `import torch` now raises ImportError
      from sfd_jax.io.edm_pickle import read_edm_snapshot
      for name in {EDM_NAMES!r}:
          snapshot = read_edm_snapshot({str(EDM_FIXTURES)!r} + '/' + name + '.pkl')
          print(name, len(snapshot.state_dict), sum(v.size for v in snapshot.state_dict.values()))
      assert sys.modules['torch'] is None
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  for name in EDM_NAMES:
    _, listing = _fixture(name)
    total = sum(int(np.prod(e["shape"])) for e in listing["state_dict"])
    assert f"{name} {len(listing['state_dict'])} {total}" in result.stdout


class _Call:
  """Pickles as a call of `func(*args)`."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _hostile_payloads(marker):
  return {
      "posix.system": _Call(os.system, f"touch {marker}"),
      "builtins.eval": _Call(eval, f"open({str(marker)!r}, 'w').close()"),
      "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
  }


@pytest.mark.parametrize("global_name", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_hostile_global_refused_and_never_called(tmp_path, global_name):
  # Control: the standard unpickler does run the payload, so the marker is a live test.
  control_marker = tmp_path / "control_marker"
  control = pickle.dumps({"ema": _hostile_payloads(control_marker)[global_name]}, protocol=4)
  result = pickle.loads(control)
  if isinstance(result["ema"], subprocess.Popen):
    result["ema"].wait()
  assert control_marker.exists()

  marker = tmp_path / "marker"
  hostile = {"ema": _hostile_payloads(marker)[global_name]}
  path = tmp_path / "hostile.pkl"
  path.write_bytes(pickle.dumps(hostile, protocol=4))
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(path)
  message = _one_line(err)
  assert str(path) in message and f"refused global {global_name}" in message
  assert not marker.exists()


def test_hostile_global_after_real_network_refused(tmp_path):
  """A call hidden after a genuine network (first value of dataset_kwargs) is refused."""
  marker = tmp_path / "marker"
  evil = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=4)
  # The spliced ops must not memoise (that would shift the host's memo indices); the host's
  # MEMOIZE that followed the replaced string now memoises the call's result instead.
  body = _rewrite_ops(evil, lambda name, arg: b"" if name in ("PROTO", "MEMOIZE", "STOP") else None)
  path, _ = _fixture(EDM_NAMES[0])
  data = _rewrite_ops(path.read_bytes(), lambda name, arg: (
      body if arg == "training.dataset.ImageFolderDataset" else None))
  target = tmp_path / "spliced.pkl"
  target.write_bytes(data)

  # Control: admitting the global makes the spliced pickle run the call.
  class Permissive(edm_pickle._SnapshotUnpickler):
    def find_class(self, module, name):
      if module == "posix":
        return pickle.Unpickler.find_class(self, module, name)
      return super().find_class(module, name)

  with open(target, "rb") as f:
    assert Permissive(f).load()["dataset_kwargs"]["class_name"] == 0  # os.system's status
  assert marker.exists()
  marker.unlink()

  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  assert "refused global posix.system" in _one_line(err) and str(target) in str(err.value)
  assert not marker.exists()


def test_hostile_global_inside_storage_payload(tmp_path):
  marker = tmp_path / "marker"
  evil = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
  path, _ = _fixture(EDM_NAMES[0])
  data = path.read_bytes()
  done = []

  def replace(name, arg):
    if name == "BINBYTES" and not done:
      done.append(name)
      # Keep the magic, protocol and sys-info records; replace the storage record.
      payload = arg[:137] + evil
      return b"B" + len(payload).to_bytes(4, "little") + payload
    return None

  target = tmp_path / "evil_storage.pkl"
  target.write_bytes(_rewrite_ops(data, replace))
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  assert "refused global posix.system" in _one_line(err) and str(target) in str(err.value)
  assert not marker.exists()


def test_module_src_is_never_executed(tmp_path):
  marker = tmp_path / "marker"
  source = textwrap.dedent(f"""\
      # Copyright (c) 2022, NVIDIA CORPORATION & AFFILIATES. All rights reserved.
      \"\"\"Model architectures and preconditioning schemes.\"\"\"
      import pathlib
      pathlib.Path({str(marker)!r}).write_text('module_src was executed')
      import numpy as np
      class EDMPrecond:
          pass
  """)
  path, listing = _fixture(EDM_NAMES[0])
  data = _rewrite_strings(path.read_bytes(), lambda s: source if s == "# source omitted" else None)
  # One copy per defining module (networks.py, loss.py); the other objects reuse the memo.
  assert data.count(b"module_src was executed") == listing["pickle"]["module_src_placeholder_count"]
  target = tmp_path / "with_source.pkl"
  target.write_bytes(data)

  # Control: a loader that executes module_src, as EDM's persistence does, creates the marker.
  class ExecutingUnpickler(edm_pickle._SnapshotUnpickler):
    def find_class(self, module, name):
      if name == "_reconstruct_persistent_obj":
        return lambda meta: exec(meta["module_src"], {})
      return super().find_class(module, name)

  with open(target, "rb") as f:
    ExecutingUnpickler(f).load()
  assert marker.exists()
  marker.unlink()

  snapshot = read_edm_snapshot(target)
  reference = read_edm_snapshot(path)
  assert not marker.exists()
  assert snapshot.init_kwargs == reference.init_kwargs
  assert list(snapshot.state_dict) == list(reference.state_dict)
  for key, value in reference.state_dict.items():
    np.testing.assert_array_equal(snapshot.state_dict[key], value)


@pytest.mark.parametrize("fraction", [0.0005, 0.3, 0.9999])
def test_truncated_file(tmp_path, fraction):
  path, _ = _fixture(EDM_NAMES[0])
  data = path.read_bytes()
  target = tmp_path / "truncated.pkl"
  target.write_bytes(data[: int(len(data) * fraction)])
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  message = _one_line(err)
  assert str(target) in message and "truncated" in message


def test_corrupt_storage_payload(tmp_path):
  path, _ = _fixture(EDM_NAMES[0])
  data = path.read_bytes()
  magic = pickle.dumps(edm_pickle._LEGACY_MAGIC, protocol=2)
  assert magic in data
  target = tmp_path / "bad_magic.pkl"
  target.write_bytes(data.replace(magic, pickle.dumps(edm_pickle._LEGACY_MAGIC + 1, protocol=2), 1))
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  assert str(target) in _one_line(err) and "magic" in str(err.value)


@pytest.mark.torch_reference
def test_not_a_pickle(tmp_path):
  text = tmp_path / "notes.pkl"
  text.write_text("just some text\n")
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(text)
  assert str(text) in _one_line(err) and "not a pickle" in str(err.value)
  archive = tmp_path / "state.pt"
  torch.save({"w": torch.ones(2)}, archive)
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(archive)
  assert str(archive) in _one_line(err) and "zip" in str(err.value)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pkl"):
    read_edm_snapshot(tmp_path / "nope.pkl")


@pytest.mark.parametrize("content, expected", [
    ({"net": 1}, "no 'ema' entry"),
    ([1, 2], "no 'ema' entry"),
    ({"ema": {"weight": 1}}, "'ema' is not an EDM network"),
])
def test_not_a_snapshot(tmp_path, content, expected):
  target = tmp_path / "other.pkl"
  target.write_bytes(pickle.dumps(content, protocol=4))
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  assert str(target) in _one_line(err) and expected in str(err.value)


@pytest.mark.parametrize("old, new, expected", [
    ("EDMPrecond", "LatentPrecond", "unknown network class 'LatentPrecond'"),
    ("SongUNet", "TransformerNet", "unknown model class 'TransformerNet'"),
])
def test_unknown_class(tmp_path, old, new, expected):
  path, _ = _fixture(EDM_NAMES[0])
  target = tmp_path / "unknown.pkl"
  target.write_bytes(_rewrite_strings(path.read_bytes(), lambda s: new if s == old else None))
  with pytest.raises(EDMPickleError) as err:
    read_edm_snapshot(target)
  assert str(target) in _one_line(err) and expected in str(err.value)


@pytest.mark.torch_reference
def test_storage_dtypes_and_views(tmp_path):
  """Tensors pickled by real torch: several dtypes, offsets and strides, shared storage."""
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  tensors = {
      "f64_view": base[1:, ::2],
      "f64_base": base,  # Same storage as the view.
      "f16": torch.linspace(-2, 2, 7, dtype=torch.float16),
      "bf16": torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
      "i64": torch.arange(-3, 5, dtype=torch.int64).reshape(2, 4).t(),
      "scalar": torch.tensor(3.25),
  }
  path = tmp_path / "tensors.pkl"
  path.write_bytes(pickle.dumps(tensors, protocol=4))
  got = edm_pickle.load_snapshot_objects(path)
  for key, tensor in tensors.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    value = got[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else got[key]
    assert value.dtype == expected.dtype, key
    np.testing.assert_array_equal(value, expected, err_msg=key)

  path.write_bytes(pickle.dumps({"c": torch.ones(2, dtype=torch.complex64)}, protocol=4))
  with pytest.raises(EDMPickleError) as err:
    edm_pickle.load_snapshot_objects(path)
  assert str(path) in _one_line(err) and "torch.ComplexFloatStorage" in str(err.value)


def _persistent(class_name, state):
  """Pickles like EDM's persistence: `_reconstruct_persistent_obj(meta)` (module_src unread)."""
  meta = dict(type="class", version=6, module_src="raise SystemExit('never run')",
              class_name=class_name, state=state)
  return _Call(_fake_reconstruct, meta)


def _fake_reconstruct(meta):
  raise AssertionError("only pickled here, never called")


_fake_reconstruct.__module__ = "torch_utils.persistence"
_fake_reconstruct.__qualname__ = _fake_reconstruct.__name__ = "_reconstruct_persistent_obj"


def _module_state(parameters=None, buffers=None, modules=None, non_persistent=(), **attributes):
  return dict(training=False, _parameters=dict(parameters or {}), _buffers=dict(buffers or {}),
              _non_persistent_buffers_set=set(non_persistent), _modules=dict(modules or {}), **attributes)


@pytest.mark.torch_reference
def test_synthetic_snapshot_walk(tmp_path, monkeypatch):
  """torch's state_dict rules on a hand-built snapshot: None entries and non-persistent
  buffers skipped, ModuleDict children, positional args and numpy scalar kwargs."""
  import types
  package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
  module._reconstruct_persistent_obj = _fake_reconstruct
  monkeypatch.setitem(sys.modules, "torch_utils", package)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

  g = torch.Generator().manual_seed(0)
  conv = _persistent("Conv2d", _module_state(
      parameters={"weight": torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=g), requires_grad=False),
                  "bias": None},
      buffers={"resample_filter": torch.ones(1, 1, 2, 2), "scratch": torch.zeros(5), "unset": None},
      non_persistent=["scratch"]))
  enc = torch.nn.ModuleDict()
  enc.__dict__["_modules"] = {"16x16_conv": conv}
  model = _persistent("SongUNet", _module_state(
      parameters={"scale": torch.randn(3, generator=g)}, modules={"enc": enc, "gone": None},
      _init_kwargs={"model_channels": 4}))
  ema = _persistent("EDMPrecond", _module_state(
      modules={"model": model}, sigma_data=np.float64(0.5),
      _init_args=(16, 2), _init_kwargs={"label_dim": 0, "sigma_data": np.float64(0.25), "channel_mult": [1, 2]}))
  loss = _persistent("EDMLoss", dict(P_mean=-1.2, _init_args=(), _init_kwargs={"P_std": np.float32(1.5)}))
  path = tmp_path / "synthetic.pkl"
  path.write_bytes(pickle.dumps({"ema": ema, "loss_fn": loss, "augment_pipe": None}, protocol=4))

  snapshot = read_edm_snapshot(path)
  assert snapshot.precond_class == "EDMPrecond"
  assert snapshot.init_kwargs == {"img_resolution": 16, "img_channels": 2, "label_dim": 0,
                                  "sigma_data": 0.25, "channel_mult": [1, 2]}
  assert type(snapshot.init_kwargs["sigma_data"]) is float
  assert snapshot.other["loss_fn"] == {"class_name": "EDMLoss", "init_kwargs": {"P_std": 1.5}}
  assert snapshot.other["ema_attributes"] == {"sigma_data": 0.5}

  with open(path, "rb") as f:
    expected = _TorchModuleUnpickler(f).load()["ema"].state_dict()
  assert list(snapshot.state_dict) == list(expected) == [
      "model.scale", "model.enc.16x16_conv.weight", "model.enc.16x16_conv.resample_filter"]
  for key, tensor in expected.items():
    np.testing.assert_array_equal(snapshot.state_dict[key], tensor.numpy(), err_msg=key)
