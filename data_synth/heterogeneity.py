"""How the synthetic hospitals differ, and how much each difference costs a model moved between them.

A model developed at one hospital and used at another loses discrimination
and, more often, calibration (docs/calibration.md "Site differences"). Here
that transport gap is measured on the synthetic sites: a logistic
regression fitted on one site's training split is scored on the other
site's test split, next to that site's own model. The site differences are
grouped (KNOB_GROUPS); `knob_attribution` regenerates the sites with every
group shared (both sites take the first site's values) and then with one
group at a time as configured, so each group's own gap shows.

Everything here is an aggregate of whole test splits (AUROC, observed over
expected, calibration slope): nothing record-level leaves this module.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from data_synth.cohort import COHORT_FILE, CohortSpec, write_cohort
from data_synth.features import FEATURE_NAMES, LABEL, SPLIT
from data_synth.generator import generate_site
from data_synth.sites import SiteProfile

#: The site differences, grouped as a reader thinks of them: each group is the SiteProfile fields that
#: make it up (docs/calibration.md "Site differences" gives each default and its anchor).
KNOB_GROUPS: dict[str, tuple[str, ...]] = {
    "case mix": ("age_median", "age_sd", "female_fraction", "comorbidity_prevalence", "ef_class_probs"),
    "recording and coding": ("lab_missing", "lab_repeat_before_discharge", "hf_main_diagnosis",
                             "comorbidity_coding_completeness", "hf_code_weights"),
    "assay calibration": ("lab_calibration",),
    "care and prescribing": ("los_median_days", "in_hospital_death", "transfer_out", "against_advice",
                             "planned_readmission", "arni_share"),
    "base rate": ("readmission_logit_shift",),
    "outcome mechanism": ("risk_effect_scale",),
    "follow-up clinic": ("follow_up_clinic",),
    "record coverage": ("record_coverage",),
    "elective referrals": ("elective_admissions_365d",),
    "calendar": ("calendar_logit_shift",),
}


#: Neutral value of a key missing from one site's table, and the range every value must stay in, for
#: the dict- and list-valued knobs (scalar knobs take their range from SiteProfile's own constraints).
TABLE_KNOBS: dict[str, tuple[float, float, float]] = {  # field: (missing value, lowest, highest)
    "comorbidity_prevalence": (0.0, 0.0, 1.0), "lab_missing": (0.0, 0.0, 1.0), "hf_code_weights": (0.0, 0.0, 1e9),
    "risk_effect_scale": (1.0, 0.0, 3.0), "lab_calibration": (1.0, 0.5, 2.0), "calendar_logit_shift": (0.0, -3.0, 3.0),
    "ef_class_probs": (0.0, 0.0, 1.0),
}


def _scalar_bounds(field: str) -> tuple[float, float]:
    low, high = -np.inf, np.inf
    for rule in SiteProfile.model_fields[field].metadata:
        low = max(low, getattr(rule, "ge", None) if getattr(rule, "ge", None) is not None else low)
        low = max(low, rule.gt + 1e-9) if getattr(rule, "gt", None) is not None else low
        high = min(high, getattr(rule, "le", None) if getattr(rule, "le", None) is not None else high)
        high = min(high, rule.lt - 1e-9) if getattr(rule, "lt", None) is not None else high
    return low, high


def partner_at(reference: SiteProfile, partner: SiteProfile, level: float) -> SiteProfile:
    """Return `partner` with each of its differences from `reference` scaled by `level`.

    Every knob of KNOB_GROUPS moves along the line from the reference site's
    value (level 0: the partner is the reference hospital in every respect
    but its size and seed) through the partner's configured value (level 1)
    and beyond (level 2: every difference doubled), clipped to the knob's
    valid range; probability vectors are renormalised. The partner's size
    is kept.
    """
    update = {}
    for field in (f for group in KNOB_GROUPS.values() for f in group):
        a, b = getattr(reference, field), getattr(partner, field)
        if isinstance(a, dict):
            missing, low, high = TABLE_KNOBS[field]
            moved = {key: round(float(np.clip(a.get(key, missing) + level * (b.get(key, missing) - a.get(key, missing)),
                                              low, high)), 12) for key in sorted(set(a) | set(b), key=str)}
            update[field] = {key: value for key, value in moved.items() if key in b or value != missing}
        elif isinstance(a, list):
            _, low, high = TABLE_KNOBS[field]
            values = np.clip(np.asarray(a) + level * (np.asarray(b) - np.asarray(a)), low, high)
            update[field] = [round(float(v), 12) for v in values / values.sum()]
        else:
            low, high = _scalar_bounds(field)
            update[field] = round(float(np.clip(a + level * (b - a), low, high)), 12)
    return SiteProfile.model_validate({**partner.model_dump(), **update})


def fitted_model(cohort: pd.DataFrame) -> Pipeline:
    """Return a logistic regression (median imputation with missing indicators, standardised) fitted on
    the cohort's training split: the same kind of model stage 2 fits, in sklearn so stage 1 stays below fl."""
    train = cohort[cohort[SPLIT] == "train"]
    model = make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler(),
                          LogisticRegression(max_iter=2000))
    return model.fit(train[list(FEATURE_NAMES)].astype(float), train[LABEL].to_numpy())


def calibration(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Return observed over expected events and the calibration slope (of the outcome on the logit)."""
    logit = np.log(probabilities / (1 - probabilities))
    slope = LogisticRegression(C=1e6, max_iter=1000).fit(logit[:, None], labels).coef_[0, 0]
    return float(labels.mean() / probabilities.mean()), float(slope)


def transport_gap(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return, per pair of sites (model from, test site), AUROC, observed/expected and calibration slope on
    the test site's test split, and the AUROC lost against the test site's own model."""
    models = {site: fitted_model(cohort) for site, cohort in cohorts.items()}
    rows = []
    for test_site, cohort in cohorts.items():
        test = cohort[cohort[SPLIT] == "test"]
        features, labels = test[list(FEATURE_NAMES)].astype(float), test[LABEL].to_numpy()
        scores = {site: model.predict_proba(features)[:, 1] for site, model in models.items()}
        own = roc_auc_score(labels, scores[test_site])
        for model_site, probabilities in scores.items():
            auroc = roc_auc_score(labels, probabilities)
            observed_over_expected, slope = calibration(labels, probabilities)
            rows.append({"model from": model_site, "test site": test_site, "AUROC": round(auroc, 4),
                         "AUROC lost": round(own - auroc, 4), "observed/expected": round(observed_over_expected, 3),
                         "calibration slope": round(slope, 3), "test stays": int(len(test))})
    return pd.DataFrame(rows)


def shared(profiles: dict[str, SiteProfile], groups: Sequence[str]) -> dict[str, SiteProfile]:
    """Return the profiles with every field of `groups` taken from the first site (those differences removed)."""
    fields = [field for group in groups for field in KNOB_GROUPS[group]]
    reference = next(iter(profiles.values()))
    return {site: profile.model_copy(update={field: getattr(reference, field) for field in fields})
            for site, profile in profiles.items()}


def cohorts_of(profiles: dict[str, SiteProfile], seed: int, spec: CohortSpec, work: Path) -> dict[str, pd.DataFrame]:
    """Return each site's cohort, generated and built under `work` (a scratch folder)."""
    cohorts = {}
    for site, profile in profiles.items():
        folder = Path(work) / site
        generate_site(profile, seed, folder, progress=False)
        write_cohort(folder / "omop", folder, spec, site, progress=False)
        cohorts[site] = pd.read_parquet(folder / COHORT_FILE)
    return cohorts


def knob_attribution(profiles: dict[str, SiteProfile], patients: int, seed: int,
                     spec: CohortSpec | None = None) -> pd.DataFrame:
    """Return the transport gap with no difference between the sites, with each knob group alone as
    configured, and with all of them: both directions, every site `patients` strong (size is not a knob here).

    Rows are (scenario, model from, test site) with transport_gap's columns; only transported models
    (model from another site) are kept.
    """
    spec = spec or CohortSpec(seed=seed)
    sized = {site: profile.model_copy(update={"patients": patients}) for site, profile in profiles.items()}
    scenarios = {"no difference": shared(sized, list(KNOB_GROUPS))}
    for group in KNOB_GROUPS:
        scenarios[f"{group} only"] = shared(sized, [other for other in KNOB_GROUPS if other != group])
    scenarios["all differences"] = sized
    frames = []
    with tempfile.TemporaryDirectory(prefix="knobs-") as work:
        for index, (scenario, scenario_profiles) in enumerate(scenarios.items()):
            gaps = transport_gap(cohorts_of(scenario_profiles, seed, spec, Path(work) / str(index)))
            frames.append(gaps[gaps["model from"] != gaps["test site"]].assign(scenario=scenario))
    table = pd.concat(frames, ignore_index=True)
    return table[["scenario", *[column for column in table.columns if column != "scenario"]]]


#: Published figures the transport gap is read against (docs/calibration.md "Site differences").
PUBLISHED_TRANSPORT = pd.DataFrame([
    {"what": "AUROC change at external validation, median over 109 models", "published": "-0.05", "source": "S30"},
    {"what": "AUROC between settings, standard deviation", "published": "0.055 (about +-0.1 for a new setting)",
     "source": "S30"},
    {"what": "heart-failure 30-day readmissions at another hospital", "published": "16.8% (Canada, 2004-2013)",
     "source": "S29"},
    {"what": "30-day readmission models: external validations", "published": "discrimination and, more often, "
     "calibration decline, even on a common data model", "source": "S30"},
]).set_index("what")


def knob_settings(profiles: dict[str, SiteProfile]) -> pd.DataFrame:
    """Return each knob group's fields and their value at each site (the site configuration, side by side)."""
    rows = []
    for group, fields in KNOB_GROUPS.items():
        for field in fields:
            values = {site: getattr(profile, field) for site, profile in profiles.items()}
            rows.append({"group": group, "setting": field,
                         **{site: _short(value) for site, value in values.items()},
                         "differs": len({repr(value) for value in values.values()}) > 1})
    return pd.DataFrame(rows).set_index(["group", "setting"])


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_short(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return "/".join(_short(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_knob_attribution(table: pd.DataFrame):
    """Return a two-panel figure: AUROC lost and observed/expected of the transported model, per scenario."""
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(table["scenario"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.36 * len(scenarios) + 1.4), sharey=True)
    positions = np.arange(len(scenarios))
    for offset, (test_site, rows) in zip((-0.18, 0.18), table.groupby("test site", sort=False)):
        rows = rows.set_index("scenario").loc[scenarios]
        label = f"{rows['model from'].iloc[0]}'s model at {test_site}"
        axes[0].barh(positions + offset, rows["AUROC lost"], height=0.34, label=label)
        axes[1].barh(positions + offset, rows["observed/expected"] - 1, height=0.34, label=label)
    axes[0].set_yticks(positions, scenarios)
    axes[0].invert_yaxis()
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].axvline(0.05, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("AUROC lost against the site's own model\n(dashed: published median, 0.05)")
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("observed / expected readmissions - 1\n(0: calibrated in the large)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=9, loc="upper center", ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
