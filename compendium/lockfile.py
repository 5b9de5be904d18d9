"""The pinned environment: requirements.lock and its conda mirror environment.yml.

`python -m compendium.lockfile freeze` turns `pip freeze --all` output (stdin)
into the lock; `python -m compendium.lockfile env` writes environment.yml from
the lock. A test keeps the two in sync.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_PATH = REPO_ROOT / "requirements.lock"
ENVIRONMENT_PATH = REPO_ROOT / "environment.yml"
PYTHON_VERSION = "3.11"
ENVIRONMENT_NAME = "fedhf"

# Local version labels (torch's "+cpu") name a build, not a release: pip's
# `==2.13.0` accepts the CPU wheel, and conda users choose their own build.
_LOCAL_LABEL = re.compile(r"\+[A-Za-z0-9.]+$")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
_NOT_PINNED = {"pip"}  # the installer itself is the environment's, not ours


def normalise_freeze(lines: list[str]) -> list[str]:
    """Return the sorted `name==version` pins of a pip freeze listing."""
    pins = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue  # comments, and the project itself installed in editable mode
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"pip freeze line is not an exact pin: {line!r}")
        name, version = match.groups()
        if name.lower() in _NOT_PINNED:
            continue
        pins.append(f"{name}=={_LOCAL_LABEL.sub('', version)}")
    return sorted(pins, key=str.lower)


def read_lock(path: Path = LOCK_PATH) -> list[str]:
    """Return the pins of the lock file, comments dropped."""
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def render_environment(pins: list[str]) -> str:
    """Return environment.yml text carrying exactly the given pip pins."""
    body = "\n".join(f"      - {pin}" for pin in pins)
    return (
        "# Generated from requirements.lock by `make lock`; do not edit by hand.\n"
        "# conda users: conda env create -f environment.yml && conda activate fedhf\n"
        f"name: {ENVIRONMENT_NAME}\n"
        "channels:\n  - conda-forge\n"
        "dependencies:\n"
        f"  - python={PYTHON_VERSION}\n"
        "  - pip\n"
        "  - pip:\n"
        f"{body}\n"
    )


def main(argv: list[str]) -> int:
    if argv == ["freeze"]:
        pins = normalise_freeze(sys.stdin.read().splitlines())
        LOCK_PATH.write_text(
            "# Exact pins resolved from requirements.in by `make lock`.\n"
            + "\n".join(pins)
            + "\n"
        )
        return 0
    if argv == ["env"]:
        ENVIRONMENT_PATH.write_text(render_environment(read_lock()))
        return 0
    print("usage: python -m compendium.lockfile freeze|env", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
