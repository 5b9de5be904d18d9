"""The parameter schema: every shipped profile loads; bad profiles fail naming file and key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compendium.params import PARAMS_DIR, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_shipped_profiles_are_valid(name):
    profile = load_params(PARAMS_DIR / f"{name}.yaml")
    assert profile.profile == name
    assert set(profile.sites) == {"halland", "sahlgrenska"}
    sizes = {site: p.patients for site, p in profile.site_profiles().items()}
    assert sizes["sahlgrenska"] > sizes["halland"]  # the university hospital is larger


def test_profiles_grow_in_size():
    total = {n: sum(p.patients for p in load_params(PARAMS_DIR / f"{n}.yaml").site_profiles().values())
             for n in ("smoke", "default", "paper")}
    assert total["smoke"] < total["default"] < total["paper"]


def _write(tmp_path: Path, mutate, name: str = "custom") -> Path:
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["profile"] = name
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda d: d.update(sed=1), "sed", "unknown key"),
        (lambda d: d["cohort"].update(test_fraction="0.3"), "cohort.test_fraction", "valid number"),
        (lambda d: d["cohort"].update(test_fraction=0.9), "cohort.test_fraction", "less than or equal"),
        (lambda d: d.update(seed=-1), "seed", "greater than or equal"),
        (lambda d: d["synthetic"]["sites"]["halland"]["overrides"].update(patients=10),
         "synthetic.sites.halland.overrides.patients", "greater than or equal to 50"),
        (lambda d: d["synthetic"]["sites"]["halland"]["overrides"].update(patients=1500.0),
         "synthetic.sites.halland.overrides.patients", "valid integer"),
        (lambda d: d["synthetic"]["sites"]["halland"]["overrides"].update(female_fraction=1.5),
         "synthetic.sites.halland.overrides.female_fraction", "less than or equal to 1"),
        (lambda d: d["synthetic"]["sites"]["halland"]["overrides"].update(colour="blue"),
         "synthetic.sites.halland.overrides.colour", "unknown key"),
        (lambda d: d["synthetic"]["sites"].update(orebro={"overrides": {"patients": 100}}),
         "synthetic.sites.orebro", "unknown site"),
        (lambda d: d["synthetic"]["sites"].pop("sahlgrenska"), "synthetic.sites", "at least two sites"),
        (lambda d: d["privacy"].update(sensitive_attribute="age"), "privacy.sensitive_attribute",
         "binary cohort feature"),
    ],
)
def test_bad_profile_names_file_and_key(tmp_path, mutate, key, words):
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"{key}:" in message
    assert words in message


def test_new_site_from_template_needs_distinct_code(tmp_path):
    third = {"template": "halland", "overrides": {"patients": 300}}
    with pytest.raises(ParamsError, match="site_code"):
        load_params(_write(tmp_path, lambda d: d["synthetic"]["sites"].update(kronoberg=third)))
    third["overrides"]["site_code"] = 3
    profile = load_params(_write(tmp_path, lambda d: d["synthetic"]["sites"].update(kronoberg=third)))
    assert profile.site_profiles()["kronoberg"].site_code == 3


def test_profile_name_must_match_file(tmp_path):
    path = _write(tmp_path, lambda d: None)
    renamed = path.with_name("other.yaml")
    path.rename(renamed)
    with pytest.raises(ParamsError, match="must equal the file name"):
        load_params(renamed)


def test_missing_profile_lists_available():
    with pytest.raises(ParamsError, match="smoke"):
        load_params(PARAMS_DIR / "nonexistent.yaml")


def test_cli_rejects_bad_profile_before_any_work(tmp_path):
    build_root = tmp_path / "build"
    result = subprocess.run(
        [sys.executable, "-m", "compendium", "run", "01_synthetic_ehr", "--profile", "nonexistent",
         "--build-root", str(build_root)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "params/nonexistent.yaml" in result.stderr
    assert not build_root.exists()


def test_make_rejects_unknown_profile():
    result = subprocess.run(["make", "-n", "all", "PROFILE=nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PROFILE=nonexistent" in result.stderr and "smoke" in result.stderr
