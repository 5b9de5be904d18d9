"""The default profile stays clinically plausible: every data-card plausibility check holds within its tolerance."""
from __future__ import annotations

import pandas as pd
import pytest

from data_synth.cohort import COHORT_FILE
from data_synth.datacard import PLAUSIBILITY_CHECKS, clinical_plausibility
from data_synth.sites import SITE_NAMES
from tests.synthetic_sites import build_sites

#: A reduced default profile: the default sites' settings, fewer patients
#: (enough that a percentage is within a few points of the full site's).
PATIENTS_PER_SITE = 6_000
SEED = 20220923  # params/default.yaml


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("plausibility")
    folders = build_sites(root, {site: PATIENTS_PER_SITE for site in SITE_NAMES}, SEED)
    return {site: pd.read_parquet(folder / COHORT_FILE) for site, folder in folders.items()}


@pytest.fixture(scope="module")
def plausibility(cohorts) -> pd.DataFrame:
    return clinical_plausibility(cohorts)


@pytest.mark.parametrize("check", [check.what for check in PLAUSIBILITY_CHECKS])
def test_default_profile_is_within_tolerance(plausibility, check):
    row = plausibility.loc[check]
    values = {column: row[column] for column in plausibility.columns if column.startswith("synthetic ")}
    assert row["within tolerance"], (
        f"{check}: {values} outside {row['tolerance']} (published {row['published']}, {row['source']}); "
        "a change to data_synth moved the default profile away from its anchor"
    )


def test_every_check_cites_a_listed_source():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "calibration.md").read_text()
    for check in PLAUSIBILITY_CHECKS:
        assert check.source == "-" or f"| {check.source} |" in doc, f"{check.what}: source {check.source} not in docs"
        assert check.low <= check.high, check.what


#: A fitted logistic model on the default profile should reach AUROC 0.65-0.74 per site, as published
#: 30-day heart-failure readmission models do (docs/calibration.md "Achievable discrimination"). The
#: reduced cohorts here have test splits of about 1,500 stays (standard error near 0.02), so the band is
#: widened below; above, it still fails the generator before issue 18 (0.754 and 0.772 here).
FITTED_AUROC_BAND = (0.62, 0.75)


def test_a_fitted_logistic_model_discriminates_as_published_models_do(cohorts):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from data_synth.features import FEATURE_NAMES, LABEL, SPLIT

    assert set(cohorts) == set(SITE_NAMES)
    for site, cohort in cohorts.items():
        train, test = cohort[cohort[SPLIT] == "train"], cohort[cohort[SPLIT] == "test"]
        model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(train[list(FEATURE_NAMES)].astype(float), train[LABEL])
        auroc = roc_auc_score(test[LABEL], model.predict_proba(test[list(FEATURE_NAMES)].astype(float))[:, 1])
        low, high = FITTED_AUROC_BAND
        assert low <= auroc <= high, f"{site}: fitted logistic AUROC {auroc:.3f} outside {FITTED_AUROC_BAND}"
