"""The worked bring-your-own-data example end to end (smoke settings): examples/byod/three-hospitals.yaml.

Three hospitals in one flat CSV, one of them small (tens of patients) and
without NT-proBNP; stages 1 (data card) to 5 (report) and the reviewer site.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from compendium.artifacts import sha256
from compendium.stages import StageError, run_stage
from report.leakscan import scan_tree

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "byod"
DATA = EXAMPLE / "three-hospitals.yaml"
SITES = ("varberg", "molndal", "vaxjo")
STAGES = ("01_data_card", "02_local_baselines", "03_federated_training", "04_privacy_evaluation", "05_report")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    started = time.perf_counter()
    for stage in STAGES:
        run_stage(stage, "smoke", build_root=root, progress=False, data_file=DATA)
    from report.site import build_site

    build_site(root / "smoke-three-hospitals", "smoke", "examples/byod/three-hospitals.yaml")
    print(f"worked example end to end: {time.perf_counter() - started:.1f} s")
    return root / "smoke-three-hospitals"


def _summary(build: Path, stage: str) -> dict:
    return json.loads((build / stage / "summary.json").read_text())


def test_example_builds_apart_from_synthetic_runs_and_records_the_data(example_run):
    build = example_run
    assert sorted(p.name for p in build.iterdir() if not p.name.startswith(".")) == [
        *STAGES[:4], "05_report", "notebooks", "site"]
    card = _summary(build, "01_data_card")
    assert card["data"] == {"kind": "provided", "name": "three-hospitals", "source": "flat",
                            "file": "three-hospitals.yaml", "description": card["data"]["description"]}
    assert set(card["sites"]) == set(SITES)
    assert card["sites"]["vaxjo"]["index_admissions"] < 100 and card["sites"]["vaxjo"]["lacks"] == ["ntprobnp"]
    assert "ntprobnp" in card["missing_indicators"]
    for stage in STAGES:
        manifest = json.loads((build / stage / "manifest.json").read_text())
        assert manifest["parameters"]["data"] == "examples/byod/three-hospitals.yaml"
        inputs = {r["path"]: r["sha256"] for r in manifest["inputs"]}
        assert inputs["examples/byod/three-hospitals.yaml"] == sha256(DATA)
    inputs = {r["path"]: r["sha256"] for r in json.loads((build / "01_data_card" / "manifest.json").read_text())["inputs"]}
    assert inputs["examples/byod/hospitals.csv"] == sha256(EXAMPLE / "hospitals.csv")


def test_local_pooled_and_federated_results_per_site(example_run):
    base = _summary(example_run, "02_local_baselines")
    assert "oracle" not in base["auroc"] and "lace" not in base["auroc"]
    assert base["references"] == {"oracle": False, "lace": False}
    for model in ("pooled", "gbt", *(f"local_{s}" for s in SITES)):
        for site in SITES:
            auroc = base["auroc"][model][site]
            assert auroc["lower"] <= auroc["value"] <= auroc["upper"], (model, site)
    assert set(base["checks"]) == set(SITES)
    assert all(set(c) == {"pooled_not_worse"} for c in base["checks"].values())
    assert base["size_sweep"]["site"] == "vaxjo"  # the smallest hospital
    fed = _summary(example_run, "03_federated_training")
    for strategy in fed["strategies"]:
        for site in SITES:
            assert 0.5 < fed["auroc"][strategy][site]["value"] <= 1.0
            assert fed["bytes_exchanged_per_site"][strategy][site] > 0
    privacy = _summary(example_run, "04_privacy_evaluation")
    positions = {a["position"] for a in privacy["attacks"]}
    assert "C: server, site update" in positions and "A/B: released model (scores or weights)" in positions
    assert not any(p.startswith("D:") for p in positions)  # three sites: no partner to subtract
    assert privacy["partner_recovery_max_error"] is None


def test_report_says_which_data_and_drops_synthetic_claims(example_run):
    for name in ("pilot_report.html", "pilot_report.sv.html"):
        html = (example_run / "05_report" / name).read_text()
        assert "three-hospitals" in html
        for site in SITES:
            assert f"<td>{site}</td>" in html
        assert "oracle AUROC" not in html and "orakel-AUROC" not in html
        assert "The data are synthetic" not in html and "Uppgifterna är syntetiska" not in html
    html = (example_run / "05_report" / "pilot_report.html").read_text()
    assert "no oracle" in html
    assert "Provided data" in (example_run / "site" / "index.html").read_text()
    assert scan_tree(example_run) == []


def test_patient_identifier_never_reaches_an_artifact(example_run):
    table = pd.read_csv(EXAMPLE / "hospitals.csv", dtype=str)
    references = table["patient_ref"].sample(40, random_state=1).tolist()
    for path in (p for p in example_run.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert b"patient_ref" not in content, path
        assert not any(ref.encode() in content for ref in references), path


def test_data_card_is_deterministic_and_example_regenerates(example_run, tmp_path):
    again = run_stage("01_data_card", "smoke", build_root=tmp_path, progress=False, data_file=DATA)
    records = lambda folder: {r["path"]: r["sha256"] for r in json.loads((folder / "manifest.json").read_text())[  # noqa: E731
        "outputs"] if not r["path"].startswith("figures/")}
    assert records(again) == records(example_run / "01_data_card")
    regenerated = tmp_path / "hospitals.csv"
    subprocess.run([sys.executable, str(EXAMPLE / "make_example.py"), "--out", str(regenerated)], check=True,
                   capture_output=True)
    assert sha256(regenerated) == sha256(EXAMPLE / "hospitals.csv"), "rerun examples/byod/make_example.py"


def test_bad_data_fail_the_data_card_with_no_half_written_output(tmp_path):
    table = pd.read_csv(EXAMPLE / "hospitals.csv", dtype=str)
    table.loc[table["hospital"] == "Molndal", "na"] = "low"
    table.to_csv(tmp_path / "hospitals.csv", index=False)
    (tmp_path / "broken.yaml").write_text(DATA.read_text())
    root = tmp_path / "build"
    with pytest.raises(StageError, match=r"hospitals\.csv: column 'na' at site 'molndal': \d+ value\(s\) cannot be "
                                         r"parsed as numbers, e\.g\. \['low'\]"):
        run_stage("01_data_card", "smoke", build_root=root, progress=False, data_file=tmp_path / "broken.yaml")
    assert not (root / "smoke-broken" / "01_data_card").exists()
    assert not list((root / "smoke-broken").glob(".*"))
    with pytest.raises(StageError, match="not part of the pipeline on provided data"):
        run_stage("01_synthetic_ehr", "smoke", build_root=root, progress=False, data_file=DATA)
