"""Atomic writes, content hashes and the manifest every stage leaves behind."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from compendium.paths import REPO_ROOT

#: Packages whose versions every manifest records.
RECORDED_PACKAGES = (
    "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "torch", "flwr", "opacus",
    "papermill", "nbconvert", "matplotlib", "seaborn", "pydantic",
)


def atomic_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) then rename tmp onto target, so target is whole or absent."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def replace_folder(staging: Path, target: Path) -> Path:
    """Put a finished staging folder at target with two renames; the previous folder is removed after."""
    import shutil

    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(target: Path, data) -> Path:
    """Write `data` as stable, indented JSON (sorted keys) atomically.

    JSON has no NaN or Infinity: a number that is not finite (a metric that
    is not estimable, an epsilon without noise) is written as null.
    """
    text = json.dumps(_finite(data), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"
    return atomic_write(target, lambda tmp: tmp.write_text(text))


def save_arrays(target: Path, **arrays) -> Path:
    """Write named arrays as an .npz that np.load reads, byte-identical for identical arrays.

    np.savez stamps each member with the current time, so two identical runs
    would write different files; here every member gets a fixed timestamp.
    """
    import io
    import zipfile

    import numpy as np

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, value in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())

    return atomic_write(Path(target), write)


def _finite(value):
    """Return `value` with every non-finite float (Python or NumPy) replaced by None, recursively."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # a NumPy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative(path: Path, root: Path = REPO_ROOT) -> str:
    """Return path relative to root where possible (manifests stay machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def file_records(paths: Iterable[Path], root: Path = REPO_ROOT) -> list[dict]:
    """Return [{path, sha256, bytes}] for files, sorted by path."""
    records = []
    for path in sorted({Path(p) for p in paths}, key=lambda p: relative(p, root)):
        records.append({"path": relative(path, root), "sha256": sha256(path), "bytes": path.stat().st_size})
    return records


def files_under(folder: Path) -> list[Path]:
    """Return every regular file below folder, skipping hidden temp files."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))


def git_state(root: Path = REPO_ROOT) -> dict:
    """Return the git commit and whether the work tree has uncommitted changes."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions(names: Iterable[str] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Return installed versions of the named distributions (None if absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def manifest(*, stage: str, profile: str, seed: int, parameters: dict, inputs: list[dict],
             outputs: list[dict], wall_seconds: float) -> dict:
    """Return the provenance record of one stage run."""
    return {
        "stage": stage,
        "profile": profile,
        "seed": seed,
        "parameters": parameters,
        "inputs": inputs,
        "outputs": outputs,
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall_seconds, 3),
    }
