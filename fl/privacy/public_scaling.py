"""Fixed public scaling: the preprocessing of every DP run, taken from published clinical ranges, not from data.

The non-private pipeline standardises with federated statistics (round 0:
each hospital's counts, sums and sums of squares, sent in the clear; the
means and standard deviations ship with the model). Those statistics are
outside every DP guarantee, so a DP run that used them would release a
model whose preprocessing depends on the patients without noise. A DP run
therefore scales each feature with a range fixed before any data are seen:

    z = (x - centre) / half_width,   centre, half_width from `PUBLIC_RANGES`

(on the log scale for the log-transformed laboratory values), so the range
maps to [-1, 1]; a missing value is imputed at the centre (z = 0) with its
missing indicator set, as before. Binary features map {0, 1} to {-1, 1}.
Nothing is learned from any hospital: no statistics round is run, and the
DP-SGD or client-level accountant is the whole privacy cost of the release.

Each range is either a published clinical threshold or reference interval
(the source is named) or, where no such interval exists (age, counts of
earlier visits), an a-priori design range stated as such. The ranges do not
need to contain every value (a value outside is simply |z| > 1; clipping in
DP-SGD bounds its influence); they only need to be public. `docs/privacy.md`
lists them with their sources, and the utility they cost is measured in
stage 4 (`fl.privacy.stage.dp_frontier`, preprocessing column).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl.data import SYNTHETIC_SCHEMA, FeatureSchema, PreprocessingSpec

#: The preprocessing a DP run may use: fixed public ranges (the default, inside the guarantee) or the
#: federated statistics round (outside every guarantee; kept to measure what covering round 0 costs).
PUBLIC_RANGES_CHOICE = "public_ranges"
FEDERATED_STATISTICS_CHOICE = "federated_statistics"
DP_PREPROCESSING = (PUBLIC_RANGES_CHOICE, FEDERATED_STATISTICS_CHOICE)


@dataclass(frozen=True)
class PublicRange:
    """A feature's fixed range [low, high] (raw units) and where it comes from."""

    low: float
    high: float
    unit: str
    source: str


ESC_2021 = ("McDonagh TA et al. 2021 ESC Guidelines for the diagnosis and treatment of acute and chronic heart "
            "failure, Eur Heart J 2021;42:3599-3726")
LACE = "van Walraven C et al. 2010, CMAJ 182:551-557 (LACE index)"
HOSPITAL = "Donzé J et al. 2013, JAMA Intern Med 173:632-638 (HOSPITAL score)"
KDIGO = "KDIGO 2012 Clinical Practice Guideline for CKD, Kidney Int Suppl 3:1-150 (GFR categories)"
NORIP = ("Rustad P et al. 2004, The Nordic Reference Interval Project 2000, Scand J Clin Lab Invest "
         "64:271-284")
WHO_ANAEMIA = "WHO 2011, Haemoglobin concentrations for the diagnosis of anaemia (WHO/NMH/NHD/MNM/11.1)"
HYPONATRAEMIA = "Spasovski G et al. 2014, Clinical practice guideline on hyponatraemia, Eur J Endocrinol 170:G1-G47"
DESIGN = "a-priori design range (no published interval; chosen before any data were seen)"

#: Numeric features of the synthetic cohort: the range each is scaled by.
PUBLIC_RANGES: dict[str, PublicRange] = {
    "age": PublicRange(40.0, 100.0, "years", DESIGN + ": adult heart-failure admissions"),
    "los_days": PublicRange(0.0, 14.0, "days", LACE + ": length-of-stay points saturate at 14 days"),
    "prior_admissions_365d": PublicRange(0.0, 5.0, "admissions", HOSPITAL + ": admissions in 12 months, top "
                                         "category > 5"),
    "ed_visits_180d": PublicRange(0.0, 4.0, "visits", LACE + ": emergency visits in 6 months, capped at 4"),
    "nt_probnp": PublicRange(125.0, 35000.0, "pg/mL (log scale)", ESC_2021 + ": 125 pg/mL rules out chronic heart "
                             "failure; upper end: the assay's usual reporting limit (design)"),
    "creatinine": PublicRange(45.0, 221.0, "umol/L (log scale)", NORIP + ": lower reference limit (women) 45; "
                              + ESC_2021 + ": 221 umol/L (2.5 mg/dL), the MRA caution limit"),
    "egfr": PublicRange(15.0, 90.0, "mL/min/1.73 m2", KDIGO + ": G4 lower limit 15, G1 from 90"),
    "sodium": PublicRange(125.0, 145.0, "mmol/L", HYPONATRAEMIA + ": < 135 hyponatraemia, < 125 profound; " + NORIP
                          + ": upper reference limit 145"),
    "potassium": PublicRange(3.5, 5.5, "mmol/L", ESC_2021 + ": hypokalaemia < 3.5, MRA stop above 5.5"),
    "haemoglobin": PublicRange(100.0, 170.0, "g/L", WHO_ANAEMIA + ": anaemia < 120 (women) / < 130 (men), moderate "
                               "< 110; " + NORIP + ": upper reference limit (men) 170"),
    "systolic_bp": PublicRange(90.0, 160.0, "mmHg", ESC_2021 + ": hypotension < 90; 2018 ESC/ESH hypertension grade 2 "
                               "from 160"),
    "lvef": PublicRange(20.0, 60.0, "%", ESC_2021 + ": reduced <= 40, mildly reduced 41-49, preserved >= 50"),
}


def public_spec(schema: FeatureSchema = SYNTHETIC_SCHEMA) -> PreprocessingSpec:
    """Return the preprocessing of the fixed public ranges: centre and half-width per feature, no data used.

    Binary features map {0, 1} to {-1, 1}. A numeric feature without a
    public range is an error: a DP run cannot standardise it without data.
    """
    missing = [name for name, kind in zip(schema.features, schema.kinds)
               if kind != "binary" and name not in PUBLIC_RANGES]
    if missing:
        raise ValueError(f"privacy.dp_preprocessing is {PUBLIC_RANGES_CHOICE!r} but numeric feature(s) {missing} "
                         f"have no public range in fl/privacy/public_scaling.py PUBLIC_RANGES; add one with its "
                         f"source, or set privacy.dp_preprocessing: {FEDERATED_STATISTICS_CHOICE} (outside the "
                         f"DP guarantee)")
    centre, half_width = [], []
    for name, kind in zip(schema.features, schema.kinds):
        if kind == "binary":
            low, high = 0.0, 1.0
        else:
            known = PUBLIC_RANGES[name]
            low, high = known.low, known.high
            if name in schema.log_features:
                low, high = np.log(low), np.log(high)
        centre.append((low + high) / 2)
        half_width.append((high - low) / 2)
    return PreprocessingSpec(np.array(centre), np.array(half_width), schema)


def range_table() -> list[dict]:
    """Return one row per numeric feature: its public range, unit and source (for artifacts and docs)."""
    return [{"feature": name, "low": r.low, "high": r.high, "unit": r.unit, "source": r.source}
            for name, r in PUBLIC_RANGES.items()]
