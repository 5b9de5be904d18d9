"""Each site-difference knob moves the statistic it claims, and the transport gap sees the differences."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_synth import heterogeneity
from data_synth.cohort import COHORT_FILE, CohortSpec
from data_synth.features import LABEL
from data_synth.risk import PatientState, risk_terms
from data_synth.sites import DEFAULT_SITES, RISK_TERMS, site_profile
from synthetic_sites import build_sites

PATIENTS = 5000
SEED = 17


def _cohort(tmp_path_factory, overrides: dict, site: str = "halland") -> pd.DataFrame:
    """Return one site's cohort with `overrides` on top of the default profile; every knob not named is neutral."""
    neutral = {"record_coverage": 1.0, "follow_up_clinic": 0.0, "lab_calibration": {}, "risk_effect_scale": {},
               "elective_admissions_365d": 0.0, "calendar_logit_shift": {}}
    root = tmp_path_factory.mktemp("knob")
    profile = site_profile(site, {"patients": PATIENTS, **neutral, **overrides})
    from data_synth.cohort import write_cohort
    from data_synth.generator import generate_site

    generate_site(profile, SEED, root, progress=False)
    write_cohort(root / "omop", root, CohortSpec(seed=SEED), site, progress=False)
    return pd.read_parquet(root / COHORT_FILE)


@pytest.fixture(scope="module")
def neutral(tmp_path_factory) -> pd.DataFrame:
    return _cohort(tmp_path_factory, {})


def test_record_coverage_hides_admissions_at_other_hospitals(tmp_path_factory, neutral):
    partial = _cohort(tmp_path_factory, {"record_coverage": 0.6})
    assert len(partial) == pytest.approx(len(neutral), rel=0.02)  # the index stays are the site's own
    assert partial[LABEL].mean() / neutral[LABEL].mean() == pytest.approx(0.6, abs=0.1)
    assert partial["prior_admissions_365d"].mean() / neutral["prior_admissions_365d"].mean() == pytest.approx(0.6, abs=0.08)


def test_a_nurse_led_clinic_lowers_readmission(tmp_path_factory, neutral):
    followed = _cohort(tmp_path_factory, {"follow_up_clinic": 1.0})
    assert 0.72 < followed[LABEL].mean() / neutral[LABEL].mean() < 0.92  # odds ratio 0.8 at about 20%


def test_assay_calibration_scales_the_recorded_value(tmp_path_factory, neutral):
    biased = _cohort(tmp_path_factory, {"lab_calibration": {"creatinine": 1.2}})
    assert biased["creatinine"].median() / neutral["creatinine"].median() == pytest.approx(1.2, abs=0.02)
    assert biased["egfr"].median() < 0.9 * neutral["egfr"].median()  # eGFR is computed from the recorded value
    assert biased["sodium"].median() == neutral["sodium"].median()


def test_elective_referral_stays_count_as_prior_admissions_without_risk(tmp_path_factory, neutral):
    referred = _cohort(tmp_path_factory, {"elective_admissions_365d": 1.0})
    assert referred["prior_admissions_365d"].mean() - neutral["prior_admissions_365d"].mean() == pytest.approx(1.0, abs=0.1)
    assert abs(referred[LABEL].mean() - neutral[LABEL].mean()) < 0.02

    def relative_risk(cohort):  # readmission with any prior admission over without
        prior = cohort["prior_admissions_365d"] > 0
        return cohort.loc[prior, LABEL].mean() / cohort.loc[~prior, LABEL].mean()

    assert relative_risk(referred) < relative_risk(neutral) - 0.2  # the feature means less at a referral centre


def test_the_outcome_mechanism_knob_changes_how_a_predictor_relates_to_readmission(tmp_path_factory, neutral):
    no_effect = _cohort(tmp_path_factory, {"risk_effect_scale": {"prior_admissions": 0.0,
                                                                 "frailty_with_prior_admissions": 0.0}})

    def excess(cohort):
        prior = cohort["prior_admissions_365d"] > 0
        return cohort.loc[prior, LABEL].mean() - cohort.loc[~prior, LABEL].mean()

    assert excess(no_effect) < excess(neutral) - 0.04  # what remains comes through frailty


def test_calendar_shift_lowers_one_years_readmissions(tmp_path_factory, neutral):
    shifted = _cohort(tmp_path_factory, {"calendar_logit_shift": {2019: -1.5}})
    year = pd.to_datetime(shifted["index_discharge_date"]).dt.year
    neutral_year = pd.to_datetime(neutral["index_discharge_date"]).dt.year
    assert shifted.loc[year == 2019, LABEL].mean() < 0.5 * neutral.loc[neutral_year == 2019, LABEL].mean()
    assert shifted.loc[year == 2017, LABEL].mean() == pytest.approx(neutral.loc[neutral_year == 2017, LABEL].mean(),
                                                                   abs=0.03)


def test_unknown_knob_keys_are_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="risk_effect_scale: unknown keys \\['colour'\\]"):
        site_profile("halland", {"risk_effect_scale": {"colour": 1.0}})
    with pytest.raises(ValueError, match="lab_calibration: unknown keys"):
        site_profile("halland", {"lab_calibration": {"troponin": 1.1}})
    with pytest.raises(ValueError, match="record_coverage"):
        site_profile("halland", {"record_coverage": 0.0})


def test_risk_terms_are_the_names_a_site_may_scale():
    n = 4
    state = PatientState(
        age=np.full(n, 80.0), female=np.zeros(n, bool), frailty=np.zeros(n), prior_admissions_365d=np.ones(n),
        prior_hf_hospitalisation=np.zeros(n, bool), ed_visits_180d=np.zeros(n), los_days=np.full(n, 5),
        comorbidity={"copd": np.zeros(n), "psychiatric": np.zeros(n), "diabetes": np.zeros(n), "cancer": np.zeros(n)},
        ef_reduced=np.zeros(n, bool), nt_probnp=np.full(n, 3500.0), egfr=np.full(n, 60.0), sodium=np.full(n, 140.0),
        potassium=np.full(n, 4.2), haemoglobin=np.full(n, 130.0), systolic_bp=np.full(n, 125.0),
        on_ras_or_arni=np.ones(n, bool), on_beta_blocker=np.ones(n, bool), on_mra=np.zeros(n, bool),
        unrecorded_risk=np.zeros(n))
    assert tuple(risk_terms(state)) == RISK_TERMS


@pytest.fixture(scope="module")
def attribution() -> pd.DataFrame:
    return heterogeneity.knob_attribution(dict(DEFAULT_SITES), 3000, SEED)


def test_knob_attribution_has_every_group_alone_and_a_shared_baseline(attribution):
    expected = ["no difference", *[f"{group} only" for group in heterogeneity.KNOB_GROUPS], "all differences"]
    assert list(dict.fromkeys(attribution["scenario"])) == expected
    assert (attribution["model from"] != attribution["test site"]).all() and len(attribution) == 2 * len(expected)
    # A group that does not differ between the default sites regenerates the shared baseline exactly.
    baseline = attribution[attribution["scenario"] == "no difference"].drop(columns="scenario").reset_index(drop=True)
    settings = heterogeneity.knob_settings(dict(DEFAULT_SITES))
    for group in heterogeneity.KNOB_GROUPS:
        rows = attribution[attribution["scenario"] == f"{group} only"].drop(columns="scenario").reset_index(drop=True)
        if not settings.loc[group, "differs"].any():
            pd.testing.assert_frame_equal(rows, baseline)


def test_the_transport_gap_sees_a_planted_difference(tmp_path):
    """Planted fault: the second site's risk works differently (measured: AUROC lost 0.04, slope 0.35, against
    0.00 and 0.82 with no difference)."""
    same = {site: site_profile(site, {"patients": 10000}) for site in DEFAULT_SITES}
    same = heterogeneity.shared(same, list(heterogeneity.KNOB_GROUPS))
    planted = dict(same)
    planted["sahlgrenska"] = same["sahlgrenska"].model_copy(update={
        # Halland's strongest recorded predictors carry no risk there; others carry more.
        "risk_effect_scale": {"prior_admissions": 0.0, "frailty_with_prior_admissions": 0.0, "nt_probnp": 0.0,
                              "renal_function": 0.0, "frailty": 0.0, "copd": 0.0, "age": 3.0, "guideline_drugs": 3.0,
                              "female": 3.0},
        "readmission_logit_shift": 1.0})
    spec = CohortSpec(seed=SEED)
    gap = {name: heterogeneity.transport_gap(heterogeneity.cohorts_of(profiles, SEED, spec, tmp_path / name))
           for name, profiles in (("same", same), ("planted", planted))}

    def moved(table):
        return table[(table["model from"] == "halland") & (table["test site"] == "sahlgrenska")].iloc[0]

    assert abs(moved(gap["same"])["AUROC lost"]) < 0.03 and abs(moved(gap["same"])["observed/expected"] - 1) < 0.15
    assert moved(gap["planted"])["AUROC lost"] > 0.03
    assert moved(gap["planted"])["calibration slope"] < 0.6  # risks spread wrongly at the other hospital
    assert moved(gap["same"])["calibration slope"] > 0.7
