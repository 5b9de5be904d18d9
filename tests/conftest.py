"""Fixtures shared by the federation test modules (test_flower.py, test_client_dp.py).

A module that asks for them states its federation in three module-level names:
SITES (site -> patients), SITES_SEED (the generator's seed) and FEDERATED (overrides
of the smoke profile's `federated` section, e.g. rounds and local epochs). The
fixtures are module-scoped, so each module builds its own sites once. Plain helpers
(building sites outside a fixture) stay in synthetic_sites.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

# The project's modules are imported inside the fixtures: every test module loads this file,
# and most of them do not need pandas and the generator.


def _module_setting(request: pytest.FixtureRequest, name: str):
    """Return the requesting test module's `name`, or fail saying which module lacks it."""
    if not hasattr(request.module, name):
        pytest.fail(f"{request.module.__name__} uses the `{request.fixturename}` fixture of tests/conftest.py "
                    f"but defines no module-level {name}; see conftest.py's docstring", pytrace=False)
    return getattr(request.module, name)


@pytest.fixture(scope="module")
def build(request, tmp_path_factory) -> Path:
    """Return a build folder holding the module's SITES (OMOP tables and cohort), generated with SITES_SEED."""
    from synthetic_sites import build_sites

    root = tmp_path_factory.mktemp("build")
    build_sites(root, _module_setting(request, "SITES"), seed=_module_setting(request, "SITES_SEED"))
    return root


@pytest.fixture(scope="module")
def profile(request):
    """Return the smoke profile with the module's FEDERATED overrides (rounds, local epochs)."""
    from compendium.params import PARAMS_DIR, load_params

    smoke = load_params(PARAMS_DIR / "smoke.yaml")
    federated = smoke.federated.model_copy(update=_module_setting(request, "FEDERATED"))
    return smoke.model_copy(update={"federated": federated})


@pytest.fixture(scope="module")
def site_dirs(request, build) -> list[Path]:
    """Return the folders of the module's SITES in `build`, in SITES order (one per ClientApp)."""
    from fl.data import site_dir

    return [site_dir(build, site) for site in _module_setting(request, "SITES")]
