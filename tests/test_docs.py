"""The guides stay true to the code: the stage picture, the files they name, both report languages."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from compendium.stages import mermaid

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"


def test_the_architecture_picture_is_the_stage_table():
    block = re.search(r"```mermaid\n(.*?)\n```", ARCHITECTURE.read_text(), re.S)
    assert block is not None, "docs/architecture.md has no mermaid block"
    assert block.group(1) == mermaid(), "run `python -m compendium stages --mermaid` and paste it into the guide"


def test_every_file_the_architecture_guide_names_exists():
    named = set(re.findall(r"`((?:compendium|data_synth|fl|report|notebooks|params|tests|docs)/[\w./{},<>-]+)", 
                           ARCHITECTURE.read_text()))
    paths = []
    for name in named:
        if "<" in name:
            continue  # a pattern such as params/<profile>.yaml
        braces = re.match(r"(.*)\{(.*)\}(.*)", name)
        paths += [f"{braces[1]}{part}{braces[3]}" for part in braces[2].split(",")] if braces else [name]
    missing = sorted(path.split(":")[0] for path in paths if not (REPO / path.split(":")[0].rstrip("/")).exists())
    assert len(paths) > 20 and missing == []


def _keys(tree: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in tree.items():
        found.add(f"{prefix}{key}")
        if isinstance(value, dict):
            found |= _keys(value, f"{prefix}{key}.")
    return found


def test_the_english_and_swedish_report_texts_have_the_same_keys():
    english, swedish = (yaml.safe_load((REPO / "report" / "text" / f"{lang}.yaml").read_text()) for lang in ("en", "sv"))
    assert _keys(english) ^ _keys(swedish) == set()
