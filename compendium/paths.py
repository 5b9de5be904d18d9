"""Where the repository and its build tree are: the bottom layer, importing nothing of the project."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
BUILD_ROOT = REPO_ROOT / "build"
