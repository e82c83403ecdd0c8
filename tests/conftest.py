"""Shared test set-up: 8 fake CPU devices, a compilation cache for this run, and the location of
the fixture files."""
import atexit
import importlib
import os
import pathlib
import shutil
import tempfile
import types

import numpy as np
import pytest

# Multi-device code is tested on 8 fake CPU devices; this must happen before jax is imported.
# A device count already in XLA_FLAGS is kept (e.g. `XLA_FLAGS=--xla_force_host_platform_device_count=4
# pytest tests/test_sfd_step.py`, experiments/perturb_reduction_order.sh), and so are other flags.
# The collective timeouts keep XLA from aborting the run when 8 device threads share 2 busy cores
# (sfd_jax/cpu_devices.py); subprocesses inherit them.
from sfd_jax import cpu_devices  # noqa: E402  (imports no jax)

cpu_devices.use_fake_cpu_devices(8)

# Many tests (and the command-line runs they start as subprocesses) compile the same programs:
# the digits teacher's trajectory, LPIPS at 224x224, the demo's step. One JAX compilation cache
# for the whole run lets each be compiled once. It starts empty and is removed at exit, so every
# run still compiles everything once and nothing is kept between runs. The pytest-xdist workers
# and every subprocess inherit the directory from the process that created it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="sfd_jax_test_compilation_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# pytest-xdist (`-n 2 --dist loadfile`) gives each worker whole files. By default it queues the
# files with the most tests first, which leaves the few slow end-to-end files for the end, one
# worker busy while the other idles. The files below go first, slowest first (CPU time measured
# with `--durations`, 2026-12-03; experiments/RESULTS.md), and the quick files fill the tail.
SLOW_FILES_FIRST = ["test_sd_sfd_step.py", "test_sd_sample.py", "test_sd_train.py", "test_shard_state.py",
                    "test_latent_step_options.py", "test_step_options.py", "test_stage2.py", "test_networks.py",
                    "test_multihost.py",
                    "test_sfd_step.py", "test_train.py", "test_fid_inception.py", "test_lpips.py", "test_demo.py",
                    "test_teacher.py", "test_pretrain.py", "test_fid_cli.py", "test_sample.py", "test_solvers.py",
                    "test_notebook.py"]


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


class _ImportedOnUse(types.ModuleType):
  """A module that is imported when one of its attributes is first used."""

  def __getattr__(self, attr):
    return getattr(importlib.import_module(self.__name__), attr)


# PyTorch serves only as a reference in these tests. Test files take it from here
# (`from conftest import torch`) so that they collect where torch is not installed (the Python
# 3.12 CI leg), and the tests that use it are marked `torch_reference`: that leg deselects them
# by name (`-m "not torch_reference"`), and an unmarked test that reaches torch fails there with
# ModuleNotFoundError instead of being skipped.
torch = _ImportedOnUse("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli_env(num_devices: int, cache_dir) -> dict:
  """The environment of a command-line run in a subprocess: `num_devices` fake CPU devices (the
  parent's other XLA flags and the collective timeouts kept), this checkout importable, and a
  compilation cache shared by the runs of one test file that keeps every program."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=cpu_devices.xla_flags(os.environ.get("XLA_FLAGS", ""), num_devices=num_devices),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EDM_FIXTURES = FIXTURES / "edm"
SFD_FIXTURES = FIXTURES / "sfd"
def nhwc(x):
  """NCHW (the official code's layout) → NHWC (ours), as numpy."""
  return np.moveaxis(np.asarray(x), -3, -1)


def nchw(x):
  """NHWC → NCHW, as numpy."""
  return np.moveaxis(np.asarray(x), -1, -3)


def sampled(value):
  """The ldm/sfd_iter fixtures' sampling of a tensor: whole up to 1024 elements, else the elements
  at flat indices (k·n)//512, k = 0..511. Returns (values, indices)."""
  flat = np.asarray(value).reshape(-1)
  if flat.size <= 1024:
    return flat, np.arange(flat.size)
  index = (np.arange(512) * flat.size) // 512
  return flat[index], index


def latent_student_state(teacher, optimizer):
  """A latent student's TrainState from the teacher checkpoint's raw UNet weights (copied: the
  step donates them)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sfd_jax import sfd  # pylint: disable=g-import-not-at-top
  unet = jax.tree.map(jnp.array, teacher.raw_params["params"]["model"]["diffusion_model"])
  params = {"model": {"diffusion_model": unet}}
  return sfd.TrainState(params=params, opt_state=optimizer.init(params), buffers={})


def flat(tree, prefix=''):
  """A nested dict of arrays → {'a.b.c': numpy array} (the state-dict names of its leaves)."""
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {prefix + k: np.asarray(v)})
  return out


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A JAX compilation cache shared by a test module's CLI subprocess runs."""
  return tmp_path_factory.mktemp('jax_cache')


EDM_NAMES = ["edm_ddpmpp_uncond", "ve_ncsnpp_uncond", "vp_ddpmpp_cond", "edm_adm_cond", "iddpm_adm_cond"]


@pytest.fixture(scope="module")
def fixture32():
  """The official SFD iteration fixture (float32)."""
  return np.load(SFD_FIXTURES / "sfd_iter_A.npz")


@pytest.fixture(scope="module")
def fixture64():
  """Its float64 rerun."""
  return np.load(SFD_FIXTURES / "sfd_iter_A_fp64.npz")
