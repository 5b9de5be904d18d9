"""Stage 1 end to end with the smoke profile: artifacts, provenance, determinism, failure."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from compendium.artifacts import sha256
from compendium.params import PARAMS_DIR
from compendium.stages import StageError, run_stage
from data_synth import omop

REPO = Path(__file__).resolve().parents[1]
STAGE = "01_synthetic_ehr"
pytestmark = pytest.mark.integration


BASELINES = "02_local_baselines"
FEDERATED = "03_federated_training"
PRIVACY = "04_privacy_evaluation"
REPORT = "05_report"
REQUIRED_MODELS = ("local_halland", "local_sahlgrenska", "pooled", "oracle", "lace", "gbt")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    folder = run_stage(STAGE, "smoke", build_root=root, progress=False)
    run_stage(BASELINES, "smoke", build_root=root, progress=False)
    run_stage(FEDERATED, "smoke", build_root=root, progress=False)
    run_stage(PRIVACY, "smoke", build_root=root, progress=False)
    run_stage(REPORT, "smoke", build_root=root, progress=False)
    from report.site import build_site

    build_site(root / "smoke", "smoke")
    return root, folder


def test_stage_writes_artifacts_manifest_and_rendered_notebook(smoke_run):
    root, folder = smoke_run
    assert folder == root / "smoke" / STAGE
    for site in ("halland", "sahlgrenska"):
        assert (folder / "sites" / site / "cohort.parquet").is_file()
        assert len(list((folder / "sites" / site / "omop").glob("*.parquet"))) == len(omop.SCHEMAS)
    summary = json.loads((folder / "summary.json").read_text())
    for site, values in summary["sites"].items():
        assert values["index_admissions"] > 500
        assert 0.1 < values["readmission_rate"] < 0.35
        assert 0.6 < values["oracle_auroc_test"] < 0.95
    # The transport gap: every ordered pair of sites, and each knob group alone at the profile's size.
    assert {(row["model from"], row["test site"]) for row in summary["transport_gap"]} == {
        (a, b) for a in ("halland", "sahlgrenska") for b in ("halland", "sahlgrenska")}
    assert summary["transport_by_knob"]["patients_per_site"] == 2500
    scenarios = {row["scenario"] for row in summary["transport_by_knob"]["rows"]}
    assert {"no difference", "record coverage only", "all differences"} <= scenarios
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 20220923 and manifest["profile"] == "smoke"
    assert manifest["parameters"]["synthetic"]["sites"]["halland"]["overrides"]["patients"] == 1500
    inputs = {record["path"]: record["sha256"] for record in manifest["inputs"]}
    assert inputs["params/smoke.yaml"] == sha256(PARAMS_DIR / "smoke.yaml")
    assert "data_synth/generator.py" in inputs and "notebooks/01_synthetic_ehr.ipynb" in inputs
    outputs = {record["path"]: record["sha256"] for record in manifest["outputs"]}
    assert outputs["sites/halland/cohort.parquet"] == sha256(folder / "sites/halland/cohort.parquet")
    assert manifest["packages"]["pyarrow"] and manifest["wall_seconds"] > 0
    assert len(manifest["git"]["commit"] or "x" * 40) == 40
    html = (root / "smoke" / "notebooks" / f"{STAGE}.html").read_text()
    assert html.count("data:image/png") >= 6  # every figure rendered inline
    assert sorted(p.name for p in (folder / "figures").glob("*.png")) == [
        "age_sex.png", "code_frequency.png", "lab_distributions.png", "missingness.png",
        "readmission_rates.png", "site_differences.png", "transport_by_knob.png"]
    assert not list((root / "smoke").glob(".*")), "staging folders left behind"


def test_same_profile_and_seed_give_identical_artifacts(smoke_run, tmp_path):
    first_root, _ = smoke_run
    for stage in (STAGE, BASELINES, FEDERATED, PRIVACY, REPORT):
        first = first_root / "smoke" / stage
        second = run_stage(stage, "smoke", build_root=tmp_path, progress=False)
        if stage == REPORT:
            # Reports may differ only in timestamps and run times.
            import re

            def normalise(html: str) -> str:
                html = re.sub(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00", "<time>", html)
                return re.sub(r"<td>\d+\.\d+</td><td>\d+</td>", "<td><seconds></td><td>", html)

            for name in ("pilot_report.html", "pilot_report.sv.html"):
                assert normalise((first / name).read_text()) == normalise((second / name).read_text()), name
            continue
        a = json.loads((first / "manifest.json").read_text())["outputs"]
        b = json.loads((second / "manifest.json").read_text())["outputs"]
        data = lambda records: {r["path"]: r["sha256"] for r in records if not r["path"].startswith("figures/")}  # noqa: E731
        assert data(a) == data(b), stage
        assert (first / "summary.json").read_text() == (second / "summary.json").read_text()


def test_baselines_summary_has_every_model_on_every_site(smoke_run):
    root, _ = smoke_run
    folder = root / "smoke" / BASELINES
    summary = json.loads((folder / "summary.json").read_text())
    for model in REQUIRED_MODELS:
        for site in ("halland", "sahlgrenska"):
            auroc = summary["auroc"][model][site]
            assert auroc["lower"] <= auroc["value"] <= auroc["upper"], (model, site)
            assert 0.5 < auroc["value"] < 1.0
            if model != "lace":
                assert 0 < summary["brier"][model][site] < 0.25
                # A broken fit shows as a slope near zero or negative. Overfitting is a finding, not a bug:
                # on smoke's 840 training stays, with the weaker signal of issue 18, Halland's own model
                # reaches slope 0.24 on its test split (stage 2 reports it).
                assert 0.15 < summary["calibration_slope"][model][site] < 2.0
    assert summary["size_sweep"]["site"] == "halland"  # the smaller hospital
    manifest = json.loads((folder / "manifest.json").read_text())
    upstream = [r["path"] for r in manifest["inputs"] if "01_synthetic_ehr" in r["path"]]
    assert any(p.endswith("halland/cohort.parquet") for p in upstream)
    html = (root / "smoke" / "notebooks" / f"{BASELINES}.html").read_text()
    assert html.count("data:image/png") >= 5


def test_federated_summary_and_ledger(smoke_run):
    root, _ = smoke_run
    folder = root / "smoke" / FEDERATED
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["strategies"] == ["fedavg", "fedprox", "fedadam", "fedper"]
    # Model selection ran on training data and chose one of its candidates; every strategy trained with it.
    chosen = summary["selection"]
    assert chosen["chosen"]["optimizer"] in ("adam", "sgd") and 1 <= chosen["rounds"] <= 8
    assert len(chosen["candidates"]) == 2 and summary["rounds"] == chosen["rounds"]
    # Each site personalised every strategy's model at home; the models are in the site's own folder.
    for strategy in summary["strategies"]:
        for method in ("finetune", "recalibrate", *(("own-head",) if strategy == "fedper" else ())):
            for site in ("halland", "sahlgrenska"):
                assert summary["personalised"][strategy][method][site]["auroc"]["value"] > 0.5
                assert (folder / "sites" / site / strategy / f"{method}.npz").is_file()
    # Smoke's Halland test split has about 360 stays and an oracle AUROC near 0.66 (an outcome as hard to
    # predict as published ones, issue 18), so "better than chance" is what this profile can show there; the
    # default profile's fitted range is held by tests/test_plausibility.py.
    for strategy in summary["strategies"]:
        for site in ("halland", "sahlgrenska"):
            auroc = summary["auroc"][strategy][site]
            assert 0.5 < auroc["value"] < 0.95 and auroc["lower"] <= auroc["value"] <= auroc["upper"]
            assert summary["bytes_exchanged_per_site"][strategy][site] > 0
        assert summary["auroc"][strategy]["sahlgrenska"]["value"] > 0.6  # 640 test stays: a model that learned
        assert (folder / strategy / "ledger.jsonl").is_file()
        assert (folder / strategy / "final_model.npz").is_file()
        rounds = sorted((folder / strategy / "checkpoints").glob("round_*.npz"))
        assert len(rounds) == summary["rounds"] + 1  # the initial model and one per round
    html = (root / "smoke" / "notebooks" / f"{FEDERATED}.html").read_text()
    assert html.count("data:image/png") >= 3


def test_privacy_summary_has_every_attack_and_position(smoke_run):
    root, _ = smoke_run
    summary = json.loads((root / "smoke" / PRIVACY / "summary.json").read_text())
    positions = {entry["position"] for entry in summary["attacks"]}
    assert {"A/B: released model (scores or weights)", "positive control", "null control",
            "C: server, site update", "D: other hospital, recovered update"} <= positions
    for entry in summary["attacks"]:
        assert 0.0 <= entry["auc"] <= 1.0 and entry["members"] > 0 and entry["non_members"] > 0
        for key in ("tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr"):
            assert entry[key]["lower"] <= entry[key]["value"] <= entry[key]["upper"]
    assert summary["partner_recovery_max_error"] < 1e-5
    # Per-round exposure: every round of every site; the other attacks have their own entries.
    assert len(summary["per_round_exposure"]) == 8 * 2
    groups = {(g["group"], g["guesser"]) for g in summary["attribute_inference"]["groups"]}
    assert groups == {(g, k) for g in ("members", "non-members") for k in ("marginal", "population", "model")}
    assert set(summary["canaries"]["groups"]) == {"ordinary patients", "canaries"}
    single = [r for r in summary["batch_reconstruction"]["results"]
              if r["batch_size"] == 1 and r["attacker"] == "gradient matching"]
    assert single and all(r["whole_record_matches"] == 1.0 for r in single)
    dp = summary["dp_frontier"]
    assert {r["attack"] for r in dp["attacks_on_dp_reference_pipelines"]} == {
        "loss threshold", "LiRA (online)", "LiRA (offline)", "RMIA"}
    assert dp["any_attack_bound_violation"] is False
    # Issue 13: the DP runs' preprocessing and noise source are stated; the attack table starts undefended.
    assert (dp["preprocessing"], dp["noise_source"]) == ("public_ranges", "seeded")
    assert dp["attacks_on_dp_reference_pipelines"][0]["noise_multiplier"] == 0.0
    assert {r["bound_check_at_1pct_fpr"] for r in dp["attacks_on_dp_reference_pipelines"]
            if r["noise_multiplier"] == 0.0} == {"not testable"}
    assert summary["dp_audit"]["controls_caught"] is True
    assert summary["dp_audit"]["any_violation_at_noise_levels"] is False
    client = summary["client_level_dp"]
    assert [point["noise_multiplier"] for point in client["points"]] == [0.0, 1.0]  # no DP, then smoke's level
    assert client["points"][0]["epsilon"] is None and client["points"][1]["epsilon"] > 0
    assert client["unit_of_privacy"].startswith("one hospital")
    assert client["points"][1]["epsilon_replacement"] > client["points"][1]["epsilon"]
    assert client["noise_source"] == "seeded" and client["preprocessing"] == "public_ranges"


def test_stage_two_refuses_to_run_without_stage_one(tmp_path):
    with pytest.raises(StageError, match="needs 01_synthetic_ehr first"):
        run_stage(BASELINES, "smoke", build_root=tmp_path, progress=False)
    assert not (tmp_path / "smoke" / BASELINES).exists()


@pytest.mark.integration
def test_default_profile_meets_the_quality_bars(tmp_path):
    """Oracle not beaten by any fitted model; pooling not worse than a site's own model (issue 3)."""
    run_stage(STAGE, "default", build_root=tmp_path, progress=False)
    folder = run_stage(BASELINES, "default", build_root=tmp_path, progress=False)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["checks"] == {site: {"oracle_not_beaten": True, "pooled_not_worse": True}
                                 for site in ("halland", "sahlgrenska")}
    federated = json.loads((run_stage(FEDERATED, "default", build_root=tmp_path, progress=False)
                            / "summary.json").read_text())
    # Issue 4's utility target for FedAvg: within 0.01 of pooled on each site (training reaches the pooled
    # model). Against the smaller site's own model it is held to 0.01: with issue 15's site differences
    # (base rates, outcome mechanism, record coverage) the one global model scores 0.675 at Halland against
    # Halland's own 0.680 (measured), inside both intervals; where federation pays is issue 15's map.
    for site in ("halland", "sahlgrenska"):
        gap = federated["auroc"]["fedavg"][site]["value"] - summary["auroc"]["pooled"][site]["value"]
        assert abs(gap) <= 0.01, (site, gap)
    assert (federated["auroc"]["fedavg"]["halland"]["value"]
            >= summary["auroc"]["local_halland"]["halland"]["value"] - 0.01)


def test_failed_stage_leaves_no_half_written_output(tmp_path):
    params = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    params["profile"] = "broken"
    # A study window with no index stays makes the cohort builder fail inside the notebook.
    params["cohort"].update(study_start="2000-01-01", study_end="2001-12-31", followup_end="2002-12-31")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(params).replace("'", ""))
    root = tmp_path / "build"
    with pytest.raises(StageError, match="no index heart-failure stays"):
        run_stage(STAGE, "broken", build_root=root, progress=False, params_file=path)
    assert not (root / "broken" / STAGE).exists()
    assert not (root / "broken" / "notebooks").exists()
    assert not list((root / "broken").glob(".*"))
    assert (root / "broken" / "logs" / f"{STAGE}.failed.ipynb").is_file()


def test_make_skips_an_up_to_date_stage(tmp_path):
    def make(*args):
        return subprocess.run(["make", "--no-print-directory", *args, "PROFILE=smoke", f"BUILD_ROOT={tmp_path}"],
                              cwd=REPO, capture_output=True, text=True)

    built = make("stage1")
    assert built.returncode == 0, built.stderr
    assert make("-q", "stage1").returncode == 0  # nothing to do
    for changed in ("data_synth/cohort.py", "params/smoke.yaml", "notebooks/01_synthetic_ehr.ipynb"):
        assert make("-q", "-W", changed, "stage1").returncode == 1, f"{changed} should make stage 1 stale"
    assert make("-q", "-W", "README.md", "stage1").returncode == 0
