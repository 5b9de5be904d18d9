"""The data card: aggregate, disclosure-controlled descriptions of each site's cohort.

Every table here is built from counts and quantiles, never from records,
and every count below 5 (or whose complement is below 5) is suppressed.
Plots draw from these aggregates, not from raw rows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.stats import binomtest

from compendium.disclosure import MIN_CELL, SUPPRESSED, count_cell, count_percent_cell, is_small
from data_synth import vocabulary as vocab
from data_synth.cohort import Attrition
from data_synth.features import FEATURES, LABEL, SCORE_COLUMNS, Feature

ATTRITION_STEPS = {
    "persons": "persons in the OMOP extract",
    "hf_index_stays_in_window": "inpatient stays with heart failure as main diagnosis in the study window",
    "index_stays_considered": "first such stay per patient",
    "excluded_under_18": "excluded: under 18",
    "excluded_died_in_hospital": "excluded: died in hospital",
    "excluded_transfer_out": "excluded: transferred to another hospital",
    "excluded_against_advice": "excluded: left against medical advice",
    "excluded_short_followup": "excluded: under 30 days of follow-up",
    "cohort": "index stays in the cohort",
    "readmitted_30d": "readmitted within 30 days",
}

#: Published anchors for the data card: quantity -> (published value, source).
#: docs/calibration.md gives each source in full and where the generator uses it.
PUBLISHED_ANCHORS: dict[str, tuple[str, str]] = {
    "age, median": ("80 [71-87] national register; 77 [69-84] SwedeHF", "SwedeHF; national patient register"),
    "women, %": ("46.5% national register; 38% SwedeHF", "SwedeHF; national patient register"),
    "length of stay, median days": ("5 [3-9]", "SwedeHF"),
    "30-day readmission, %": ("20.3% (Sahlgrenska/Ostra 2016); 18-20% target", "Wideqvist et al. 2021, ESC Heart Failure"),
    "NT-proBNP, median ng/L": ("3,682 [1,654-8,593] at discharge", "SwedeHF"),
    "eGFR, median": ("about 60 [43-80]", "SwedeHF"),
    "sodium, median mmol/L": ("140 [137-142]", "SwedeHF"),
    "haemoglobin, median g/L": ("119-132", "SwedeHF"),
    "LVEF missing, %": ("43% in Halland", "Davidge et al. 2022, BMJ Open"),
    "diabetes, %": ("23-27%", "national register and SwedeHF"),
    "COPD, %": ("12-14%", "national register"),
    "atrial fibrillation, %": ("45-55%", "national register and SwedeHF"),
    "on beta-blocker at discharge, %": ("85%", "SwedeHF"),
    "on MRA at discharge, %": ("40%", "SwedeHF"),
}


def attrition_table(attrition: dict[str, Attrition | dict], steps: dict[str, str] = ATTRITION_STEPS) -> pd.DataFrame:
    """Return the attrition steps (rows) by site (columns), small counts suppressed."""
    rows = {}
    for site, counts in attrition.items():
        values = counts if isinstance(counts, dict) else asdict(counts)
        rows[site] = [count_cell(values[step]) for step in steps]
    return pd.DataFrame(rows, index=list(steps.values()))


def _median_iqr(values: pd.Series, decimals: int = 0) -> str:
    values = values.dropna()
    if len(values) < MIN_CELL:
        return "n<5"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:,.{decimals}f} [{q1:,.{decimals}f}-{q3:,.{decimals}f}]"


def _narrow(cohorts: dict[str, pd.DataFrame], name: str) -> bool:
    """Return True for a non-integer variable whose interquartile range is under 2 units (shown with a decimal)."""
    values = pd.concat([cohort[name] for cohort in cohorts.values()]).dropna()
    if values.empty or (values % 1 == 0).all():
        return False
    q1, q3 = np.percentile(values, [25, 75])
    return q3 - q1 < 2


def table_one(cohorts: dict[str, pd.DataFrame], features: Sequence[Feature] = FEATURES,
              groups: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Return Table 1: each variable by site, n (%) or median [IQR] and % missing.

    A variable a site does not record at all reads "not recorded" there.
    `groups` names the 0/1 columns of each categorical variable (its levels
    after the reference): where the reference level's count, which a reader
    could get by subtraction, is under 5, the variable's cells at that site
    are suppressed too.
    """
    rows = []
    rows.append(("index stays, n", {site: count_cell(len(cohort)) for site, cohort in cohorts.items()}))
    rows.append(("readmitted within 30 days, n (%)",
                 {site: count_percent_cell(int(cohort[LABEL].sum()), len(cohort)) for site, cohort in cohorts.items()}))
    last_missing = None
    for feature in features:
        if feature.kind == "binary":
            label = f"{feature.name}, n (%)"
            cells = {site: count_percent_cell(int(cohort[feature.name].sum()), int(cohort[feature.name].notna().sum()))
                     for site, cohort in cohorts.items()}
        else:
            label = f"{feature.name}, median [IQR]"
            decimals = 1 if feature.name in ("potassium",) or _narrow(cohorts, feature.name) else 0
            cells = {site: _median_iqr(cohort[feature.name], decimals) for site, cohort in cohorts.items()}
        cells = {site: "not recorded" if cohort[feature.name].isna().all() else cells[site]
                 for site, cohort in cohorts.items()}
        rows.append((label, cells))
        missing = {site: int(cohort[feature.name].isna().sum()) for site, cohort in cohorts.items()}
        # The 0/1 columns of one categorical variable (ef_HFrEF after ef_HFmrEF) share its missing count: show it once.
        shown = (feature.name.rsplit("_", 1)[0], tuple(missing.values()))
        if any(missing.values()) and shown != last_missing:
            last_missing = shown
            rows.append((f"{feature.name} missing, n (%)",
                         {site: count_percent_cell(missing[site], len(cohort)) for site, cohort in cohorts.items()}))
    for score in (name for name in SCORE_COLUMNS if all(name in cohort for cohort in cohorts.values())):
        rows.append((f"{score} (not a model input), median [IQR]",
                     {site: _median_iqr(cohort[score]) for site, cohort in cohorts.items()}))
    table = pd.DataFrame({label: cells for label, cells in rows}).T
    for columns in (groups or {}).values():
        for site, cohort in cohorts.items():
            observed = cohort[columns[0]].notna()
            reference = int(observed.sum() - cohort.loc[observed, columns].sum().sum())
            if is_small(reference):
                table.loc[[f"{name}, n (%)" for name in columns], site] = SUPPRESSED
    return table


def synthetic_vs_published(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return each anchored quantity per site next to its published value and source."""
    def percent(column):
        return lambda cohort: f"{100 * cohort[column].mean():.1f}%"

    def median(column):
        return lambda cohort: f"{cohort[column].median():,.0f}"

    compute = {
        "age, median": median("age"),
        "women, %": percent("female"),
        "length of stay, median days": median("los_days"),
        "30-day readmission, %": percent(LABEL),
        "NT-proBNP, median ng/L": median("nt_probnp"),
        "eGFR, median": median("egfr"),
        "sodium, median mmol/L": median("sodium"),
        "haemoglobin, median g/L": median("haemoglobin"),
        "LVEF missing, %": lambda cohort: f"{100 * cohort['lvef'].isna().mean():.1f}%",
        "diabetes, %": percent("diabetes"),
        "COPD, %": percent("copd"),
        "atrial fibrillation, %": percent("atrial_fibrillation"),
        "on beta-blocker at discharge, %": percent("on_beta_blocker"),
        "on MRA at discharge, %": percent("on_mra"),
    }
    rows = []
    for quantity, (published, source) in PUBLISHED_ANCHORS.items():
        row = {"quantity": quantity}
        row.update({f"synthetic {site}": compute[quantity](cohort) for site, cohort in cohorts.items()})
        row.update({"published": published, "source": source})
        rows.append(row)
    return pd.DataFrame(rows).set_index("quantity")


@dataclass(frozen=True)
class PlausibilityCheck:
    """One marginal or association of a site's cohort, the published figure it answers to, and its tolerance."""

    what: str
    published: str
    source: str  # a key of docs/calibration.md "Sources"
    low: float
    high: float
    measure: Callable[[pd.DataFrame], float]


def _percent(mask: pd.Series, among: pd.Series | None = None) -> float:
    among = pd.Series(True, index=mask.index) if among is None else among
    return 100.0 * float(mask[among].mean()) if among.any() else float("nan")


def _ef_class(cohort: pd.DataFrame) -> pd.Series:
    return pd.cut(cohort["lvef"], [-np.inf, 40, 49, np.inf], labels=["HFrEF", "HFmrEF", "HFpEF"])


def _index_year(cohort: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(cohort["index_discharge_date"]).dt.year


def _lace_auroc(cohort: pd.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(cohort[LABEL], cohort["lace_score"])) if cohort[LABEL].nunique() == 2 else float("nan")


#: The clinical plausibility table: what a clinician checks first, each held
#: to a tolerance around its published figure (docs/calibration.md gives each
#: source in full). tests/test_plausibility.py fails when the default profile
#: drifts outside one.
PLAUSIBILITY_CHECKS: tuple[PlausibilityCheck, ...] = (
    PlausibilityCheck("age, median", "80 [71-87] register; 77 [69-84] SwedeHF", "S1", 75, 82,
                      lambda c: float(c["age"].median())),
    PlausibilityCheck("aged 100 or more, %", "just under 2,000 centenarians in Sweden (2016)", "S15", 0, 1,
                      lambda c: _percent(c["age"] >= 100)),
    PlausibilityCheck("women, %", "46.5% register; 38% SwedeHF", "S1", 35, 50, lambda c: _percent(c["female"] == 1)),
    PlausibilityCheck("sodium, median mmol/L", "140 [137-142]", "S1", 138, 142, lambda c: float(c["sodium"].median())),
    PlausibilityCheck("sodium, interquartile range mmol/L", "5 (137-142)", "S1", 3, 7,
                      lambda c: float(c["sodium"].quantile(0.75) - c["sodium"].quantile(0.25))),
    PlausibilityCheck("haemoglobin at discharge, median g/L", "119 [106-135]", "S1", 112, 128,
                      lambda c: float(c["haemoglobin"].median())),
    PlausibilityCheck("creatinine missing, %", "routine inpatient chemistry: almost always taken (assumption)", "-",
                      0, 2, lambda c: _percent(c["creatinine"].isna())),
    PlausibilityCheck("LVEF missing, %", "43% in Halland", "S2", 15, 50, lambda c: _percent(c["lvef"].isna())),
    PlausibilityCheck("women among HFrEF, %", "29%", "S19", 20, 40,
                      lambda c: _percent(c["female"] == 1, _ef_class(c) == "HFrEF")),
    PlausibilityCheck("women among HFpEF, %", "55%", "S19", 45, 65,
                      lambda c: _percent(c["female"] == 1, _ef_class(c) == "HFpEF")),
    PlausibilityCheck("ischaemic heart disease, HFrEF minus HFpEF, points", "54% vs 42%: +12", "S19", 3, 25,
                      lambda c: _percent(c["ischaemic_heart_disease"] == 1, _ef_class(c) == "HFrEF")
                      - _percent(c["ischaemic_heart_disease"] == 1, _ef_class(c) == "HFpEF")),
    PlausibilityCheck("LVEF missing, aged 85+ minus under 75, points", "older patients get fewer echoes (direction)", "-",
                      5, 50, lambda c: _percent(c["lvef"].isna(), c["age"] >= 85) - _percent(c["lvef"].isna(), c["age"] < 75)),
    PlausibilityCheck("SGLT2 inhibitor without coded diabetes before 2020, %", "no heart-failure use before DAPA-HF",
                      "S21", 0, 2, lambda c: _percent(c["on_sglt2_inhibitor"] == 1, (c["diabetes"] == 0) & (_index_year(c) < 2020))),
    PlausibilityCheck("ARNI with recorded LVEF above 40, %", "reimbursed for reduced EF only", "S22", 0, 1,
                      lambda c: _percent(c["on_arni"] == 1, c["lvef"] > 40)),
    PlausibilityCheck("ARNI without a recorded LVEF, %", "reimbursed for reduced EF only", "S22", 0, 1,
                      lambda c: _percent(c["on_arni"] == 1, c["lvef"].isna())),
    PlausibilityCheck("MRA, HFrEF minus HFpEF, points", "indicated in reduced EF (direction)", "S10", 5, 40,
                      lambda c: _percent(c["on_mra"] == 1, _ef_class(c) == "HFrEF")
                      - _percent(c["on_mra"] == 1, _ef_class(c) == "HFpEF")),
    PlausibilityCheck("admitted in the prior year, %", "no direct anchor (SwedeHF's 54.5% counts the index stay)", "S1",
                      30, 55, lambda c: _percent(c["prior_admissions_365d"] > 0)),
    PlausibilityCheck("earlier heart-failure stay, index stays in 2016, %", "no anchor (assumption); 62% with heart failure "
                      "known 6 months or more", "S1", 25, 55,
                      lambda c: _percent(c["prior_hf_hospitalisation"] == 1, _index_year(c) == 2016)),
    PlausibilityCheck("earlier heart-failure stay, 2016 minus 2020, points", "first-stay rule: only stays before the window "
                      "count (direction)", "-", 15, 55,
                      lambda c: _percent(c["prior_hf_hospitalisation"] == 1, _index_year(c) == 2016)
                      - _percent(c["prior_hf_hospitalisation"] == 1, _index_year(c) == 2020)),
    PlausibilityCheck("SGLT2 inhibitor with coded diabetes, 2016-2018, %", "5.5%", "S25", 2, 10,
                      lambda c: _percent(c["on_sglt2_inhibitor"] == 1, (c["diabetes"] == 1) & (_index_year(c) <= 2018))),
    PlausibilityCheck("30-day readmission, %", "20.3%", "S5", 15, 25, lambda c: _percent(c[LABEL] == 1)),
    PlausibilityCheck("LACE, AUROC for the label", "C statistic 0.64 in heart failure", "S24", 0.55, 0.68, _lace_auroc),
)


def clinical_plausibility(cohorts: dict[str, pd.DataFrame],
                          checks: Sequence[PlausibilityCheck] = PLAUSIBILITY_CHECKS) -> pd.DataFrame:
    """Return each check by site next to its published figure, source and tolerance, with whether it holds.

    Values are percentages, medians and differences of percentages over
    whole sites: aggregates, not records.
    """
    rows = []
    for check in checks:
        values = {site: check.measure(cohort) for site, cohort in cohorts.items()}
        row = {"check": check.what, "published": check.published, "source": check.source,
               "tolerance": f"{check.low:g} to {check.high:g}"}
        row.update({f"synthetic {site}": round(value, 2) for site, value in values.items()})
        row["within tolerance"] = all(check.low <= value <= check.high for value in values.values())
        rows.append(row)
    return pd.DataFrame(rows).set_index("check")


def age_sex_counts(cohorts: dict[str, pd.DataFrame], band: int = 5, age: str = "age",
                   female: str = "female") -> pd.DataFrame:
    """Return patients per site, sex and age band; small counts become NaN (not plotted)."""
    frames = []
    for site, cohort in cohorts.items():
        cohort = cohort.loc[cohort[age].notna() & cohort[female].notna()]
        lower = (np.floor(cohort[age] / band) * band).astype(int)
        counts = (pd.DataFrame({"age_band": lower, "sex": np.where(cohort[female] == 1, "women", "men")})
                  .value_counts().rename("patients").reset_index())
        counts["site"] = site
        frames.append(counts)
    out = pd.concat(frames, ignore_index=True).sort_values(["site", "sex", "age_band"])
    out["patients"] = out["patients"].astype(float).mask(is_small(out["patients"].to_numpy()))
    lowers = sorted(out["age_band"].unique())
    labels = {lower: f"{lower}-{lower + band - 1}" for lower in lowers}
    out["age_band"] = pd.Categorical(out["age_band"].map(labels), categories=[labels[lower] for lower in lowers],
                                     ordered=True)
    return out.reset_index(drop=True)


def readmission_rates(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return each site's readmission rate with a 95% Wilson interval (not shown where a count is under 5)."""
    rows = []
    for site, cohort in cohorts.items():
        n, k = len(cohort), int(cohort[LABEL].sum())
        if is_small(k) or is_small(n - k):
            rows.append({"site": site, "index_stays": np.nan, "readmitted": np.nan, "rate": np.nan, "low": np.nan,
                         "high": np.nan})
            continue
        interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        rows.append({"site": site, "index_stays": n, "readmitted": k, "rate": k / n, "low": interval.low,
                     "high": interval.high})
    return pd.DataFrame(rows)


def missingness(cohorts: dict[str, pd.DataFrame], features: Sequence[Feature] = FEATURES) -> pd.DataFrame:
    """Return the share of index stays missing each variable (variables with any missing).

    A share whose count of missing (or of present) values is under 5 is NaN: not shown.
    """
    names = [feature.name for feature in features]
    missing = pd.DataFrame({site: cohort[names].isna().sum() for site, cohort in cohorts.items()})
    sizes = pd.Series({site: len(cohort) for site, cohort in cohorts.items()})
    table = missing / sizes
    small = is_small(missing.to_numpy()) | is_small((sizes.to_numpy() - missing.to_numpy()))
    return table.mask(small).loc[missing.max(axis=1) > 0]


#: Age bands of the missingness-by-age figure, [low, high) years.
MISSINGNESS_AGE_BANDS = ((18, 65), (65, 75), (75, 85), (85, 120))


def missingness_by_age(cohorts: dict[str, pd.DataFrame], labs: Sequence[str] = ("lvef", "nt_probnp"),
                       bands: Sequence[tuple[int, int]] = MISSINGNESS_AGE_BANDS) -> pd.DataFrame:
    """Return the share of index stays missing each lab by site and age band (missing not at random).

    A share whose count of missing (or of present) values is under 5 is NaN: not shown.
    """
    rows = []
    for site, cohort in cohorts.items():
        for low, high in bands:
            in_band = cohort[(cohort["age"] >= low) & (cohort["age"] < high)]
            for lab in labs:
                missing, size = int(in_band[lab].isna().sum()), len(in_band)
                share = np.nan if is_small(missing) or is_small(size - missing) else missing / size
                rows.append({"site": site, "age band": f"{low}-{high - 1}" if high < 120 else f"{low}+",
                             "lab": lab, "missing": share})
    return pd.DataFrame(rows)


def plot_missingness_by_age(table: pd.DataFrame):
    """Return a line plot of the share of stays missing each lab, by age band, one panel per lab."""
    import matplotlib.pyplot as plt

    labs = list(dict.fromkeys(table["lab"]))
    fig, axes = plt.subplots(1, len(labs), figsize=(4.2 * len(labs), 3.2), sharey=True, squeeze=False)
    for ax, lab in zip(axes[0], labs):
        for site, rows in table[table["lab"] == lab].groupby("site", sort=False):
            ax.plot(rows["age band"], 100 * rows["missing"], marker="o", label=site)
        ax.set_title(f"{lab} not recorded")
        ax.set_xlabel("age (years)")
    axes[0][0].set_ylabel("% of index stays")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    return fig


def code_frequency(omop_dirs: dict[str, Path], top: int = 12) -> pd.DataFrame:
    """Return the most frequent ICD-10 main diagnoses per site as shares of main-diagnosis records."""
    frames = []
    for site, omop_dir in omop_dirs.items():
        table = pq.read_table(Path(omop_dir) / "condition_occurrence.parquet",
                              columns=["condition_source_value", "condition_status_concept_id"])
        main = table.filter(pc.equal(table.column("condition_status_concept_id"), 32902))
        codes = vocab.normalise_icd10(main.column("condition_source_value").combine_chunks())  # I509 and I50.9 are one code
        counts = pc.value_counts(codes).to_pylist()
        frame = pd.DataFrame([(count["values"], count["counts"]) for count in counts], columns=["code", "records"])
        frame = frame.loc[~is_small(frame["records"].to_numpy())]
        frame["share"] = frame["records"] / frame["records"].sum()
        frame["site"] = site
        frames.append(frame.sort_values("records", ascending=False).head(top))
    return pd.concat(frames, ignore_index=True)


def standardised_differences(cohorts: dict[str, pd.DataFrame], features: Sequence[Feature] = FEATURES) -> pd.DataFrame:
    """Return the standardised mean difference of each variable between the first two sites."""
    (first_site, first), (second_site, second) = list(cohorts.items())[:2]
    rows = []
    for feature in features:
        x, y = first[feature.name].dropna(), second[feature.name].dropna()
        pooled_sd = np.sqrt((x.var() + y.var()) / 2)
        smd = (x.mean() - y.mean()) / pooled_sd if pooled_sd > 0 else 0.0
        rows.append({"variable": feature.name, "smd": smd})
    out = pd.DataFrame(rows)
    out.attrs["comparison"] = f"{first_site} minus {second_site}"
    return out.sort_values("smd", key=np.abs, ascending=False)


def variables_table(features: Sequence[Feature] = FEATURES) -> pd.DataFrame:
    """Return every modelling variable with its source and why it is needed."""
    return pd.DataFrame([{"variable": feature.name, "type": feature.kind, "source": feature.source,
                          "why it is needed": feature.why} for feature in features]).set_index("variable")


# ---------------------------------------------------------------- figures
def plot_age_sex(counts: pd.DataFrame):
    """Return a bar chart of patients per age band and sex, one panel per site."""
    import seaborn as sns

    grid = sns.catplot(data=counts, x="age_band", y="patients", hue="sex", col="site", kind="bar",
                       height=3.4, aspect=1.5, sharey=False)
    grid.set_xticklabels(rotation=60)
    grid.set_axis_labels("age band (years)", "index stays")
    grid.figure.suptitle("Age and sex at the index stay (bands under 5 patients not shown)", y=1.04)
    return grid.figure


def plot_readmission_rates(rates: pd.DataFrame, published: bool = True):
    """Return a point plot of readmission rate per site with 95% Wilson intervals (and the published range)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    y = np.arange(len(rates))
    ax.errorbar(rates["rate"] * 100, y, xerr=[(rates["rate"] - rates["low"]) * 100, (rates["high"] - rates["rate"]) * 100],
                fmt="o", capsize=4)
    if published:
        ax.axvspan(18, 20.3, color="grey", alpha=0.15, label="published 18-20.3%")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_yticks(y, rates["site"])
    ax.set_xlabel("readmitted within 30 days (%)")
    ax.set_ylim(-0.6, len(rates) - 0.4)
    return fig


def plot_missingness(table: pd.DataFrame):
    """Return a heatmap of the share of index stays missing each variable, by site."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if table.empty:
        fig, ax = plt.subplots(figsize=(4.5, 1.2))
        ax.text(0.5, 0.5, "no missing values at any site", ha="center", va="center")
        ax.set_axis_off()
        return fig
    fig, ax = plt.subplots(figsize=(4.5, 0.45 * len(table) + 1))
    sns.heatmap(table * 100, annot=True, fmt=".0f", cmap="Blues", vmin=0, vmax=100,
                cbar_kws={"label": "% missing"}, ax=ax)
    ax.set_title("Missing values at the index stay (%)")
    return fig


def plot_code_frequency(codes: pd.DataFrame):
    """Return bar charts of the most frequent main diagnoses per site."""
    import seaborn as sns

    grid = sns.catplot(data=codes, y="code", x="share", col="site", kind="bar", height=3.6, aspect=1.1,
                       sharey=False, color="C0")
    grid.set_axis_labels("share of main-diagnosis records", "ICD-10-SE")
    grid.figure.suptitle("Coding habits: most frequent main diagnoses", y=1.04)
    return grid.figure


def plot_standardised_differences(smd: pd.DataFrame):
    """Return a dot plot of standardised mean differences between two sites."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 0.22 * len(smd) + 1))
    ordered = smd.iloc[::-1]
    ax.scatter(ordered["smd"], ordered["variable"], color="C1")
    ax.axvline(0, color="black", linewidth=0.8)
    for edge in (-0.1, 0.1):
        ax.axvline(edge, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"standardised mean difference ({smd.attrs.get('comparison', '')})")
    ax.set_title("Site differences (|SMD| > 0.1 is a notable imbalance)")
    return fig


#: A site's box in the distribution plots needs this many observed values: with fewer, the 5th and
#: 95th percentiles sit on single patients' values.
MIN_FOR_DISTRIBUTION = 20


def plot_lab_distributions(cohorts: dict[str, pd.DataFrame], labs=("nt_probnp", "egfr", "sodium", "haemoglobin"),
                           log_scale=("nt_probnp",)):
    """Return box plots of labs by site: quartiles, whiskers at the 5th and 95th percentiles, no points.

    Percentile whiskers (not the 1.5 IQR rule, whose ends are real observations)
    keep every drawn value an aggregate; a site with fewer than
    MIN_FOR_DISTRIBUTION observed values of a lab is left out of its panel.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    labs = tuple(labs)
    fig, axes = plt.subplots(1, len(labs), figsize=(3.0 * len(labs), 3.2), squeeze=False)
    for ax, lab in zip(axes[0], labs):
        frame = pd.concat([pd.DataFrame({"site": site, lab: cohort[lab]}) for site, cohort in cohorts.items()
                           if cohort[lab].notna().sum() >= MIN_FOR_DISTRIBUTION], ignore_index=True)
        sns.boxplot(data=frame, x="site", y=lab, hue="site", whis=(5, 95), showfliers=False, ax=ax, legend=False)
        if lab in log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("")
    fig.suptitle("Laboratory values during the index stay (box: quartiles; whiskers: 5th-95th percentile)")
    fig.tight_layout()
    return fig
