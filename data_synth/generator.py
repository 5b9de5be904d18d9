"""Vectorised, chunked generation of one site's OMOP tables.

Patients are generated in fixed-size chunks, each with its own random stream
spawned from (seed, site code, chunk number): a chunk's patients do not
depend on how many chunks follow, so the first 1,000 patients of a 100,000
patient site are the same as those of a 1,000 patient site with the same
seed. Each chunk becomes one row group per table, sorted by person_id, and
is written before the next chunk is generated, so memory stays flat as the
site grows.

Generation follows each patient's true state (see `risk.PatientState`)
through the record, one step after the other on the chunk's one random
stream: who the patients are (`_draw_patients`), how the index
heart-failure stay ends and what follows it (`_draw_course`), the visits
(`_draw_visits`), deaths, diagnoses, laboratory values and prescriptions.
What follows discharge deliberately carries signal about the label (labs and
prescriptions at the readmission), so a cohort builder that looks past the
index discharge is caught by the tests.

The published figures behind the tables below, and where each is used, are
listed in docs/calibration.md; "assumption" marks a value with no published
anchor. The steps draw from the stream in a fixed order with fixed shapes:
reordering draws, or drawing a different number of values, changes every
table that follows, so it is a change of the data, not a refactoring.
"""
from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from compendium.artifacts import replace_folder
from data_synth import omop
from data_synth import vocabulary as vocab
from data_synth.risk import PatientState, egfr_ckd_epi_2021, readmission_logit, sigmoid
from data_synth.sites import COMORBIDITIES, SiteProfile

#: Patients per chunk (one Parquet row group per table). Part of the data's
#: definition: changing it changes the random streams.
CHUNK_PATIENTS = 20_000
#: Index stays fall in this window; history reaches HISTORY_YEARS before it.
STUDY_START = dt.date(2016, 1, 1)
STUDY_END = dt.date(2021, 12, 31)
HISTORY_YEARS = 5
GROUND_TRUTH_FILE = "ground_truth.parquet"
#: Tables whose code columns the generator writes dictionary-encoded.
DICTIONARY_CODED_TABLES = ("condition_occurrence", "measurement", "drug_exposure", "procedure_occurrence")
PARQUET_OPTIONS = dict(compression="snappy", use_dictionary=True, write_statistics=True)

_EPOCH = dt.date(1970, 1, 1)


# ---------------------------------------------------------------- model forms
@dataclass(frozen=True)
class TrueValue:
    """A continuous true value: centre + sum of effect * predictor + Normal(0, noise_sd).

    With `log`, the sum is on the log scale and `centre` is the median. A
    centre of None is the site's own (a SiteProfile field).
    """

    centre: float | None
    effects: dict[str, float]
    noise_sd: float
    log: bool = False


@dataclass(frozen=True)
class CountModel:
    """A Poisson count whose log-mean is log_mean + sum of effect * predictor, capped at `cap`."""

    log_mean: float
    effects: dict[str, float]
    cap: int


@dataclass(frozen=True)
class Logistic:
    """A yes/no with probability sigmoid(logit(rate) + sum of effect * predictor).

    `rate` is that of a patient whose predictors are all zero; None takes the
    site's own (a SiteProfile field).
    """

    rate: float | None
    effects: dict[str, float]


# ---------------------------------------------------------------- who the patients are
#: Women with heart failure are older than men (docs/calibration.md "Age and
#: sex"; the size is an assumption): years added to a woman's mean age,
#: relative to the site's female share so the site's median age holds.
WOMEN_OLDER_BY_YEARS = 2.0
#: Ages are left-skewed as in the register (80 [71-87], docs/calibration.md
#: "Age and sex"): AGE_OLDEST_YEARS minus a gamma draw whose median and SD
#: give the site's age_median and age_sd (about 72-80-87 at Halland; 0.2% aged
#: 100 or more, where a normal draw gave 3.5%), then clipped to AGE_RANGE_YEARS.
AGE_OLDEST_YEARS = 106.0
AGE_RANGE_YEARS = (40, 105)
#: Age enters the models below in decades from 80 (the register median).
AGE_CENTRE_YEARS = 80.0
AGE_DECADE_YEARS = 10.0
#: Each comorbidity's prevalence is the site's (SiteProfile.comorbidity_prevalence);
#: these make them co-occur. Loading on the latent frailty (per SD) and slope
#: per decade of age; assumptions giving the known directions (dementia and
#: atrial fibrillation rise with age, psychiatric diagnoses fall).
COMORBIDITY_FRAILTY_LOADING: dict[str, float] = {
    name: 0.5 if name in ("renal_failure", "copd", "psychiatric", "dementia") else 0.3 for name in COMORBIDITIES
}
COMORBIDITY_AGE_SLOPE: dict[str, float] = {
    name: {"dementia": 0.6, "atrial_fibrillation": 0.3, "cancer": 0.2, "psychiatric": -0.2}.get(name, 0.0)
    for name in COMORBIDITIES
}
#: EF class follows the phenotype (docs/calibration.md "Ejection fraction"):
#: log-odds of HFpEF against HFrEF per predictor, HFmrEF half-way. Women,
#: age, AF and hypertension go with preserved EF, ischaemic heart disease
#: with reduced EF (SwedeHF: women 29/39/55%, age 72/74/77, coronary disease
#: 54/53/42% in HFrEF/HFmrEF/HFpEF). Predictors are centred on the site's
#: shares so that the site's EF classes hold on average.
EF_PRESERVED_EFFECTS: dict[str, float] = {
    "female": 1.1, "age_decades": 0.4, "ischaemic_heart_disease": -0.5, "atrial_fibrillation": 0.5,
    "hypertension": 0.3,
}
EF_MILDLY_REDUCED_FRACTION = 0.5
#: Frailty rises with age: its correlation with age (assumption on the size;
#: direction docs/calibration.md "Readmission risk").
FRAILTY_AGE_CORRELATION = 0.3
#: LVEF (%) drawn uniformly inside each EF class, [low, high): HFrEF up to 40,
#: HFmrEF 41-49, HFpEF 50 and above (ESC 2021 definitions, docs/calibration.md "Ejection fraction").
LVEF_RANGES = ((15, 41), (41, 50), (50, 71))
#: True values at index discharge. Centres and spreads put the medians and
#: interquartile ranges near SwedeHF's (docs/calibration.md "Laboratory
#: values"; systolic pressure is an assumption). Effects are per SD of
#: frailty, per decade of age, or for having the condition: assumed sizes in
#: the known directions.
TRUE_LABS: dict[str, TrueValue] = {
    "nt_probnp": TrueValue(3500, {"frailty": 0.45, "hfref": 0.35, "renal_failure": 0.4, "age_decades": 0.15},
                           1.05, log=True),
    "creatinine": TrueValue(95, {"renal_failure": 0.45, "frailty": 0.08, "female": -0.12}, 0.26, log=True),
    "sodium": TrueValue(140.0, {"frailty": -0.9}, 2.6),
    "potassium": TrueValue(4.2, {"renal_failure": 0.15, "frailty": 0.05}, 0.42),
    "haemoglobin": TrueValue(125.0, {"female": -7.0, "frailty": -5.0, "renal_failure": -8.0}, 19),
    "systolic_bp": TrueValue(128.0, {"hfref": -8.0, "frailty": -4.0}, 19),
}
#: Use of care before the index stay (docs/calibration.md "Utilisation"):
#: about 40% have an admission in the prior year (target 30-55%, SwedeHF 55%).
PRIOR_ADMISSIONS_365D = CountModel(-0.75, {"frailty": 0.55, "copd": 0.25, "renal_failure": 0.2}, cap=12)
ED_VISITS_180D = CountModel(-0.45, {"frailty": 0.5, "psychiatric": 0.3}, cap=15)
#: Admissions 1 to HISTORY_YEARS years before (assumption).
OLDER_ADMISSIONS = CountModel(0.1, {"frailty": 0.4}, cap=15)
#: Length of the index stay: log-normal around the site's median (SwedeHF 5
#: [3-9] days, docs/calibration.md "Length of stay"), in whole days.
LENGTH_OF_STAY = TrueValue(None, {"frailty": 0.15}, 0.62, log=True)
LENGTH_OF_STAY_RANGE_DAYS = (1, 60)
#: Discharge prescriptions (SwedeHF rates, docs/calibration.md "Drugs at
#: discharge"): the guideline-directed drugs (RAS inhibition, beta-blocker,
#: MRA) are indicated in reduced EF and used less in preserved EF; fewer RAS
#: inhibitors and MRAs with poor renal function, more loop diuretics with
#: frailty (sizes are assumptions). Rates are for a patient with the
#: predictors at zero (mildly reduced EF).
DISCHARGE_DRUGS: dict[str, Logistic] = {
    "ras_or_arni": Logistic(0.80, {"hfref": 0.6, "hfpef": -0.5, "egfr_below_30": -1.0, "age_over_88": -0.3}),
    "beta_blocker": Logistic(0.85, {"hfref": 0.5, "hfpef": -0.4}),
    "mra": Logistic(0.40, {"hfref": 0.6, "hfpef": -0.4, "egfr_below_30": -1.0, "potassium_above_5": -0.8}),
    "loop_diuretic": Logistic(0.80, {"frailty": 0.3}),
}
#: ARNI (sacubitril/valsartan) replaces part of the RAS inhibition in reduced
#: EF recorded at the stay only (its indication and its subsidy: an EF must
#: be measured), from this year on: the site's
#: ARNI share among HFrEF patients on RAS inhibition times this factor.
ARNI_FIRST_YEAR = 2017
ARNI_SHARE_FACTOR_HFREF = 1.6
#: SGLT2 inhibitors (docs/calibration.md "Drugs at discharge"): for diabetes
#: throughout, by index year (SwedeHF: 5.5% of heart-failure patients with
#: type 2 diabetes in 2016-2018, 12% at the end of 2018; 46% of those with
#: HFrEF in November 2020; the years between are interpolated); for heart
#: failure without diabetes only in reduced EF and only after DAPA-HF
#: (November 2019) and the EU approval (5 November 2020): none before 2020,
#: 12.5% of HFrEF patients without diabetes in November 2020 and 55% by
#: August 2022 (the yearly averages here are interpolations).
SGLT2_DIABETES_RATE: dict[int, float] = {2016: 0.03, 2017: 0.05, 2018: 0.09, 2019: 0.15, 2020: 0.30, 2021: 0.45}
SGLT2_HFREF_RATE: dict[int, float] = {2020: 0.05, 2021: 0.30}

#: A nurse-led heart-failure clinic after discharge (SiteProfile.follow_up_clinic): log odds ratio of
#: 30-day readmission for a patient it follows (docs/calibration.md "Site differences").
FOLLOW_UP_CLINIC_LOG_OR = float(np.log(0.8))

# ---------------------------------------------------------------- the course after the index stay
#: Death in hospital: the site's rate (SiteProfile.in_hospital_death), higher with frailty.
IN_HOSPITAL_DEATH = Logistic(None, {"frailty": 0.6})
#: Day of an unplanned readmission, 1 + floor(30 * Beta(a, b)): earlier days
#: more likely (assumption on the shape; the rate is the true risk).
READMISSION_DAY_BETA = (1.0, 1.6)
#: Unplanned admissions 31-365 days after discharge among those not readmitted
#: within 30 days: Wideqvist 2021 (20.3% by 30 days, 60.9% by one year)
#: implies about half (docs/calibration.md "Readmission").
LATER_ADMISSION_RATE = 0.45
LATER_ADMISSION_DAYS = (31, 366)
#: Planned admissions (site's rate) start 2-30 days after discharge.
PLANNED_ADMISSION_DAYS = (2, 31)
#: Emergency visits without admission within 30 days of discharge (assumption).
ED_AFTER_DISCHARGE_RATE = 0.08
ED_AFTER_DISCHARGE_DAYS = (1, 31)
#: Visits before the index stay: days before its start, [low, high).
PRIOR_ADMISSION_DAYS_BEFORE = (2, 366)
OLDER_ADMISSION_DAYS_BEFORE = (366, 365 * HISTORY_YEARS)
ED_VISIT_DAYS_BEFORE = (1, 181)
#: Each stay lasts 1 + Poisson(mean) days; emergency visits end the day they start (assumption).
STAY_EXTRA_DAYS_MEAN: dict[str, float] = {
    "prior_admission": 3.5, "older_admission": 3.0, "earlier_hf": 4.0, "readmission": 4.0, "later_admission": 4.0, "planned": 1.0,
}
#: Visits after discharge: OMOP visit concept and where the patient came from.
FOLLOW_UP_VISITS: dict[str, tuple[int, int]] = {
    "readmission": (vocab.VISIT_EMERGENCY_INPATIENT, vocab.ADMITTED_FROM_EMERGENCY_ROOM),
    "later_admission": (vocab.VISIT_EMERGENCY_INPATIENT, vocab.ADMITTED_FROM_EMERGENCY_ROOM),
    "planned": (vocab.VISIT_INPATIENT, vocab.ADMITTED_FROM_HOME),
    "ed_after": (vocab.VISIT_EMERGENCY, vocab.ADMITTED_FROM_HOME),
}
#: Death within 30 days of discharge, the competing risk of the label
#: (docs/calibration.md "Discharge outcomes"), on a day drawn uniformly.
EARLY_DEATH = Logistic(0.06, {"frailty": 0.6, "age_decades": 0.5})
EARLY_DEATH_DAYS = (1, 31)
#: Death after discharge, within a year of the patient's last visit (assumption).
LATER_DEATH = Logistic(0.15, {"frailty": 0.7, "age_decades": 0.4})
LATER_DEATH_DAYS_AFTER = (1, 366)

# ---------------------------------------------------------------- how the record is written
#: A present comorbidity coded at an earlier admission: this share of the
#: site's coding completeness (assumption).
HISTORY_CODING_FACTOR = 0.35
#: An earlier heart-failure hospitalisation, 1 to HISTORY_YEARS years before
#: the index stay, for this share of patients (higher with frailty): an
#: assumption. SwedeHF's "previous heart-failure hospitalisation within a
#: year" (54.5%) counts the registering stay itself, so it is no anchor for a
#: stay *before* the index (docs/calibration.md "Utilisation"). Its day is
#: drawn uniformly over the look-back; a stay that would fall inside the study
#: window would itself be the patient's first index stay, so such patients
#: have none: under the first-stay rule, earlier heart-failure stays are seen
#: less often the later the index stay (a property of any first-stay cohort).
EARLIER_HF_HOSPITALISATION = Logistic(0.40, {"frailty": 0.3})
EARLIER_HF_DAYS_BEFORE = (366, 365 * HISTORY_YEARS)
#: Heart failure coded as a secondary diagnosis at admissions in the prior year (assumption).
KNOWN_HF_AT_PRIOR_ADMISSION = 0.6
#: Share of unplanned admissions after discharge whose main diagnosis is
#: heart failure: about 60% of 30-day readmissions (docs/calibration.md
#: "Readmission"), assumed lower later on.
HF_SHARE_OF_READMISSIONS = 0.6
HF_SHARE_OF_LATER_ADMISSIONS = 0.5
#: Lab value at admission relative to the true value at discharge: patients
#: arrive congested (higher NT-proBNP, lower sodium) and diluted, so
#: haemoglobin rises with decongestion (haemoconcentration in about half of
#: stays, docs/calibration.md "Laboratory values"); the sizes are assumptions.
ADMISSION_FACTOR: dict[str, float] = {
    "nt_probnp": 1.45, "creatinine": 1.05, "sodium": 0.995, "potassium": 1.0,
    "haemoglobin": 0.98, "systolic_bp": 1.08, "lvef": 1.0,
}
#: Relative measurement variation (SD; analytical plus day-to-day within-person)
#: of each analyte, docs/calibration.md "Laboratory values": electrolytes are
#: held in a narrow band (sodium about 0.6%), potassium, creatinine and
#: haemoglobin a few per cent, natriuretic peptides far more.
MEASUREMENT_CV: dict[str, float] = {
    "nt_probnp": 0.20, "creatinine": 0.06, "sodium": 0.007, "potassium": 0.05,
    "haemoglobin": 0.03, "systolic_bp": 0.08, "lvef": 0.0,
}
#: Values copied from earlier admissions vary this many times more (older, other conditions; assumption).
HISTORY_CV_FACTOR = 2.0
#: Missing echocardiography and NT-proBNP depend on the patient: older,
#: frailer and demented patients are examined less (docs/calibration.md
#: "Laboratory values"; sizes are assumptions). Log-odds of missing per decade
#: of age, per SD of frailty, and with dementia; the site's rate holds on average.
LAB_MISSING_EFFECTS: dict[str, dict[str, float]] = {
    "lvef": {"age_decades": 0.5, "frailty": 0.3, "dementia": 1.0},
    "nt_probnp": {"age_decades": 0.3, "frailty": 0.2, "dementia": 0.5},
}
#: Approximate variance of each shift above (age SD about 1.1 decades,
#: dementia about 6%), for holding the marginal rate.
LAB_MISSING_SHIFT_VARIANCE: dict[str, float] = {"lvef": 0.5**2 * 1.2 + 0.3**2 + 0.06, "nt_probnp": 0.3**2 * 1.2 + 0.2**2 + 0.015}
#: Echocardiography on day 0 to ECHO_WITHIN_DAYS - 1 of the stay (not after discharge).
ECHO_WITHIN_DAYS = 4
#: Labs recorded at earlier admissions, and at the readmission (a leakage trap).
HISTORY_LABS = ("creatinine", "haemoglobin")
READMISSION_LABS = ("nt_probnp", "sodium")
#: Decimals each lab is reported with (others: whole numbers).
LAB_DECIMALS = {"potassium": 1}
#: Prescriptions last this many days; a patient on a drug at discharge was on
#: it before the stay with this probability, started this many days before.
PRESCRIPTION_DAYS = 90
ON_DRUG_BEFORE_STAY = 0.5
DRUG_STARTED_DAYS_BEFORE = (30, 300)

#: 1 / 1.7**2: a logistic-normal mean is close to the logistic of the mean
#: scaled by sqrt(1 + this * variance) (the probit approximation).
_LOGISTIC_NORMAL_FACTOR = 0.346


def _death_before_readmission() -> float:
    """Return P(an early death's day is on or before the readmission's day), both drawn as in _draw_course."""
    death_day = np.arange(*EARLY_DEATH_DAYS)
    # Readmission day 1 + floor(30 B), B ~ Beta(1, b): P(day >= d) = P(B >= (d - 1) / 30) = (1 - (d - 1) / 30) ** b.
    later = (1 - (death_day - 1) / 30.0) ** READMISSION_DAY_BETA[1]
    return float(later.mean()) if READMISSION_DAY_BETA[0] == 1.0 else float("nan")


_DEATH_BEFORE_READMISSION = _death_before_readmission()


def _days(date: dt.date) -> int:
    return (date - _EPOCH).days


def _logit(p: float | np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _linear(intercept: float, effects: dict[str, float], predictors: dict[str, np.ndarray]) -> np.ndarray:
    """Return intercept + sum of effect * predictor, summed in the table's order."""
    value = intercept
    for name, effect in effects.items():
        value = value + effect * predictors[name]
    return value


def _probability(model: Logistic, predictors: dict[str, np.ndarray], rate: float | None = None) -> np.ndarray:
    """Return each patient's probability under a Logistic model (`rate` for a site's own)."""
    return sigmoid(_linear(_logit(model.rate if rate is None else rate), model.effects, predictors))


def _draw_true_value(rng: np.random.Generator, model: TrueValue, predictors: dict[str, np.ndarray], n: int,
                     centre: float | None = None) -> np.ndarray:
    """Return n draws of a TrueValue (`centre` for a site's own)."""
    centre = model.centre if centre is None else centre
    value = _linear(np.log(centre) if model.log else centre, model.effects, predictors)
    value = value + rng.normal(0, model.noise_sd, n)
    return np.exp(value) if model.log else value


def _draw_count(rng: np.random.Generator, model: CountModel, predictors: dict[str, np.ndarray]) -> np.ndarray:
    """Return one draw of a CountModel per patient."""
    return np.minimum(rng.poisson(np.exp(_linear(model.log_mean, model.effects, predictors))), model.cap)


def _bernoulli_marginal(rng: np.random.Generator, prevalence: float, shift: np.ndarray, shift_var: float) -> np.ndarray:
    """Return Bernoulli draws whose marginal rate stays near `prevalence` despite a random shift."""
    base = _logit(prevalence) * np.sqrt(1.0 + _LOGISTIC_NORMAL_FACTOR * shift_var)
    return rng.random(shift.shape[0]) < sigmoid(base + shift)


def _pick(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.integers(0, k, size=n, dtype=np.int32)


def _dictionary(indices: np.ndarray, values: tuple[str, ...] | list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), pa.array(list(values), pa.string()))


def _dates(days: np.ndarray) -> pa.Array:
    return pa.array(days.astype(np.int32)).cast(pa.date32())


@dataclass
class _Events:
    """Column arrays of one table for one chunk, before sorting by person."""

    columns: dict[str, list[np.ndarray]]

    @classmethod
    def empty(cls, names: list[str]) -> "_Events":
        return cls({name: [] for name in names})

    def add(self, **values: np.ndarray) -> None:
        lengths = {np.asarray(v).shape[0] for v in values.values() if np.ndim(v)}
        n = lengths.pop() if lengths else 1
        for name in self.columns:
            value = values[name]
            self.columns[name].append(np.broadcast_to(value, (n,)) if np.ndim(value) == 0 else np.asarray(value))

    def concat(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.columns.items()}


# Codes as dictionary vocabularies (index -> source value), fixed order.
_CONDITION_CODES: tuple[str, ...] = tuple(
    dict.fromkeys(
        vocab.HF_INDEX_CODES
        + vocab.OTHER_ADMISSION_CODES
        + vocab.PLANNED_ADMISSION_CODES
        + tuple(code for codes in vocab.COMORBIDITY_CODES.values() for code in codes)
    )
)
_CONDITION_INDEX = {code: i for i, code in enumerate(_CONDITION_CODES)}
_LAB_NAMES = tuple(vocab.LAB_LOINC)
_LOINC_CODES = tuple(code for code, _ in vocab.LAB_LOINC.values())
_UNITS = tuple(dict.fromkeys(unit for _, unit in vocab.LAB_LOINC.values()))
_UNIT_OF_LAB = np.array([_UNITS.index(unit) for _, unit in vocab.LAB_LOINC.values()], np.int32)
_DRUG_CLASSES = tuple(vocab.DRUG_ATC)
_DRUG_CODES: tuple[str, ...] = tuple(code for _, codes in vocab.DRUG_ATC.values() for code in codes)
_DRUG_INDEX = {code: i for i, code in enumerate(_DRUG_CODES)}
_PROCEDURE_CODES: tuple[str, ...] = tuple(vocab.DEVICE_PROCEDURES)
_HF_CODE_IDX = np.array([_CONDITION_INDEX[code] for code in vocab.HF_INDEX_CODES], np.int32)
_OTHER_CODE_IDX = np.array([_CONDITION_INDEX[code] for code in vocab.OTHER_ADMISSION_CODES], np.int32)
_PLANNED_CODE_IDX = np.array([_CONDITION_INDEX[code] for code in vocab.PLANNED_ADMISSION_CODES], np.int32)
_HF_SECONDARY_IDX = _CONDITION_INDEX["I50.9"]


def _condition_codes_for(rng: np.random.Generator, name: str, female: np.ndarray) -> np.ndarray:
    """Return one code for `name` per patient, never one of the other sex's codes (vocabulary.SEX_SPECIFIC_CODES)."""
    codes = vocab.COMORBIDITY_CODES[name]
    u = rng.random(female.shape[0])
    by_sex = []
    for sex in ("female", "male"):
        allowed = np.array([_CONDITION_INDEX[code] for code in codes
                            if vocab.SEX_SPECIFIC_CODES.get(code, sex) == sex], np.int32)
        by_sex.append(allowed[np.minimum((u * allowed.size).astype(np.int64), allowed.size - 1)])
    return np.where(female, *by_sex).astype(np.int32)


_OTHER_WEIGHTS = np.array([weight for weight, _ in vocab.OTHER_ADMISSION_CAUSES.values()])
_OTHER_CUMULATIVE = np.cumsum(_OTHER_WEIGHTS / _OTHER_WEIGHTS.sum())[:-1]
_OTHER_FREE = np.array([requires is None for _, requires in vocab.OTHER_ADMISSION_CAUSES.values()])
_OTHER_FREE_CUMULATIVE = np.cumsum(_OTHER_WEIGHTS[_OTHER_FREE] / _OTHER_WEIGHTS[_OTHER_FREE].sum())[:-1]


def _other_causes(rng: np.random.Generator, who: np.ndarray, comorbidity: dict[str, np.ndarray]) -> np.ndarray:
    """Return one main diagnosis for a cause other than heart failure per visit of patients `who`.

    Causes come at their relative frequencies (vocabulary.OTHER_ADMISSION_CAUSES);
    one that needs a comorbidity the patient lacks is replaced by a cause that needs none.
    """
    n = who.shape[0]
    cause = np.searchsorted(_OTHER_CUMULATIVE, rng.random(n), side="right")
    free = np.flatnonzero(_OTHER_FREE)[np.searchsorted(_OTHER_FREE_CUMULATIVE, rng.random(n), side="right")]
    allowed = _OTHER_FREE[cause]
    for k, (_, requires) in enumerate(vocab.OTHER_ADMISSION_CAUSES.values()):
        if requires is not None:
            allowed = allowed | ((cause == k) & comorbidity[requires][who])
    return _OTHER_CODE_IDX[np.where(allowed, cause, free)]


def _drug_codes_for(rng: np.random.Generator, drug_class: str, n: int) -> np.ndarray:
    codes = np.array([_DRUG_INDEX[code] for code in vocab.DRUG_ATC[drug_class][1]], np.int32)
    return codes[_pick(rng, n, codes.size)]


@dataclass
class ChunkTables:
    """One chunk of one site: the OMOP tables and the generator's ground truth."""

    tables: dict[str, pa.Table]
    ground_truth: pa.Table


@dataclass(frozen=True)
class _Patients:
    """One chunk's patients: true state at index discharge, index stay dates, drugs, true risk."""

    state: PatientState
    age_decades: np.ndarray  # (age - AGE_CENTRE_YEARS) / AGE_DECADE_YEARS
    birth: np.ndarray  # days since 1970
    index_start: np.ndarray  # days since 1970
    index_end: np.ndarray
    older_admissions: np.ndarray
    earlier_hf_gap: np.ndarray  # days from an earlier heart-failure stay to the index stay, 0 for none
    true_labs: dict[str, np.ndarray]  # keyed by vocabulary.LAB_LOINC: what each lab would measure
    on_drug: dict[str, np.ndarray]  # keyed by vocabulary.DRUG_ATC: prescribed at discharge
    echo_recorded: np.ndarray  # an LVEF is recorded at the index stay
    readmission_risk: np.ndarray  # 30-day readmission risk if the patient lives
    early_death_probability: np.ndarray  # death within 30 days of discharge
    true_risk: np.ndarray  # readmission within 30 days, death competing

    @property
    def count(self) -> int:
        return self.index_start.shape[0]


@dataclass(frozen=True)
class _Course:
    """How each index stay ends, and which visits follow discharge (FOLLOW_UP_VISITS kinds)."""

    died: np.ndarray
    #: day after discharge of a death within 30 days (the competing risk), 0 for none
    early_death_day: np.ndarray
    transferred: np.ndarray
    against_advice: np.ndarray
    hf_main_diagnosis: np.ndarray
    #: visit kind -> (who has one, its start in days after discharge)
    follow_up: dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _VisitGroup:
    """Visits of one kind: whose (positions in the chunk), their ids, start and end days."""

    who: np.ndarray
    ids: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def subset(self, mask: np.ndarray) -> "_VisitGroup":
        return _VisitGroup(self.who[mask], self.ids[mask], self.start[mask], self.end[mask])


class _VisitLog:
    """The visit_occurrence rows of one chunk; ids follow the order visits are added."""

    def __init__(self, id_base: np.int64):
        self.id_base = id_base
        self.count = 0
        self.rows = _Events.empty([
            "visit_occurrence_id", "person", "visit_concept_id", "visit_start_date", "visit_end_date",
            "admitted_from_concept_id", "discharged_to_concept_id",
        ])

    def add(self, who: np.ndarray, concept: int, start: np.ndarray, end: np.ndarray, admitted_from: int,
            discharged_to: np.ndarray | int) -> _VisitGroup:
        ids = self.id_base + self.count + np.arange(who.shape[0], dtype=np.int64)
        self.count += who.shape[0]
        discharged = np.asarray(discharged_to, np.int32) if np.ndim(discharged_to) else np.int32(discharged_to)
        self.rows.add(visit_occurrence_id=ids, person=who, visit_concept_id=np.int32(concept),
                      visit_start_date=start, visit_end_date=end, admitted_from_concept_id=np.int32(admitted_from),
                      discharged_to_concept_id=discharged)
        return _VisitGroup(who, ids, start, end)


class _DiagnosisLog:
    """The condition_occurrence rows of one chunk: diagnoses made at visits."""

    def __init__(self):
        self.rows = _Events.empty(["person", "date", "status", "visit", "code"])

    def add(self, visits: _VisitGroup, status: int, code: np.ndarray | np.int32) -> None:
        """Add one diagnosis (`code`, a condition index or one per visit) at each of `visits`, on its first day."""
        self.rows.add(person=visits.who, date=visits.start, status=np.int32(status), visit=visits.ids, code=code)


def generate_chunk(profile: SiteProfile, seed: int, chunk_index: int, n_patients: int) -> ChunkTables:
    """Return the OMOP tables for patients chunk_index*CHUNK_PATIENTS .. + n_patients."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, profile.site_code, chunk_index]))
    first = chunk_index * CHUNK_PATIENTS
    person_id = np.int64(profile.site_code) * 1_000_000_000 + first + np.arange(n_patients, dtype=np.int64)
    id_base = (np.int64(profile.site_code) << 40) + (np.int64(chunk_index) << 27)

    # One stream, in this order (see the module docstring).
    patients = _draw_patients(rng, profile, n_patients)
    course = _draw_course(rng, profile, patients)
    visit_rows, visits = _draw_visits(rng, profile, patients, course, id_base)
    death_rows = _draw_deaths(rng, patients, course, visits)
    condition_rows, planned_code = _draw_conditions(rng, profile, patients, course, visits)
    measurement_rows = _draw_measurements(rng, profile, patients, visits)
    drug_rows = _draw_prescriptions(rng, patients, course, visits)

    tables = {
        "person": _person_table(person_id, patients.state.female, patients.birth, profile.site_code),
        "visit_occurrence": _visit_table(visit_rows, person_id, profile.site_code),
        "condition_occurrence": _condition_table(condition_rows, person_id, id_base),
        "measurement": _measurement_table(measurement_rows, person_id, id_base),
        "drug_exposure": _drug_table(drug_rows, person_id, id_base),
        "death": _death_table(death_rows, person_id),
        "procedure_occurrence": _procedure_table(_device_procedures(patients, visits, planned_code), person_id, id_base),
    }
    ground_truth = pa.table({
        "person_id": pa.array(person_id),
        "visit_occurrence_id": pa.array(visits["index"].ids),
        "true_risk_30d": pa.array(patients.true_risk),
    })
    return ChunkTables(tables=tables, ground_truth=ground_truth)


# ---------------------------------------------------------------- steps, in drawing order
def _draw_patients(rng: np.random.Generator, profile: SiteProfile, n: int) -> _Patients:
    """Return who the patients are, their true state at index discharge and their true risk."""
    female = rng.random(n) < profile.female_fraction
    mean_age = profile.age_median + WOMEN_OLDER_BY_YEARS * (female - profile.female_fraction)
    shape, scale = _age_gamma(profile.age_median, profile.age_sd)
    age = np.clip(mean_age - profile.age_median + AGE_OLDEST_YEARS - rng.gamma(shape, scale, n), *AGE_RANGE_YEARS)
    age_z = (age - profile.age_median) / profile.age_sd
    frailty = FRAILTY_AGE_CORRELATION * age_z + np.sqrt(1 - FRAILTY_AGE_CORRELATION**2) * rng.standard_normal(n)
    index_start = rng.integers(_days(STUDY_START), _days(STUDY_END) + 1, size=n)
    birth = index_start - np.floor(age * 365.25).astype(np.int64) - rng.integers(0, 365, size=n)
    age_decades = (age - AGE_CENTRE_YEARS) / AGE_DECADE_YEARS
    comorbidity = _draw_comorbidities(rng, profile, frailty, age_decades)
    ef_class = _draw_ef_class(rng, profile, {"female": female, "age_decades": age_decades, **comorbidity})
    predictors = {"female": female, "frailty": frailty, "age_decades": age_decades, "hfref": ef_class == 0,
                  "hfpef": ef_class == 2, **comorbidity}
    true_labs = {lab: _draw_true_value(rng, model, predictors, n) for lab, model in TRUE_LABS.items()}
    lvef_by_class = [rng.integers(low, high, n) for low, high in LVEF_RANGES]
    true_labs["lvef"] = np.choose(ef_class, lvef_by_class).astype(float)
    egfr = egfr_ckd_epi_2021(true_labs["creatinine"], age, female)

    prior_admissions = _draw_count(rng, PRIOR_ADMISSIONS_365D, predictors)
    ed_visits = _draw_count(rng, ED_VISITS_180D, predictors)
    older_admissions = _draw_count(rng, OLDER_ADMISSIONS, predictors)
    earlier_hf_gap = rng.integers(*EARLIER_HF_DAYS_BEFORE, n)
    earlier_hf = ((rng.random(n) < _probability(EARLIER_HF_HOSPITALISATION, predictors))
                  & (index_start - earlier_hf_gap < _days(STUDY_START)))
    los = _draw_true_value(rng, LENGTH_OF_STAY, predictors, n, centre=profile.los_median_days)
    los = np.clip(np.round(los), *LENGTH_OF_STAY_RANGE_DAYS).astype(np.int64)

    predictors.update(egfr_below_30=egfr < 30, age_over_88=age > 88, potassium_above_5=true_labs["potassium"] > 5.0)
    index_year = np.array(index_start, dtype="datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
    echo_recorded = ~_draw_lab_missing(rng, profile, "lvef", predictors)
    predictors["echo_recorded"] = echo_recorded
    on_drug, on_ras_or_arni = _draw_discharge_drugs(rng, profile, predictors, index_year)

    state = PatientState(
        age=age, female=female, frailty=frailty, prior_admissions_365d=prior_admissions,
        prior_hf_hospitalisation=earlier_hf,
        ed_visits_180d=ed_visits, los_days=los, comorbidity=comorbidity, ef_reduced=predictors["hfref"],
        **{lab: true_labs[lab] for lab in ("nt_probnp", "sodium", "potassium", "haemoglobin", "systolic_bp")},
        egfr=egfr, on_ras_or_arni=on_ras_or_arni, on_beta_blocker=on_drug["beta_blocker"],
        on_mra=on_drug["mra"], unrecorded_risk=rng.standard_normal(n),
    )
    # The site's own shifts: its base rate, its calendar years, its follow-up clinic (none recorded).
    site_shift = profile.readmission_logit_shift + _by_index_year(profile.calendar_logit_shift, index_year)
    if profile.follow_up_clinic > 0:
        site_shift = site_shift + FOLLOW_UP_CLINIC_LOG_OR * (rng.random(n) < profile.follow_up_clinic)
    readmission_risk = sigmoid(readmission_logit(state, site_shift, profile.risk_effect_scale))
    early_death_probability = _probability(EARLY_DEATH, predictors)
    return _Patients(
        state=state, age_decades=age_decades, birth=birth, index_start=index_start, index_end=index_start + los,
        older_admissions=older_admissions, earlier_hf_gap=np.where(earlier_hf, earlier_hf_gap, 0), true_labs=true_labs, on_drug=on_drug, echo_recorded=echo_recorded,
        readmission_risk=readmission_risk, early_death_probability=early_death_probability,
        true_risk=readmission_risk * (1 - early_death_probability * _DEATH_BEFORE_READMISSION),
    )


def _by_index_year(values: dict[int, float], index_year: np.ndarray) -> np.ndarray:
    """Return each patient's value for their index year (years outside the study window take its nearest
    year; years not listed are 0)."""
    table = np.array([values.get(year, 0.0) for year in range(STUDY_START.year, STUDY_END.year + 1)])
    return table[np.clip(index_year, STUDY_START.year, STUDY_END.year) - STUDY_START.year]


def _age_gamma(median: float, sd: float) -> tuple[float, float]:
    """Return the gamma shape and scale of AGE_OLDEST_YEARS - age for a given median and SD of age."""
    gap = AGE_OLDEST_YEARS - median
    if gap <= 0:
        raise ValueError(f"age_median must be below {AGE_OLDEST_YEARS} years, got {median}")
    # Gamma median ~ scale * (shape - 1/3) (Choi 1994); SD = sqrt(shape) * scale.
    # Solve gap = sd * (shape - 1/3) / sqrt(shape) for sqrt(shape).
    ratio = gap / sd
    root = (ratio + np.sqrt(ratio**2 + 4.0 / 3.0)) / 2.0
    shape = root**2
    return float(shape), float(sd / root)


def _draw_comorbidities(rng: np.random.Generator, profile: SiteProfile, frailty: np.ndarray,
                        age_decades: np.ndarray) -> dict[str, np.ndarray]:
    """Return whether each patient has each comorbidity, at the site's prevalences, co-occurring through frailty."""
    comorbidity = {}
    for name in COMORBIDITIES:
        loading, age_slope = COMORBIDITY_FRAILTY_LOADING[name], COMORBIDITY_AGE_SLOPE[name]
        shift = loading * frailty + age_slope * age_decades
        comorbidity[name] = _bernoulli_marginal(
            rng, profile.comorbidity_prevalence[name], shift, loading**2 + age_slope**2
        )
    return comorbidity


def _draw_ef_class(rng: np.random.Generator, profile: SiteProfile, predictors: dict[str, np.ndarray]) -> np.ndarray:
    """Return each patient's EF class (0 HFrEF, 1 HFmrEF, 2 HFpEF) near the site's shares, by phenotype."""
    n = predictors["female"].shape[0]
    expected = {"female": profile.female_fraction, "age_decades": (profile.age_median - AGE_CENTRE_YEARS) / AGE_DECADE_YEARS,
                **profile.comorbidity_prevalence}
    preserved = sum(effect * (predictors[name] - expected[name]) for name, effect in EF_PRESERVED_EFFECTS.items())
    shares = np.asarray(profile.ef_class_probs)
    scores = np.log(np.clip(shares, 1e-9, None) / max(shares[0], 1e-9))[:, None] + np.stack(
        [np.zeros(n), EF_MILDLY_REDUCED_FRACTION * preserved, preserved])
    probs = np.exp(scores - scores.max(axis=0))
    cumulative = np.cumsum(probs / probs.sum(axis=0), axis=0)
    return (rng.random(n) > cumulative[:-1]).sum(axis=0)


def _draw_discharge_drugs(rng: np.random.Generator, profile: SiteProfile, predictors: dict[str, np.ndarray],
                          index_year: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return who is prescribed each drug class at discharge, and who gets RAS inhibition or ARNI."""
    n = index_year.shape[0]
    on_ras_or_arni = rng.random(n) < _probability(DISCHARGE_DRUGS["ras_or_arni"], predictors)
    arni_share = profile.arni_share * ARNI_SHARE_FACTOR_HFREF * (predictors["hfref"] & predictors["echo_recorded"])
    arni = on_ras_or_arni & (rng.random(n) < arni_share) & (index_year >= ARNI_FIRST_YEAR)
    on_beta_blocker = rng.random(n) < _probability(DISCHARGE_DRUGS["beta_blocker"], predictors)
    on_mra = rng.random(n) < _probability(DISCHARGE_DRUGS["mra"], predictors)
    on_loop = rng.random(n) < _probability(DISCHARGE_DRUGS["loop_diuretic"], predictors)
    sglt2_rate = np.where(predictors["diabetes"], _by_index_year(SGLT2_DIABETES_RATE, index_year),
                          np.where(predictors["hfref"], _by_index_year(SGLT2_HFREF_RATE, index_year), 0.0))
    on_sglt2 = rng.random(n) < sglt2_rate
    on_drug = {
        "loop_diuretic": on_loop, "ace_inhibitor_or_arb": on_ras_or_arni & ~arni, "arni": arni,
        "beta_blocker": on_beta_blocker, "mra": on_mra, "sglt2_inhibitor": on_sglt2,
    }
    return on_drug, on_ras_or_arni


def _draw_course(rng: np.random.Generator, profile: SiteProfile, patients: _Patients) -> _Course:
    """Return how each index stay ends and which visits follow it, with their days after discharge."""
    n = patients.count
    ends = rng.random(n)
    p_death = _probability(IN_HOSPITAL_DEATH, {"frailty": patients.state.frailty}, rate=profile.in_hospital_death)
    died = ends < p_death
    transferred = ~died & (ends < p_death + profile.transfer_out)
    against_advice = ~died & ~transferred & (ends < p_death + profile.transfer_out + profile.against_advice)
    hf_main_diagnosis = rng.random(n) < profile.hf_main_diagnosis
    # Death within 30 days of discharge competes with readmission: a patient
    # who dies first is not readmitted (and has no later visit).
    early_death = ~died & (rng.random(n) < patients.early_death_probability)
    early_death_day = np.where(early_death, rng.integers(*EARLY_DEATH_DAYS, n), 0)
    readmission_day = 1 + np.floor(30 * rng.beta(*READMISSION_DAY_BETA, n)).astype(np.int64)
    readmitted = (~died & (rng.random(n) < patients.readmission_risk)
                  & (~early_death | (readmission_day < early_death_day)))
    alive = ~died & ~early_death
    later_admission = alive & ~readmitted & (rng.random(n) < LATER_ADMISSION_RATE)
    later_day = rng.integers(*LATER_ADMISSION_DAYS, n)
    planned = alive & (rng.random(n) < profile.planned_readmission)
    planned_day = rng.integers(*PLANNED_ADMISSION_DAYS, n)
    ed_after = alive & (rng.random(n) < ED_AFTER_DISCHARGE_RATE)
    ed_after_day = rng.integers(*ED_AFTER_DISCHARGE_DAYS, n)
    return _Course(died, early_death_day, transferred, against_advice, hf_main_diagnosis, follow_up={
        "readmission": (readmitted, readmission_day), "later_admission": (later_admission, later_day),
        "planned": (planned, planned_day), "ed_after": (ed_after, ed_after_day),
    })


def _draw_visits(rng: np.random.Generator, profile: SiteProfile, patients: _Patients, course: _Course,
                 id_base: np.int64) -> tuple[dict[str, np.ndarray], dict[str, _VisitGroup]]:
    """Return the visit rows and each kind of visit the site records: the index stay, visits before it
    and after discharge. Of the unplanned ones, only the site's `record_coverage` share reaches its record."""
    visit_log = _VisitLog(id_base)
    everyone = np.arange(patients.count)
    index_start, index_end = patients.index_start, patients.index_end
    discharged_to = np.select(
        [course.died, course.transferred, course.against_advice],
        [vocab.DISCHARGED_DIED, vocab.DISCHARGED_TRANSFER, vocab.DISCHARGED_AGAINST_ADVICE],
        vocab.DISCHARGED_HOME,
    ).astype(np.int32)
    visits = {"index": visit_log.add(everyone, vocab.VISIT_EMERGENCY_INPATIENT, index_start, index_end,
                                     vocab.ADMITTED_FROM_EMERGENCY_ROOM, discharged_to)}

    def add(kind: str, who: np.ndarray, concept: int, start: np.ndarray, end: np.ndarray, admitted_from: int,
            anywhere: bool = True) -> None:
        # An unplanned visit may happen at another hospital, outside the site's record.
        seen = _at_this_site(rng, who.shape[0], profile.record_coverage) if anywhere else slice(None)
        visits[kind] = visit_log.add(who[seen], concept, start[seen], end[seen], admitted_from, vocab.DISCHARGED_HOME)

    # Prior-year admissions end before the index stay starts.
    who = np.repeat(everyone, patients.state.prior_admissions_365d)
    gap = rng.integers(*PRIOR_ADMISSION_DAYS_BEFORE, who.shape[0])
    stay = np.minimum(1 + rng.poisson(STAY_EXTRA_DAYS_MEAN["prior_admission"], who.shape[0]), gap - 1)
    start = index_start[who] - gap
    add("prior_admission", who, vocab.VISIT_EMERGENCY_INPATIENT, start, start + stay, vocab.ADMITTED_FROM_EMERGENCY_ROOM)
    who = np.repeat(everyone, patients.older_admissions)
    start = index_start[who] - rng.integers(*OLDER_ADMISSION_DAYS_BEFORE, who.shape[0])
    end = start + 1 + rng.poisson(STAY_EXTRA_DAYS_MEAN["older_admission"], who.shape[0])
    add("older_admission", who, vocab.VISIT_EMERGENCY_INPATIENT, start, end, vocab.ADMITTED_FROM_EMERGENCY_ROOM)
    who = everyone[patients.earlier_hf_gap > 0]
    start = index_start[who] - patients.earlier_hf_gap[who]
    end = start + 1 + rng.poisson(STAY_EXTRA_DAYS_MEAN["earlier_hf"], who.shape[0])
    add("earlier_hf", who, vocab.VISIT_EMERGENCY_INPATIENT, start, end, vocab.ADMITTED_FROM_EMERGENCY_ROOM)
    who = np.repeat(everyone, patients.state.ed_visits_180d)
    start = index_start[who] - rng.integers(*ED_VISIT_DAYS_BEFORE, who.shape[0])
    add("ed_before", who, vocab.VISIT_EMERGENCY, start, start, vocab.ADMITTED_FROM_HOME)
    # Elective stays at this (referral) hospital: recorded, counted among prior admissions, no risk.
    who = (np.repeat(everyone, rng.poisson(profile.elective_admissions_365d, patients.count))
           if profile.elective_admissions_365d > 0 else everyone[:0])
    gap = rng.integers(*PRIOR_ADMISSION_DAYS_BEFORE, who.shape[0])
    stay = np.minimum(1 + rng.poisson(STAY_EXTRA_DAYS_MEAN["planned"], who.shape[0]), gap - 1)
    start = index_start[who] - gap
    add("elective_before", who, vocab.VISIT_INPATIENT, start, start + stay, vocab.ADMITTED_FROM_HOME, anywhere=False)

    for kind, (concept, admitted_from) in FOLLOW_UP_VISITS.items():
        happens, day = course.follow_up[kind]
        who = everyone[happens]
        start = index_end[who] + day[who]
        if kind in STAY_EXTRA_DAYS_MEAN:
            end = start + 1 + rng.poisson(STAY_EXTRA_DAYS_MEAN[kind], who.shape[0])
        else:
            end = start
        add(kind, who, concept, start, end, admitted_from, anywhere=kind != "planned")
    return visit_log.rows.concat(), visits


def _at_this_site(rng: np.random.Generator, n: int, coverage: float) -> np.ndarray:
    """Return which of n visits happen where the site's record sees them (all, without a draw, at coverage 1)."""
    return np.ones(n, bool) if coverage >= 1.0 else rng.random(n) < coverage


def _draw_deaths(rng: np.random.Generator, patients: _Patients, course: _Course,
                 visits: dict[str, _VisitGroup]) -> dict[str, np.ndarray]:
    """Return who dies and when: in hospital at discharge, or after their last visit."""
    n = patients.count
    last_event_end = patients.index_end.copy()
    for kind in FOLLOW_UP_VISITS:
        np.maximum.at(last_event_end, visits[kind].who, visits[kind].end)
    predictors = {"frailty": patients.state.frailty, "age_decades": patients.age_decades}
    early = course.early_death_day > 0
    dies_later = ~course.died & ~early & (rng.random(n) < _probability(LATER_DEATH, predictors))
    death_date = np.where(course.died, patients.index_end,
                          last_event_end + rng.integers(*LATER_DEATH_DAYS_AFTER, n))
    # A death within 30 days falls on its day, or at the end of a readmission that began before it.
    death_date = np.where(early, np.maximum(patients.index_end + course.early_death_day, last_event_end), death_date)
    has_death = course.died | early | dies_later
    return {"person": np.flatnonzero(has_death), "death_date": death_date[has_death]}


def _draw_conditions(rng: np.random.Generator, profile: SiteProfile, patients: _Patients, course: _Course,
                     visits: dict[str, _VisitGroup]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return the diagnosis rows (the index stay's, comorbidities, and every other visit's main diagnosis)
    and the main diagnoses of the planned stays, by kind (after discharge, elective before the index stay)."""
    diagnoses = _DiagnosisLog()
    diagnose = diagnoses.add
    n, index = patients.count, visits["index"]
    hf_weights = np.array([profile.hf_code_weights.get(code, 0.0) for code in vocab.HF_INDEX_CODES])
    hf_choice = np.searchsorted(np.cumsum(hf_weights / hf_weights.sum())[:-1], rng.random(n), side="right")
    hf_code = _HF_CODE_IDX[hf_choice.astype(np.int32)]
    # Index stay: main diagnosis heart failure, or another cause with heart failure secondary.
    comorbidity = patients.state.comorbidity
    other_main = _other_causes(rng, index.who, comorbidity)
    diagnose(index, vocab.CONDITION_PRIMARY, np.where(course.hf_main_diagnosis, hf_code, other_main))
    secondary = ~course.hf_main_diagnosis
    diagnose(index.subset(secondary), vocab.CONDITION_SECONDARY, hf_code[secondary])
    earlier_other_cause = (visits["prior_admission"], visits["older_admission"])
    history = (*earlier_other_cause, visits["earlier_hf"])
    female = patients.state.female
    for name in COMORBIDITIES:
        present = patients.state.comorbidity[name]
        coded = present & (rng.random(n) < profile.comorbidity_coding_completeness)
        diagnose(index.subset(coded), vocab.CONDITION_SECONDARY, _condition_codes_for(rng, name, female[coded]))
        # Coded at earlier admissions too, which a builder with a look-back finds.
        for group in history:
            completeness = HISTORY_CODING_FACTOR * profile.comorbidity_coding_completeness
            again = present[group.who] & (rng.random(group.who.shape[0]) < completeness)
            diagnose(group.subset(again), vocab.CONDITION_SECONDARY,
                     _condition_codes_for(rng, name, female[group.who[again]]))
    for group in earlier_other_cause:
        diagnose(group, vocab.CONDITION_PRIMARY, _other_causes(rng, group.who, comorbidity))
    # The earlier heart-failure stay, coded as the site codes the index stay (patients whose index stay is
    # coded otherwise stay out of the cohort anyway).
    diagnose(visits["earlier_hf"], vocab.CONDITION_PRIMARY, hf_code[visits["earlier_hf"].who])
    diagnose(visits["ed_before"], vocab.CONDITION_PRIMARY, _other_causes(rng, visits["ed_before"].who, comorbidity))
    prior = visits["prior_admission"]
    known_hf = rng.random(prior.who.shape[0]) < KNOWN_HF_AT_PRIOR_ADMISSION
    diagnose(prior.subset(known_hf), vocab.CONDITION_SECONDARY, np.int32(_HF_SECONDARY_IDX))
    planned_code = _diagnose_follow_up(rng, diagnoses, visits, hf_code, course.hf_main_diagnosis, female, comorbidity)
    elective = visits["elective_before"]
    elective_code = (_PLANNED_CODE_IDX[_pick(rng, elective.who.shape[0], _PLANNED_CODE_IDX.size)]
                     if elective.who.size else np.zeros(0, np.int32))
    diagnose(elective, vocab.CONDITION_PRIMARY, elective_code)
    return diagnoses.rows.concat(), {"planned": planned_code, "elective_before": elective_code}


def _diagnose_follow_up(rng: np.random.Generator, diagnoses: _DiagnosisLog, visits: dict[str, _VisitGroup],
                        hf_code: np.ndarray, hf_main_diagnosis: np.ndarray, female: np.ndarray,
                        comorbidity: dict[str, np.ndarray]) -> np.ndarray:
    """Add the main diagnoses of the visits after discharge (and the readmission's leakage trap); return the
    planned stays' main diagnoses (condition indices)."""
    # Patients whose index stay was not coded as heart failure stay out of the
    # cohort: their later stays are coded as other causes too.
    diagnose = diagnoses.add
    readmission, later = visits["readmission"], visits["later_admission"]
    hf = (rng.random(readmission.who.shape[0]) < HF_SHARE_OF_READMISSIONS) & hf_main_diagnosis[readmission.who]
    diagnose(readmission, vocab.CONDITION_PRIMARY,
             np.where(hf, hf_code[readmission.who], _other_causes(rng, readmission.who, comorbidity)))
    # A diagnosis first made at the readmission (leakage trap for the builder).
    diagnose(readmission, vocab.CONDITION_SECONDARY,
             _condition_codes_for(rng, "renal_failure", female[readmission.who]))
    hf = (rng.random(later.who.shape[0]) < HF_SHARE_OF_LATER_ADMISSIONS) & hf_main_diagnosis[later.who]
    diagnose(later, vocab.CONDITION_PRIMARY, np.where(hf, hf_code[later.who], _other_causes(rng, later.who, comorbidity)))
    planned = visits["planned"]
    planned_code = _PLANNED_CODE_IDX[_pick(rng, planned.who.shape[0], _PLANNED_CODE_IDX.size)]
    diagnose(planned, vocab.CONDITION_PRIMARY, planned_code)
    diagnose(visits["ed_after"], vocab.CONDITION_PRIMARY, _other_causes(rng, visits["ed_after"].who, comorbidity))
    return planned_code


def _draw_lab_missing(rng: np.random.Generator, profile: SiteProfile, lab: str,
                      predictors: dict[str, np.ndarray]) -> np.ndarray:
    """Return whether `lab` goes unrecorded at each index stay: the site's rate, more often for some patients."""
    n = predictors["frailty"].shape[0]
    missing_shift = _linear(0.0, LAB_MISSING_EFFECTS.get(lab, {}), predictors)
    return _bernoulli_marginal(rng, profile.lab_missing[lab], np.broadcast_to(missing_shift, (n,)),
                               LAB_MISSING_SHIFT_VARIANCE.get(lab, 0.0))


def _draw_measurements(rng: np.random.Generator, profile: SiteProfile, patients: _Patients,
                       visits: dict[str, _VisitGroup]) -> dict[str, np.ndarray]:
    """Return the lab rows, values rounded as reported: the index stay's, earlier admissions', the readmission's."""
    rows = _Events.empty(["person", "date", "visit", "lab", "value"])
    true_labs, n, index = patients.true_labs, patients.count, visits["index"]
    predictors = {"age_decades": patients.age_decades, "frailty": patients.state.frailty,
                  "dementia": patients.state.comorbidity["dementia"]}
    for lab_idx, lab in enumerate(_LAB_NAMES):
        lab_code = np.int32(lab_idx)
        # The echo was decided with the patient's drugs (ARNI needs a recorded reduced EF).
        measured = patients.echo_recorded if lab == "lvef" else ~_draw_lab_missing(rng, profile, lab, predictors)
        if lab == "lvef":
            echo_day = patients.index_start + np.minimum(rng.integers(0, ECHO_WITHIN_DAYS, n), patients.state.los_days)
            rows.add(person=index.who[measured], date=echo_day[measured], visit=index.ids[measured], lab=lab_code,
                     value=true_labs[lab][measured])
            continue
        admission_value = true_labs[lab] * ADMISSION_FACTOR[lab] * (1 + rng.normal(0, MEASUREMENT_CV[lab], n))
        rows.add(person=index.who[measured], date=index.start[measured], visit=index.ids[measured], lab=lab_code,
                 value=admission_value[measured])
        repeated = measured & (rng.random(n) < profile.lab_repeat_before_discharge)
        discharge_value = true_labs[lab] * (1 + rng.normal(0, MEASUREMENT_CV[lab], n))
        rows.add(person=index.who[repeated], date=index.end[repeated], visit=index.ids[repeated], lab=lab_code,
                 value=discharge_value[repeated])
    for lab in HISTORY_LABS:
        for group in (visits["prior_admission"], visits["older_admission"]):
            noise = 1 + rng.normal(0, HISTORY_CV_FACTOR * MEASUREMENT_CV[lab], group.who.shape[0])
            rows.add(person=group.who, date=group.start, visit=group.ids, lab=np.int32(_LAB_NAMES.index(lab)),
                     value=true_labs[lab][group.who] * noise)
    # At the readmission: congested again (leakage trap).
    readmission = visits["readmission"]
    for lab in READMISSION_LABS:
        congested = true_labs[lab][readmission.who] * ADMISSION_FACTOR[lab] ** 2
        rows.add(person=readmission.who, date=readmission.start, visit=readmission.ids,
                 lab=np.int32(_LAB_NAMES.index(lab)), value=congested)
    measurements = rows.concat()
    value = measurements["value"].copy()
    for lab_idx, lab in enumerate(_LAB_NAMES):
        of_lab = measurements["lab"] == lab_idx
        # Recorded as the site's assay reports it (its calibration against the true value).
        value[of_lab] = np.round(value[of_lab] * profile.lab_calibration.get(lab, 1.0), LAB_DECIMALS.get(lab, 0))
    return {**measurements, "value": value}


def _draw_prescriptions(rng: np.random.Generator, patients: _Patients, course: _Course,
                        visits: dict[str, _VisitGroup]) -> dict[str, np.ndarray]:
    """Return the prescription rows: at discharge, before the stay, and at the readmission."""
    rows = _Events.empty(["person", "start", "end", "visit", "code"])
    n, index = patients.count, visits["index"]
    alive = ~course.died
    for drug_class in _DRUG_CLASSES:
        on_drug = patients.on_drug[drug_class]
        gets = on_drug & alive
        rows.add(person=index.who[gets], start=index.end[gets], end=index.end[gets] + PRESCRIPTION_DAYS,
                 visit=index.ids[gets], code=_drug_codes_for(rng, drug_class, int(gets.sum())))
        # Some were on it before the stay (a prescription from an earlier admission).
        before = on_drug & (rng.random(n) < ON_DRUG_BEFORE_STAY)
        count = int(before.sum())
        start = index.start[before] - rng.integers(*DRUG_STARTED_DAYS_BEFORE, count)
        rows.add(person=index.who[before], start=start, end=start + PRESCRIPTION_DAYS, visit=np.full(count, -1),
                 code=_drug_codes_for(rng, drug_class, count))
    # Started at the readmission (leakage trap).
    readmission = visits["readmission"]
    rows.add(person=readmission.who, start=readmission.end, end=readmission.end + PRESCRIPTION_DAYS,
             visit=readmission.ids, code=_drug_codes_for(rng, "sglt2_inhibitor", readmission.who.shape[0]))
    return rows.concat()


# ---------------------------------------------------------------- OMOP tables
def _device_procedures(patients: _Patients, visits: dict[str, _VisitGroup],
                       planned_code: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the procedure rows: the device implanted at each planned device stay, on its first day."""
    rows = _Events.empty(["person", "date", "visit", "code"])
    for kind, code in planned_code.items():
        stays = visits[kind].subset(code == _CONDITION_INDEX[vocab.DEVICE_STAY_CODE])
        crt = patients.state.ef_reduced[stays.who]
        rows.add(person=stays.who, date=stays.start, visit=stays.ids,
                 code=np.where(crt, _PROCEDURE_CODES.index("FPE26"), _PROCEDURE_CODES.index("FPE20")).astype(np.int32))
    return rows.concat()


def _sorted(person: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(person, kind="stable")
    return [person[order]] + [a[order] for a in arrays]


def _person_table(person_id: np.ndarray, female: np.ndarray, birth: np.ndarray, site_code: int) -> pa.Table:
    n = person_id.shape[0]
    birth_dates = np.array(birth, dtype="datetime64[D]")
    birth_months = birth_dates.astype("datetime64[M]")
    year = birth_dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month = birth_months.astype(np.int64) % 12 + 1
    day = (birth_dates - birth_months).astype(np.int64) + 1
    return pa.table(
        [
            pa.array(person_id),
            pa.array(np.where(female, vocab.GENDER_FEMALE, vocab.GENDER_MALE).astype(np.int32)),
            pa.array(year.astype(np.int32)),
            pa.array(month.astype(np.int32)),
            pa.array(day.astype(np.int32)),
            pa.array(np.zeros(n, np.int32)),
            pa.array(np.zeros(n, np.int32)),
            pa.array(np.full(n, site_code, np.int64)),
        ],
        schema=omop.arrow_schema("person"),
    )


def _visit_table(visit_rows: dict[str, np.ndarray], person_id: np.ndarray, site_code: int) -> pa.Table:
    person, ids, concept, start, end, admitted_from, discharged_to = _sorted(
        visit_rows["person"], visit_rows["visit_occurrence_id"], visit_rows["visit_concept_id"],
        visit_rows["visit_start_date"], visit_rows["visit_end_date"], visit_rows["admitted_from_concept_id"],
        visit_rows["discharged_to_concept_id"],
    )
    n = person.shape[0]
    return pa.table(
        [
            pa.array(ids), pa.array(person_id[person]), pa.array(concept.astype(np.int32)),
            _dates(start), _dates(end), pa.array(np.full(n, vocab.TYPE_EHR, np.int32)),
            pa.array(np.full(n, site_code, np.int64)), pa.array(admitted_from.astype(np.int32)),
            pa.array(discharged_to.astype(np.int32)),
        ],
        schema=omop.arrow_schema("visit_occurrence"),
    )


def _condition_table(condition_rows: dict[str, np.ndarray], person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, date, status, visit, code = _sorted(
        condition_rows["person"], condition_rows["date"], condition_rows["status"], condition_rows["visit"],
        condition_rows["code"],
    )
    n = person.shape[0]
    return pa.table(
        [
            pa.array(id_base + np.arange(n, dtype=np.int64)), pa.array(person_id[person]),
            pa.array(np.zeros(n, np.int32)), _dates(date), pa.array(np.full(n, vocab.TYPE_EHR, np.int32)),
            pa.array(status.astype(np.int32)), pa.array(visit.astype(np.int64)),
            _dictionary(code, _CONDITION_CODES),
        ],
        schema=omop.arrow_schema("condition_occurrence", dictionary_codes=True),
    )


def _measurement_table(measurement_rows: dict[str, np.ndarray], person_id: np.ndarray,
                       id_base: np.int64) -> pa.Table:
    person, date, visit, lab, value = _sorted(
        measurement_rows["person"], measurement_rows["date"], measurement_rows["visit"], measurement_rows["lab"],
        measurement_rows["value"],
    )
    n = person.shape[0]
    return pa.table(
        [
            pa.array(id_base + np.arange(n, dtype=np.int64)), pa.array(person_id[person]),
            pa.array(np.zeros(n, np.int32)), _dates(date), pa.array(np.full(n, vocab.TYPE_EHR, np.int32)),
            pa.array(value), pa.array(visit.astype(np.int64)),
            _dictionary(lab, _LOINC_CODES), _dictionary(_UNIT_OF_LAB[lab], _UNITS),
        ],
        schema=omop.arrow_schema("measurement", dictionary_codes=True),
    )


def _procedure_table(procedure_rows: dict[str, np.ndarray], person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, date, visit, code = _sorted(procedure_rows["person"], procedure_rows["date"], procedure_rows["visit"],
                                        procedure_rows["code"])
    n = person.shape[0]
    return pa.table(
        [
            pa.array(id_base + np.arange(n, dtype=np.int64)), pa.array(person_id[person]),
            pa.array(np.zeros(n, np.int32)), _dates(date), pa.array(np.full(n, vocab.TYPE_EHR, np.int32)),
            pa.array(visit.astype(np.int64)), _dictionary(code, _PROCEDURE_CODES),
        ],
        schema=omop.arrow_schema("procedure_occurrence", dictionary_codes=True),
    )


def _drug_table(drug_rows: dict[str, np.ndarray], person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, start, end, visit, code = _sorted(
        drug_rows["person"], drug_rows["start"], drug_rows["end"], drug_rows["visit"], drug_rows["code"],
    )
    n = person.shape[0]
    visit_ids = pa.array(visit.astype(np.int64), mask=visit < 0)
    return pa.table(
        [
            pa.array(id_base + np.arange(n, dtype=np.int64)), pa.array(person_id[person]),
            pa.array(np.zeros(n, np.int32)), _dates(start), _dates(end),
            pa.array(np.full(n, vocab.TYPE_EHR_PRESCRIPTION, np.int32)), visit_ids,
            _dictionary(code, _DRUG_CODES),
        ],
        schema=omop.arrow_schema("drug_exposure", dictionary_codes=True),
    )


def _death_table(death_rows: dict[str, np.ndarray], person_id: np.ndarray) -> pa.Table:
    n = death_rows["person"].shape[0]
    return pa.table(
        [pa.array(person_id[death_rows["person"]]), _dates(death_rows["death_date"]),
         pa.array(np.full(n, vocab.TYPE_EHR, np.int32))],
        schema=omop.arrow_schema("death"),
    )


def true_risk(index_visit_ids: pd.Series | np.ndarray, ground_truth: pd.DataFrame) -> np.ndarray:
    """Return the generator's true 30-day risk of each index stay, in the given order."""
    rows = pd.DataFrame({"index_visit_id": np.asarray(index_visit_ids)})
    merged = rows.merge(ground_truth[["visit_occurrence_id", "true_risk_30d"]], left_on="index_visit_id",
                        right_on="visit_occurrence_id", how="left", validate="one_to_one")
    if merged["true_risk_30d"].isna().any():
        raise ValueError("some index stays have no ground truth: the cohort and the generator disagree")
    return merged["true_risk_30d"].to_numpy()


def chunk_sizes(patients: int) -> list[int]:
    """Return the patient count of each chunk for a site of `patients` patients."""
    full, rest = divmod(patients, CHUNK_PATIENTS)
    return [CHUNK_PATIENTS] * full + ([rest] if rest else [])


def generate_site(profile: SiteProfile, seed: int, out_dir: Path, progress: bool = True) -> Path:
    """Write one site's OMOP tables to `out_dir`/omop/*.parquet (atomically) and return that folder.

    The generator's ground truth (true risk of each designated index stay)
    goes to `out_dir`/ground_truth.parquet, outside the OMOP folder: it is
    what the oracle knows, not what a hospital records.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".omop-", dir=out_dir))
    try:
        omop_staging = staging / "omop"
        omop_staging.mkdir()
        writers = {
            table: pq.ParquetWriter(
                omop_staging / f"{table}.parquet",
                omop.arrow_schema(table, dictionary_codes=table in DICTIONARY_CODED_TABLES),
                **PARQUET_OPTIONS,
            )
            for table in omop.SCHEMAS
        }
        truth_writer = None
        sizes = chunk_sizes(profile.patients)
        # Writing chunk k overlaps generating chunk k+1 (pyarrow releases the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for chunk_index, size in enumerate(tqdm(sizes, desc=f"generate site {profile.site_code}", unit="chunk", disable=not progress)):
                chunk = generate_chunk(profile, seed, chunk_index, size)
                if pending is not None:
                    pending.result()
                if truth_writer is None:
                    truth_writer = pq.ParquetWriter(staging / GROUND_TRUTH_FILE, chunk.ground_truth.schema, **PARQUET_OPTIONS)
                pending = pool.submit(_write_chunk, writers, truth_writer, chunk)
            if pending is not None:
                pending.result()
        for writer in writers.values():
            writer.close()
        truth_writer.close()
        (staging / GROUND_TRUTH_FILE).replace(out_dir / GROUND_TRUTH_FILE)
        replace_folder(omop_staging, out_dir / "omop")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "omop"


def _write_chunk(writers: dict[str, pq.ParquetWriter], truth_writer: pq.ParquetWriter, chunk: ChunkTables) -> None:
    for table, writer in writers.items():
        writer.write_table(chunk.tables[table], row_group_size=max(1, chunk.tables[table].num_rows))
    truth_writer.write_table(chunk.ground_truth)
