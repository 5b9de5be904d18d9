"""Promises about the repository itself: pinned environment in sync, notebooks stripped."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from compendium.lockfile import ENVIRONMENT_PATH, LOCK_PATH, normalise_freeze, read_lock, render_environment

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_environment_yml_carries_the_lock_pins():
    assert ENVIRONMENT_PATH.read_text() == render_environment(read_lock()), (
        "environment.yml drifted from requirements.lock; run `make lock` (or "
        "`python -m compendium.lockfile env`)"
    )


def test_lock_pins_every_direct_requirement_and_cpu_torch():
    pins = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in read_lock()}
    assert pins["torch"] == "2.13.0"
    for line in (REPO / "requirements.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[\[=<>]", line)[0].lower().replace("_", "-")
            assert name in pins, f"{name} from requirements.in is not pinned in {LOCK_PATH.name}"
    assert not any(name.startswith("nvidia-") for name in pins), "a CUDA build crept into the lock"


def test_freeze_normalisation_drops_local_labels_and_pip():
    assert normalise_freeze(["torch==2.13.0+cpu", "pip==23.2", "Zeta==1.0", "alpha==2"]) == [
        "alpha==2", "torch==2.13.0", "Zeta==1.0"]
    with pytest.raises(ValueError, match="not an exact pin"):
        normalise_freeze(["foo @ file:///tmp/foo.whl"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs; clear them before committing"
            assert cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_have_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("params_path", "output_dir", "build_dir"):
        assert re.search(rf"^{name} = ", tagged[0].source, re.M)


def test_every_stage_has_its_notebook():
    from compendium.stages import STAGES

    assert NOTEBOOKS, "no notebooks found"
    for stage in STAGES.values():
        assert stage.notebook.is_file(), stage.notebook


def test_saved_arrays_are_byte_identical_and_loadable(tmp_path, monkeypatch):
    import time
    import zipfile

    import numpy as np

    from compendium.artifacts import save_arrays

    weights = {"weight_0": np.arange(6, dtype=np.float32).reshape(2, 3), "spec_mean": np.array([1.5, 2.5])}
    # Two writes an hour apart on a fake clock. A zip member added by name is stamped with
    # time.localtime(time.time()) (2 s resolution); save_arrays must give its members a fixed time.
    now = time.time()
    for name, clock in (("a", now), ("b", now + 3600)):
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda clock=clock: clock)
            save_arrays(tmp_path / f"{name}.npz", **weights)
            with zipfile.ZipFile(tmp_path / f"{name}_stamped.zip", "w") as stamped:
                stamped.writestr("weight_0.npy", b"same bytes")
    # Control: the fake clock reaches the zip writer, so members added by name differ ...
    assert (tmp_path / "a_stamped.zip").read_bytes() != (tmp_path / "b_stamped.zip").read_bytes()
    # ... and save_arrays's files do not.
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = np.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded["weight_0"], weights["weight_0"])
    assert loaded["weight_0"].dtype == np.float32


def test_json_artifacts_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    import json

    import numpy as np

    from compendium.artifacts import write_json

    data = {"auroc": float("nan"), "epsilon": np.float64("inf"), "points": [{"tpr": np.float32(0.25)}, (1, -np.inf)],
            "rounds": np.int64(3)}
    write_json(tmp_path / "summary.json", data)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    # Python's parser would accept NaN; a strict parser (as in a browser) must accept this file too.
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict == {"auroc": None, "epsilon": None, "points": [{"tpr": 0.25}, [1, None]], "rounds": 3}
