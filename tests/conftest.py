"""Shared test helpers: where the fixture files live."""
import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EDM_FIXTURES = FIXTURES / "edm"
SFD_FIXTURES = FIXTURES / "sfd"
EDM_NAMES = ["edm_ddpmpp_uncond", "ve_ncsnpp_uncond", "vp_ddpmpp_cond", "edm_adm_cond", "iddpm_adm_cond"]


@pytest.fixture
def edm_fixture_dir():
    return EDM_FIXTURES
