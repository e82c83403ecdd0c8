"""Shared test set-up: 8 fake CPU devices and the location of the fixture files."""
import os
import pathlib

import numpy as np
import pytest

# Multi-device code is tested on 8 fake CPU devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EDM_FIXTURES = FIXTURES / "edm"
SFD_FIXTURES = FIXTURES / "sfd"
EDM_NAMES = ["edm_ddpmpp_uncond", "ve_ncsnpp_uncond", "vp_ddpmpp_cond", "edm_adm_cond", "iddpm_adm_cond"]


@pytest.fixture(scope="module")
def fixture32():
  """The official SFD iteration fixture (float32)."""
  return np.load(SFD_FIXTURES / "sfd_iter_A.npz")


@pytest.fixture(scope="module")
def fixture64():
  """Its float64 rerun."""
  return np.load(SFD_FIXTURES / "sfd_iter_A_fp64.npz")
