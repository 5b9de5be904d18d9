"""Bring your own data: the dataset YAML, the data card's validation, imputation and single-class sites.

Fixtures are small hand-written tables (three sites, tens of patients each),
so every expected value can be checked by eye.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from compendium.params import PARAMS_DIR, ParamsError, build_name, load_params
from data_synth import provided
from data_synth.cohort import CohortSpec
from data_synth.dataset import DatasetError, load_dataset
from fl.data import FeatureStatistics, PreprocessingSpec, load_site, site_dir

REPO = Path(__file__).resolve().parents[1]
SITES = ("north", "south", "east")


def _hospital_table(rng: np.random.Generator, site: str, n: int, rate: float = 0.3) -> pd.DataFrame:
    y = rng.random(n) < rate
    return pd.DataFrame({
        "hosp": site.upper(),
        "mrn": [f"{site}-{i}" for i in range(n)],
        "age_y": np.round(rng.normal(78, 8, n)),
        "gender": rng.choice(["F", "M"], n),
        "bnp": np.round(np.exp(rng.normal(8, 1, n)) * (1 + y)),
        "nyha": rng.choice(["I", "II", "III", "IV"], n),
        "dead30": np.where(y, "Y", "N"),
    })


def _write_dataset(folder, tables: dict[str, pd.DataFrame] | None = None, **changes) -> str:
    rng = np.random.default_rng(3)
    tables = tables or {s: _hospital_table(rng, s, n) for s, n in zip(SITES, (80, 120, 30))}
    pd.concat(tables.values(), ignore_index=True).to_csv(folder / "all.csv", index=False)
    spec = {
        "name": "toy",
        "description": "Three toy hospitals.",
        "sites": {s: {"table": "all.csv", "site_value": s.upper()} for s in SITES},
        "columns": {
            "site": "hosp", "patient_id": "mrn", "outcome": {"column": "dead30", "positive": "Y"},
            "features": {"age": {"type": "numeric", "column": "age_y"},
                         "female": {"type": "binary", "column": "gender", "positive": "F"},
                         "bnp": {"type": "numeric", "log": True},
                         "nyha": {"type": "categorical", "levels": ["I", "II", "III", "IV"]}},
        },
        "subgroups": {"age": "age", "female": "female"},
    }
    for key, value in changes.items():
        target = spec
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        if value is None:
            target.pop(last)
        else:
            target[last] = value
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _build(tmp_path, path: str):
    dataset = load_dataset(path)
    return provided.run(dataset, CohortSpec(seed=7, test_fraction=0.3), tmp_path / "out" / "01_data_card")


# ---------------------------------------------------------------- the dataset YAML
def test_example_dataset_is_valid_and_names_its_four_sites():
    profile = load_params(PARAMS_DIR / "smoke.yaml", "examples/byod/four-sites.yaml")
    assert profile.sites == ("varberg", "molndal", "vaxjo", "ljungby")
    assert profile.data == "examples/byod/four-sites.yaml"
    assert build_name("smoke", profile.data) == "smoke-four-sites"
    assert load_params(PARAMS_DIR / "smoke.yaml").sites == ("halland", "sahlgrenska")


@pytest.mark.parametrize(("change", "message"), [
    ({"sites.north.table": "missing.csv"}, r"sites\.north\.table: file .*missing\.csv is not there"),
    ({"sites.north.tabel": "all.csv"}, r"sites\.north\.tabel: unknown key"),
    ({"columns.features.nyha": {"type": "categorical"}}, r"columns\.features\.nyha: .*needs `levels"),
    ({"sites.north.lacks": ["weight"]}, r"sites\.north\.lacks: \['weight'\] are not features"),
    ({"columns.site": None}, r"sites\.\w+\.site_value needs `columns\.site`"),
    ({"subgroups": {"age": "female"}}, r"subgroups\.age: 'female' must be a numeric feature"),
])
def test_bad_dataset_yaml_names_the_file_and_key(tmp_path, change, message):
    path = _write_dataset(tmp_path, **change)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(path)
    assert "toy.yaml" in str(error.value)


def test_site_count_is_bounded(tmp_path):
    path = _write_dataset(tmp_path, sites={"north": {"table": "all.csv", "site_value": "NORTH"}})
    with pytest.raises(DatasetError, match="2 to 10 sites, got 1"):
        load_dataset(path)


def test_bad_dataset_in_a_profile_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match=r"--data: data: .*no such dataset file"):
        load_params(PARAMS_DIR / "smoke.yaml", tmp_path / "absent.yaml")


# ---------------------------------------------------------------- validating the data
def _broken(tmp_path, site: str, column: str, values) -> str:
    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, n) for s, n in zip(SITES, (80, 120, 30))}
    tables[site][column] = values
    return _write_dataset(tmp_path, tables)


@pytest.mark.parametrize(("site", "column", "values", "message"), [
    ("south", "dead30", ["Y", "N", "maybe"] * 40, r"column 'dead30' at site 'south': the outcome has 3 distinct"),
    ("east", "bnp", ["12", "n/a?"] * 15, r"column 'bnp' at site 'east': 15 value\(s\) cannot be parsed as numbers, "
                                         r"e\.g\. \['n/a\?'\]"),
    ("north", "gender", ["F", "M", "X"] * 26 + ["F", "M"], r"column 'gender' at site 'north' is declared binary but "
                                                           r"has 3 distinct"),
    ("north", "nyha", ["I", "V"] * 40, r"column 'nyha' at site 'north' has value\(s\) \['V'\] not among the declared"),
])
def test_bad_values_name_file_column_and_site(tmp_path, site, column, values, message):
    path = _broken(tmp_path, site, column, values)
    with pytest.raises(DatasetError, match=message) as error:
        _build(tmp_path, path)
    assert "all.csv" in str(error.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("cohort.parquet"))


def test_missing_column_is_named_with_the_way_out(tmp_path):
    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, n).drop(columns="bnp") for s, n in zip(SITES, (80, 120, 30))}
    path = _write_dataset(tmp_path, tables)
    with pytest.raises(DatasetError, match=r"all\.csv: site '(\w+)' has no column\(s\) \['bnp'\].*sites\.\1\.lacks"):
        _build(tmp_path, path)


def test_unknown_site_value_and_single_class_federation_are_errors(tmp_path):
    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, 40) for s in SITES}
    tables["west"] = _hospital_table(rng, "west", 10)
    with pytest.raises(DatasetError, match=r"column 'hosp' has value\(s\) \['west'\] that match no site"):
        _build(tmp_path, _write_dataset(tmp_path, tables))
    tables = {s: _hospital_table(rng, s, 40).assign(dead30="N") for s in SITES}
    with pytest.raises(DatasetError, match="every patient at every site has readmitted_30d=0"):
        _build(tmp_path, _write_dataset(tmp_path, tables))


# ---------------------------------------------------------------- the cohorts
def test_cohorts_deduplicate_patients_and_never_keep_the_identifier(tmp_path):
    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, n) for s, n in zip(SITES, (80, 120, 30))}
    tables["north"] = pd.concat([tables["north"], tables["north"].iloc[:4]], ignore_index=True)
    results, schema = _build(tmp_path, _write_dataset(tmp_path, tables))
    assert results["north"].attrition["rows"] == 84
    assert results["north"].attrition["excluded_duplicate_patient"] == 4
    assert len(results["north"].cohort) == 80
    for site in SITES:
        table = pq.read_table(site_dir(tmp_path / "out", site) / "cohort.parquet")
        assert "mrn" not in table.column_names and "hosp" not in table.column_names
        assert not any(f"{site}-1" in str(v) for column in table.columns for v in column.to_pylist())
    # Categorical levels become 0/1 columns (reference level I dropped); sex from the positive value.
    assert schema.features == ("age", "female", "bnp", "nyha_II", "nyha_III", "nyha_IV")
    assert schema.log_features == ("bnp",)
    north = load_site(site_dir(tmp_path / "out", "north"), "all")
    expected_female = (tables["north"].iloc[:80]["gender"] == "F").to_numpy(float)
    np.testing.assert_array_equal(north.features["female"].to_numpy(), expected_female)
    assert set(north.sex) == {"women", "men"}


def test_a_site_lacking_a_feature_gets_the_federated_mean_and_an_indicator(tmp_path):
    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, n) for s, n in zip(SITES, (80, 120, 30))}
    tables["east"]["bnp"] = np.nan
    spec_yaml = _write_dataset(tmp_path, tables)
    text = yaml.safe_load(open(spec_yaml))
    text["sites"]["east"]["lacks"] = ["bnp"]
    open(spec_yaml, "w").write(yaml.safe_dump(text, sort_keys=False))
    results, schema = _build(tmp_path, spec_yaml)
    assert "bnp" in schema.indicator_features
    train = {s: load_site(site_dir(tmp_path / "out", s), "train") for s in SITES}
    stats = FeatureStatistics.of_sites([t.features for t in train.values()], schema)
    spec = PreprocessingSpec.from_statistics(stats, schema)
    observed = np.log(pd.concat([train["north"].features["bnp"], train["south"].features["bnp"]]))
    assert spec.mean[schema.features.index("bnp")] == pytest.approx(observed.mean())
    x = spec.transform(train["east"].features)
    assert np.all(x[:, schema.features.index("bnp")] == 0.0)  # imputed at the federated mean
    assert np.all(x[:, spec.output_names.index("bnp_missing")] == 1.0)
    # East's own statistics have no bnp: its local model gets a constant input, not an error.
    with pytest.raises(ValueError, match=r"no observed values for feature\(s\) \['bnp'\]"):
        PreprocessingSpec.from_statistics(FeatureStatistics.of(train["east"].features, schema), schema)
    local = PreprocessingSpec.from_statistics(FeatureStatistics.of(train["east"].features, schema), schema,
                                              unobserved="constant")
    assert np.isfinite(local.transform(train["east"].features)).all()


def test_single_class_site_trains_in_the_federation_but_has_no_local_model(tmp_path):
    from fl.baselines import stage
    from fl.flower.engine import run_direct

    rng = np.random.default_rng(3)
    tables = {s: _hospital_table(rng, s, n) for s, n in zip(SITES, (80, 120, 25))}
    tables["east"]["dead30"] = "N"
    data = _write_dataset(tmp_path, tables)
    build = tmp_path / "out"
    results, _ = _build(tmp_path, data)
    assert results["east"].outcome_classes == 1
    smoke = load_params(PARAMS_DIR / "smoke.yaml", data)
    profile = smoke.model_copy(update={
        "baselines": smoke.baselines.model_copy(update={"epochs": 20, "bootstrap_resamples": 50}),
        "federated": smoke.federated.model_copy(update={"rounds": 2, "local_epochs": 1})})
    stage2 = stage.run(profile, build)
    assert "local_east" not in stage2.fitted
    assert "every training patient at east has the same outcome" in stage2.not_fitted["local_east"]
    summary = stage.summary(profile, stage2)
    assert "oracle" not in summary["auroc"] and "lace" not in summary["auroc"]
    assert summary["not_estimable"]["local_east"]["north"].startswith("not estimable")
    assert "same outcome" in summary["not_estimable"]["pooled"]["east"]  # east's test split: one class
    assert summary["auroc"]["pooled"]["north"]["value"] > 0
    assert "not estimable" in stage.auroc_table(stage2).loc["local_east", "north"]
    federated = run_direct(profile, "fedavg", [site_dir(build, s) for s in SITES], tmp_path / "fed")
    assert set(federated.site_rows) == set(SITES) and federated.site_rows["east"] > 0
    ledger = [json.loads(line) for line in (tmp_path / "fed" / "ledger.jsonl").read_text().splitlines()]
    assert {line["site"] for line in ledger if line["round"] == 2} == set(SITES)


def test_make_runs_the_data_card_on_provided_data_in_its_own_build_folder(tmp_path):
    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "-n", *args, f"BUILD_ROOT={tmp_path}"], cwd=REPO,
                              capture_output=True, text=True)

    planned = make("all", "PROFILE=smoke", "DATA=examples/byod/four-sites.yaml")
    assert planned.returncode == 0, planned.stderr
    runs = [line for line in planned.stdout.splitlines() if "-m compendium run" in line]
    assert [line.split()[4] for line in runs] == ["01_data_card", "02_local_baselines", "03_federated_training",
                                                  "04_privacy_evaluation", "05_report"]
    assert all(line.endswith("--data examples/byod/four-sites.yaml") for line in runs)
    assert f"{tmp_path}/smoke-four-sites/site/index.html" in planned.stdout
    missing = make("all", "PROFILE=smoke", "DATA=examples/byod/absent.yaml")
    assert missing.returncode != 0 and "DATA=examples/byod/absent.yaml: no such dataset YAML" in missing.stderr
    assert "01_synthetic_ehr" in make("stage1", "PROFILE=smoke").stdout


def test_cli_reports_a_bad_dataset_and_exits_non_zero(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: Bad Name\nsites: {}\n")
    result = subprocess.run([sys.executable, "-m", "compendium", "run", "01_data_card", "--profile", "smoke",
                             "--data", str(tmp_path / "bad.yaml"), "--build-root", str(tmp_path / "build")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "bad.yaml: name: String should match pattern" in result.stderr
    assert "sites: a federation here has 2 to 10 sites, got 0" in result.stderr
    assert not (tmp_path / "build").exists()


def test_omop_sites_go_through_the_cohort_builder_without_identifiers(tmp_path):
    from data_synth.generator import generate_site
    from data_synth.sites import site_profile
    from fl.data import SYNTHETIC_SCHEMA

    for site in ("halland", "sahlgrenska"):
        generate_site(site_profile(site, {"patients": 300}), 11, tmp_path / "extracts" / site, progress=False)
    spec = {"name": "omop-pair", "sites": {s: {"omop": f"extracts/{s}/omop"} for s in ("halland", "sahlgrenska")}}
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(spec))
    results, schema = _build(tmp_path, str(tmp_path / "pair.yaml"))
    assert schema == SYNTHETIC_SCHEMA
    for site in ("halland", "sahlgrenska"):
        columns = pq.read_table(site_dir(tmp_path / "out", site) / "cohort.parquet").column_names
        assert not set(provided.OMOP_IDENTIFIERS) & set(columns)
        data = load_site(site_dir(tmp_path / "out", site), "test")
        assert len(data) == (results[site].cohort["split"] == "test").sum() > 0
    spec["columns"] = {"outcome": {"column": "x", "positive": 1}, "features": {"a": {"type": "numeric"}}}
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DatasetError, match="OMOP sites use the cohort builder's variables; remove `columns:`"):
        load_dataset(tmp_path / "pair.yaml")


def test_table_one_hides_a_categorical_reference_level_recoverable_by_subtraction():
    from data_synth.features import Feature
    from data_synth.datacard import table_one

    # 40 patients: 3 in the reference level (I), 20 in II, 17 in III; I = 40 - 20 - 17 would leak.
    site = pd.DataFrame({"nyha_II": [1.0] * 20 + [0.0] * 20, "nyha_III": [0.0] * 20 + [1.0] * 17 + [0.0] * 3,
                         "readmitted_30d": [0, 1] * 20})
    other = pd.DataFrame({"nyha_II": [1.0] * 20 + [0.0] * 20, "nyha_III": [0.0] * 20 + [1.0] * 10 + [0.0] * 10,
                          "readmitted_30d": [0, 1] * 20})
    features = [Feature("nyha_II", "binary", "", ""), Feature("nyha_III", "binary", "", "")]
    table = table_one({"a": site, "b": other}, features, {"nyha": ["nyha_II", "nyha_III"]})
    assert table.loc["nyha_II, n (%)", "a"] == "<5" and table.loc["nyha_III, n (%)", "a"] == "<5"
    assert table.loc["nyha_II, n (%)", "b"] == "20 (50.0%)" and table.loc["nyha_III, n (%)", "b"] == "10 (25.0%)"
    assert table_one({"a": site}, features).loc["nyha_III, n (%)", "a"] == "17 (42.5%)"  # without groups: shown
