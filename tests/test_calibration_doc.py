"""docs/calibration.md, the generator's calibration record, stays in step with the code that cites it."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "calibration.md"
TEXT = DOC.read_text()
CITING_FILES = sorted((REPO / "data_synth").glob("*.py")) + [REPO / "tests" / "test_generator.py"]


def _resolve(dotted: str):
    """Return the object `data_synth.module[.submodule].NAME` names, importing the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ModuleNotFoundError(dotted)


CODE_REFERENCES = sorted(set(re.findall(r"`(data_synth(?:\.\w+)+)`", TEXT)))


def test_the_doc_names_where_each_figure_is_used():
    assert len(CODE_REFERENCES) > 20, "docs/calibration.md should point at the constants it calibrates"


@pytest.mark.parametrize("dotted", CODE_REFERENCES)
def test_every_code_reference_in_the_doc_exists(dotted):
    try:
        _resolve(dotted)
    except (ModuleNotFoundError, AttributeError) as error:
        pytest.fail(f"docs/calibration.md names `{dotted}`, which does not exist ({error}); "
                    "update the doc when a constant is renamed or moved")


def test_every_section_the_code_cites_is_in_the_doc():
    headings = set(re.findall(r"^## (.+?)\s*$", TEXT, flags=re.M))
    cited = {}
    for path in CITING_FILES:
        source = " ".join(path.read_text().split())  # a citation may wrap across comment lines
        source = source.replace(" #: ", " ").replace(" # ", " ")
        for section in re.findall(r'docs/calibration\.md,? "([^"]+)"', source):
            cited.setdefault(section, []).append(path.name)
    assert cited, "no module cites a section of docs/calibration.md"
    missing = {section: files for section, files in cited.items() if section not in headings}
    assert not missing, f"cited sections without a '## ' heading in docs/calibration.md: {missing}"


def test_every_listed_source_is_used_and_every_used_source_is_listed():
    listed = set(re.findall(r"^\| (S\d+) \|", TEXT, flags=re.M))
    sources_end = TEXT.index("\n## ", TEXT.index("## Sources"))
    used = set(re.findall(r"\bS\d+\b", TEXT[sources_end:]))
    assert listed, "docs/calibration.md lists no sources"
    assert used <= listed, f"cited but not listed under Sources: {sorted(used - listed)}"
    assert listed <= used, f"listed under Sources but never cited: {sorted(listed - used)}"


def test_calibration_pointers_stay_inside_the_repository():
    for path in CITING_FILES:
        text = path.read_text()
        assert "../shared" not in text and "CALIBRATION" + ".md" not in text, (
            f"{path.name} points at a calibration file outside the repository; cite docs/calibration.md")
