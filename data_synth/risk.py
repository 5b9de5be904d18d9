"""The ground-truth 30-day readmission risk the generator draws labels from.

Directions and rough strengths follow the published predictors listed in
docs/calibration.md "Readmission risk" (strongest first):
prior admissions, emergency visits, length of stay, comorbidity burden, renal
dysfunction, COPD, psychiatric illness, NT-proBNP, low haemoglobin, low
sodium, age (weak), female sex (weak, protective), higher systolic pressure
(protective), recommended drugs (protective). Mild non-linear terms (a
potassium U-shape, a threshold on eGFR, saturating counts) and an interaction
(frailty with prior admissions) keep linear models honest. A latent frailty
shows in the record only through its proxies, and an unrecorded risk (social
circumstances, adherence) not at all, which keeps the oracle above every
fitted model; neither carries most of the signal (docs/calibration.md
"Readmission risk"). Death within 30 days competes with readmission (see the
generator's EARLY_DEATH).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_synth.sites import RISK_TERMS

#: Log-odds of readmission for a reference patient before the site shift,
#: chosen so the pooled base rate lands near 19% (docs/calibration.md
#: "Readmission": 18-20%) after deaths compete.
BASELINE_LOGIT = -2.15


@dataclass(frozen=True)
class PatientState:
    """True (not necessarily recorded) state of each patient at index discharge."""

    age: np.ndarray
    female: np.ndarray
    frailty: np.ndarray
    prior_admissions_365d: np.ndarray
    prior_hf_hospitalisation: np.ndarray
    ed_visits_180d: np.ndarray
    los_days: np.ndarray
    comorbidity: dict[str, np.ndarray]
    ef_reduced: np.ndarray
    nt_probnp: np.ndarray
    egfr: np.ndarray
    sodium: np.ndarray
    potassium: np.ndarray
    haemoglobin: np.ndarray
    systolic_bp: np.ndarray
    on_ras_or_arni: np.ndarray
    on_beta_blocker: np.ndarray
    on_mra: np.ndarray
    # Social circumstances, adherence, follow-up care: drives readmission but
    # appears in no record, so no fitted model can reach the oracle.
    unrecorded_risk: np.ndarray


def risk_terms(state: PatientState) -> dict[str, np.ndarray]:
    """Return each named term of the true log-odds of readmission (coefficient included), before any site's scaling.

    A site's `risk_effect_scale` multiplies terms by name (concept shift: a
    predictor that works differently at one hospital), so the names are part
    of the site configuration's vocabulary (RISK_TERMS).
    """
    comorbidity = state.comorbidity
    comorbidity_burden = sum(comorbidity[name].astype(float) for name in comorbidity)
    return {
        "prior_admissions": 0.50 * np.log1p(state.prior_admissions_365d),
        "prior_hf_hospitalisation": 0.30 * state.prior_hf_hospitalisation,
        "ed_visits": 0.10 * np.log1p(state.ed_visits_180d),
        "length_of_stay": 0.08 * np.log(np.clip(state.los_days, 1, None) / 5.0),
        "comorbidity_burden": 0.04 * comorbidity_burden,
        "renal_function": 0.40 * (state.egfr < 30) + 0.10 * (state.egfr < 45),
        "copd": 0.25 * comorbidity["copd"],
        "psychiatric": 0.20 * comorbidity["psychiatric"],
        "diabetes": 0.15 * comorbidity["diabetes"],
        "cancer": 0.10 * comorbidity["cancer"],
        "nt_probnp": 0.25 * (np.log(state.nt_probnp) - np.log(3500.0)),
        "anaemia": 0.010 * np.clip(125.0 - state.haemoglobin, 0, None),
        "hyponatraemia": 0.05 * np.clip(136.0 - state.sodium, 0, None),
        "potassium": 0.25 * (state.potassium - 4.2) ** 2,
        "age": 0.005 * (state.age - 78.0) + 0.15 * (state.age >= 90),
        "female": -0.10 * state.female,
        "systolic_bp": -0.004 * (state.systolic_bp - 125.0),
        "guideline_drugs": -0.25 * (state.on_ras_or_arni & state.on_beta_blocker),
        "reduced_ef": 0.10 * state.ef_reduced,
        "frailty": 0.30 * state.frailty,
        "unrecorded_risk": 0.45 * state.unrecorded_risk,
        "frailty_with_prior_admissions": 0.08 * state.frailty * np.log1p(state.prior_admissions_365d),
    }


def readmission_logit(state: PatientState, site_shift: float | np.ndarray,
                      effect_scale: dict[str, float] | None = None) -> np.ndarray:
    """Return each patient's true log-odds of unplanned readmission within 30 days.

    `site_shift` moves every patient's log-odds (the site's base rate, and
    per patient any site effect such as follow-up care); `effect_scale`
    multiplies named terms (RISK_TERMS) at this site.
    """
    scale = effect_scale or {}
    unknown = sorted(set(scale) - set(RISK_TERMS))
    if unknown:
        raise ValueError(f"risk_effect_scale: unknown risk terms {unknown}; known: {list(RISK_TERMS)}")
    terms = risk_terms(state)
    return BASELINE_LOGIT + site_shift + sum(scale.get(name, 1.0) * terms[name] for name in RISK_TERMS)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Return the logistic function of x."""
    return 1.0 / (1.0 + np.exp(-x))


def egfr_ckd_epi_2021(creatinine_umol_l: np.ndarray, age: np.ndarray, female: np.ndarray) -> np.ndarray:
    """Return eGFR (mL/min/1.73 m2) by the race-free CKD-EPI 2021 creatinine equation.

    Inker et al. 2021 (docs/calibration.md "Laboratory values").
    """
    scr = np.asarray(creatinine_umol_l, dtype=float) / 88.4  # to mg/dL
    female = np.asarray(female, dtype=bool)
    kappa = np.where(female, 0.7, 0.9)
    alpha = np.where(female, -0.241, -0.302)
    ratio = scr / kappa
    egfr = (
        142.0
        * np.minimum(ratio, 1.0) ** alpha
        * np.maximum(ratio, 1.0) ** -1.200
        * 0.9938 ** np.asarray(age, dtype=float)
        * np.where(female, 1.012, 1.0)
    )
    return egfr
