"""CITATION.cff is valid Citation File Format 1.2.0 and agrees with pyproject.toml and LICENSE."""
from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CITATION = REPO / "CITATION.cff"
# The official CFF 1.2.0 schema, vendored so that the test needs no network: copied unchanged from
# cffconvert/schemas/1.2.0/schema.json in the PyPI wheel cffconvert-2.0.0-py3-none-any.whl, byte-identical
# to schema.json at tag 1.2.0 of github.com/citation-file-format/citation-file-format (tests/data/README.md).
SCHEMA = REPO / "tests" / "data" / "cff-schema-1.2.0.json"
#: LICENSE's first line -> the SPDX identifier CITATION.cff and pyproject.toml must state.
SPDX_BY_LICENSE_TITLE = {"MIT License": "MIT", "BSD 3-Clause License": "BSD-3-Clause", "Apache License": "Apache-2.0"}


def _dates_as_text(value):
    """Return `value` with YAML dates as ISO strings, as the schema asks of validators ($comment of `date`)."""
    if isinstance(value, dict):
        return {key: _dates_as_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_dates_as_text(item) for item in value]
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value


def _citation() -> dict:
    return _dates_as_text(yaml.safe_load(CITATION.read_text(encoding="utf-8")))


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["$id"] == "https://citation-file-format.github.io/1.2.0/schema.json"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def test_citation_file_is_valid_cff_1_2_0():
    citation = _citation()
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
              for e in _validator().iter_errors(citation)]
    assert errors == [], "CITATION.cff does not validate against the CFF 1.2.0 schema:\n" + "\n".join(errors)
    assert citation["cff-version"] == "1.2.0"
    assert citation["type"] == "software"


@pytest.mark.parametrize("fault", ["no authors", "licence not an SPDX identifier", "date not ISO"])
def test_a_broken_citation_file_fails_validation(fault):
    """Planted faults: the validation above can fail."""
    broken = _citation()
    if fault == "no authors":
        del broken["authors"]
    elif fault == "licence not an SPDX identifier":
        broken["license"] = "MIT License"
    else:
        broken["date-released"] = "29 November 2026"
    assert not _validator().is_valid(broken), fault


def test_citation_agrees_with_pyproject_and_license():
    citation = _citation()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    title = license_text.splitlines()[0].strip()
    assert title in SPDX_BY_LICENSE_TITLE, f"LICENSE starts with {title!r}, not a licence this test knows"
    spdx = SPDX_BY_LICENSE_TITLE[title]
    assert str(citation["version"]) == project["version"]
    assert citation["license"] == spdx
    assert project["license"] == spdx  # PEP 639: an SPDX expression
    holder = re.search(r"^Copyright \(c\) \d{4} (.+)$", license_text, re.M)
    assert holder, "LICENSE has no 'Copyright (c) YEAR HOLDER' line"
    assert [author.get("name") for author in citation["authors"]] == [holder.group(1)]
