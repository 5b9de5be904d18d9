"""Vectorised, chunked generation of one site's OMOP tables.

Patients are generated in fixed-size chunks, each with its own random stream
spawned from (seed, site code, chunk number): a chunk's patients do not
depend on how many chunks follow, so the first 1,000 patients of a 100,000
patient site are the same as those of a 1,000 patient site with the same
seed. Each chunk becomes one row group per table, sorted by person_id, and
is written before the next chunk is generated, so memory stays flat as the
site grows.

Generation follows each patient's true state (see `risk.PatientState`)
through the record: the index heart-failure stay, history before it
(admissions, emergency visits, diagnoses, labs), discharge prescriptions,
and what follows discharge (readmissions, planned admissions, emergency
visits, deaths). What follows discharge deliberately carries signal about
the label (labs and prescriptions at the readmission), so a cohort builder
that looks past the index discharge is caught by the tests.
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
PARQUET_OPTIONS = dict(compression="snappy", use_dictionary=True, write_statistics=True)

_EPOCH = dt.date(1970, 1, 1)


def _days(date: dt.date) -> int:
    return (date - _EPOCH).days


def _logit(p: float | np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _bernoulli_marginal(rng: np.random.Generator, prevalence: float, shift: np.ndarray, shift_var: float) -> np.ndarray:
    """Return Bernoulli draws whose marginal rate stays near `prevalence` despite a random shift."""
    # Logistic-normal approximation: scaling the base logit keeps the mean.
    base = _logit(prevalence) * np.sqrt(1.0 + 0.346 * shift_var)
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
_OTHER_CODE_IDX = np.array([_CONDITION_INDEX[c] for c in vocab.OTHER_ADMISSION_CODES], np.int32)
_PLANNED_CODE_IDX = np.array([_CONDITION_INDEX[c] for c in vocab.PLANNED_ADMISSION_CODES], np.int32)
_HF_SECONDARY_IDX = _CONDITION_INDEX["I50.9"]


def _condition_codes_for(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    codes = np.array([_CONDITION_INDEX[c] for c in vocab.COMORBIDITY_CODES[name]], np.int32)
    return codes[_pick(rng, n, codes.size)]


def _drug_codes_for(rng: np.random.Generator, drug_class: str, n: int) -> np.ndarray:
    codes = np.array([_DRUG_INDEX[c] for c in vocab.DRUG_ATC[drug_class][1]], np.int32)
    return codes[_pick(rng, n, codes.size)]


@dataclass
class ChunkTables:
    """One chunk of one site: the OMOP tables and the generator's ground truth."""

    tables: dict[str, pa.Table]
    ground_truth: pa.Table


def generate_chunk(profile: SiteProfile, seed: int, chunk_index: int, n_patients: int) -> ChunkTables:
    """Return the OMOP tables for patients chunk_index*CHUNK_PATIENTS .. + n_patients."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, profile.site_code, chunk_index]))
    n = n_patients
    first = chunk_index * CHUNK_PATIENTS
    person_id = np.int64(profile.site_code) * 1_000_000_000 + first + np.arange(n, dtype=np.int64)
    id_base = (np.int64(profile.site_code) << 40) + (np.int64(chunk_index) << 27)
    person_idx = np.arange(n)

    # --- who the patients are -------------------------------------------
    female = rng.random(n) < profile.female_fraction
    # Women with heart failure are older (national register); +2 years.
    age = np.clip(rng.normal(profile.age_median + 2.0 * (female - profile.female_fraction), profile.age_sd, n), 40, 104)
    frailty = rng.standard_normal(n)
    index_start = rng.integers(_days(STUDY_START), _days(STUDY_END) + 1, size=n)
    birth = index_start - np.floor(age * 365.25).astype(np.int64) - rng.integers(0, 365, size=n)
    birth_dates = np.array(birth, dtype="datetime64[D]")
    year_of_birth = birth_dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month_of_birth = birth_dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    day_of_birth = (birth_dates - birth_dates.astype("datetime64[M]")).astype(np.int64) + 1

    age_z = (age - 80.0) / 10.0
    comorbidity = {}
    for name in COMORBIDITIES:
        loading = 0.5 if name in ("renal_failure", "copd", "psychiatric", "dementia") else 0.3
        age_slope = {"dementia": 0.6, "atrial_fibrillation": 0.3, "cancer": 0.2, "psychiatric": -0.2}.get(name, 0.0)
        shift = loading * frailty + age_slope * age_z
        comorbidity[name] = _bernoulli_marginal(
            rng, profile.comorbidity_prevalence[name], shift, loading**2 + age_slope**2
        )
    renal = comorbidity["renal_failure"]

    # EF class; women more often preserved EF.
    probs = np.asarray(profile.ef_class_probs)
    ef_class = np.searchsorted(np.cumsum(probs)[:-1], rng.random(n), side="right")
    ef_class = np.where(female & (rng.random(n) < 0.12), 2, ef_class)
    ef_reduced = ef_class == 0

    # True values at index discharge (SwedeHF medians and IQRs).
    nt_probnp = np.exp(np.log(3500) + 0.45 * frailty + 0.35 * ef_reduced + 0.4 * renal
                       + 0.15 * age_z + rng.normal(0, 1.05, n))
    creatinine = np.exp(np.log(95) + 0.45 * renal + 0.08 * frailty - 0.12 * female + rng.normal(0, 0.26, n))
    egfr = egfr_ckd_epi_2021(creatinine, age, female)
    sodium = 140.0 - 0.9 * frailty + rng.normal(0, 2.6, n)
    potassium = 4.2 + 0.15 * renal + 0.05 * frailty + rng.normal(0, 0.42, n)
    haemoglobin = 130.0 - 7.0 * female - 5.0 * frailty - 8.0 * renal + rng.normal(0, 17, n)
    systolic_bp = 128.0 - 8.0 * ef_reduced - 4.0 * frailty + rng.normal(0, 19, n)
    lvef = np.select(
        [ef_class == 0, ef_class == 1],
        [rng.integers(15, 41, n), rng.integers(41, 50, n)],
        rng.integers(50, 71, n),
    )

    # Utilisation before the index stay.
    prior_adm = np.minimum(rng.poisson(np.exp(-0.75 + 0.55 * frailty + 0.25 * comorbidity["copd"] + 0.2 * renal)), 12)
    ed_visits = np.minimum(rng.poisson(np.exp(-0.45 + 0.5 * frailty + 0.3 * comorbidity["psychiatric"])), 15)
    old_adm = np.minimum(rng.poisson(np.exp(0.1 + 0.4 * frailty)), 15)
    los = np.clip(np.round(np.exp(np.log(profile.los_median_days) + 0.15 * frailty + rng.normal(0, 0.62, n))), 1, 60).astype(np.int64)
    index_end = index_start + los

    # Discharge prescriptions (SwedeHF rates; fewer RAS/MRA with poor renal function).
    index_year = np.array(index_start, dtype="datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
    on_ras_or_arni = rng.random(n) < sigmoid(_logit(0.80) - 1.0 * (egfr < 30) - 0.3 * (age > 88))
    arni = on_ras_or_arni & (rng.random(n) < profile.arni_share * np.where(ef_reduced, 1.6, 0.4)) & (index_year >= 2017)
    on_beta_blocker = rng.random(n) < 0.85
    on_mra = rng.random(n) < sigmoid(_logit(0.40) + 0.6 * ef_reduced - 1.0 * (egfr < 30) - 0.8 * (potassium > 5.0))
    on_loop = rng.random(n) < sigmoid(_logit(0.80) + 0.3 * frailty)
    sglt2_rate = np.select([index_year <= 2019, index_year == 2020], [0.08, 0.20], 0.35)
    on_sglt2 = rng.random(n) < np.clip(sglt2_rate + 0.15 * comorbidity["diabetes"], 0, 1)

    state = PatientState(
        age=age, female=female, frailty=frailty, prior_admissions_365d=prior_adm,
        ed_visits_180d=ed_visits, los_days=los, comorbidity=comorbidity, ef_reduced=ef_reduced,
        nt_probnp=nt_probnp, egfr=egfr, sodium=sodium, potassium=potassium,
        haemoglobin=haemoglobin, systolic_bp=systolic_bp, on_ras_or_arni=on_ras_or_arni,
        on_beta_blocker=on_beta_blocker, on_mra=on_mra, unrecorded_risk=rng.standard_normal(n),
    )
    true_risk = sigmoid(readmission_logit(state, profile.readmission_logit_shift))

    # How the index stay ends.
    u = rng.random(n)
    p_death = sigmoid(_logit(profile.in_hospital_death) + 0.6 * frailty)
    died = u < p_death
    transfer = ~died & (u < p_death + profile.transfer_out)
    against_advice = ~died & ~transfer & (u < p_death + profile.transfer_out + profile.against_advice)
    discharged_home = ~(died | transfer | against_advice)
    hf_main = rng.random(n) < profile.hf_main_diagnosis
    readmitted = ~died & (rng.random(n) < true_risk)
    # Days to readmission: 1..30, earlier days more likely.
    readmit_day = 1 + np.floor(30 * rng.beta(1.0, 1.6, n)).astype(np.int64)
    later_admission = ~died & ~readmitted & (rng.random(n) < 0.45)
    later_day = rng.integers(31, 366, n)
    planned = ~died & (rng.random(n) < profile.planned_readmission)
    planned_day = rng.integers(2, 31, n)
    ed_only = ~died & (rng.random(n) < 0.08)
    ed_only_day = rng.integers(1, 31, n)

    visits = _Events.empty([
        "visit_occurrence_id", "person", "visit_concept_id", "visit_start_date", "visit_end_date",
        "admitted_from_concept_id", "discharged_to_concept_id", "role",
    ])
    # role: 0 index, 1 prior admission, 2 older admission, 3 ED before, 4 readmission,
    # 5 later admission, 6 planned, 7 ED after
    def add_visits(who: np.ndarray, concept: int, start: np.ndarray, end: np.ndarray,
                   admitted_from: int, discharged_to: np.ndarray | int, role: int) -> np.ndarray:
        count = sum(part.shape[0] for part in visits.columns["person"])
        ids = id_base + count + np.arange(who.shape[0], dtype=np.int64)
        visits.add(visit_occurrence_id=ids, person=who, visit_concept_id=np.int32(concept),
                   visit_start_date=start, visit_end_date=end,
                   admitted_from_concept_id=np.int32(admitted_from),
                   discharged_to_concept_id=np.asarray(discharged_to, np.int32) if np.ndim(discharged_to) else np.int32(discharged_to),
                   role=np.int8(role))
        return ids

    discharged_to = np.select(
        [died, transfer, against_advice],
        [vocab.DISCHARGED_DIED, vocab.DISCHARGED_TRANSFER, vocab.DISCHARGED_AGAINST_ADVICE],
        vocab.DISCHARGED_HOME,
    ).astype(np.int32)
    index_visit = add_visits(person_idx, vocab.VISIT_EMERGENCY_INPATIENT, index_start, index_end,
                             vocab.ADMITTED_FROM_EMERGENCY_ROOM, discharged_to, 0)

    # Prior admissions within a year, ending before the index stay starts.
    who = np.repeat(person_idx, prior_adm)
    gap = rng.integers(2, 366, who.shape[0])
    stay = np.minimum(1 + rng.poisson(3.5, who.shape[0]), gap - 1)
    prior_start = index_start[who] - gap
    prior_visit = add_visits(who, vocab.VISIT_EMERGENCY_INPATIENT, prior_start, prior_start + stay,
                             vocab.ADMITTED_FROM_EMERGENCY_ROOM, vocab.DISCHARGED_HOME, 1)
    prior_who = who
    # Older admissions, 1 to HISTORY_YEARS years before.
    who = np.repeat(person_idx, old_adm)
    old_start = index_start[who] - rng.integers(366, 365 * HISTORY_YEARS, who.shape[0])
    old_visit = add_visits(who, vocab.VISIT_EMERGENCY_INPATIENT, old_start,
                           old_start + 1 + rng.poisson(3.0, who.shape[0]),
                           vocab.ADMITTED_FROM_EMERGENCY_ROOM, vocab.DISCHARGED_HOME, 2)
    old_who = who
    # Emergency visits without admission, within 180 days before.
    who = np.repeat(person_idx, ed_visits)
    ed_start = index_start[who] - rng.integers(1, 181, who.shape[0])
    ed_visit = add_visits(who, vocab.VISIT_EMERGENCY, ed_start, ed_start,
                          vocab.ADMITTED_FROM_HOME, vocab.DISCHARGED_HOME, 3)
    ed_who = who
    # After discharge.
    who = person_idx[readmitted]
    re_start = index_end[who] + readmit_day[who]
    re_end = re_start + 1 + rng.poisson(4.0, who.shape[0])
    readmit_visit = add_visits(who, vocab.VISIT_EMERGENCY_INPATIENT, re_start, re_end,
                               vocab.ADMITTED_FROM_EMERGENCY_ROOM, vocab.DISCHARGED_HOME, 4)
    readmit_who = who
    who = person_idx[later_admission]
    late_start = index_end[who] + later_day[who]
    late_end = late_start + 1 + rng.poisson(4.0, who.shape[0])
    late_visit = add_visits(who, vocab.VISIT_EMERGENCY_INPATIENT, late_start, late_end,
                            vocab.ADMITTED_FROM_EMERGENCY_ROOM, vocab.DISCHARGED_HOME, 5)
    late_who = who
    who = person_idx[planned]
    plan_start = index_end[who] + planned_day[who]
    plan_end = plan_start + 1 + rng.poisson(1.0, who.shape[0])
    planned_visit = add_visits(who, vocab.VISIT_INPATIENT, plan_start, plan_end,
                               vocab.ADMITTED_FROM_HOME, vocab.DISCHARGED_HOME, 6)
    planned_who = who
    who = person_idx[ed_only]
    ed_after_start = index_end[who] + ed_only_day[who]
    ed_after_visit = add_visits(who, vocab.VISIT_EMERGENCY, ed_after_start, ed_after_start,
                                vocab.ADMITTED_FROM_HOME, vocab.DISCHARGED_HOME, 7)
    ed_after_who = who
    v = visits.concat()

    # --- deaths ----------------------------------------------------------
    last_event_end = index_end.copy()
    for who_, end_ in ((readmit_who, re_end), (late_who, late_end), (planned_who, plan_end), (ed_after_who, ed_after_start)):
        np.maximum.at(last_event_end, who_, end_)
    dies_later = ~died & (rng.random(n) < sigmoid(_logit(0.15) + 0.7 * frailty + 0.4 * age_z))
    death_date = np.where(died, index_end, last_event_end + rng.integers(1, 366, n))
    has_death = died | dies_later
    death = {
        "person_id": person_id[has_death],
        "death_date": death_date[has_death],
    }

    # --- diagnoses ---------------------------------------------------------
    cond = _Events.empty(["person", "date", "status", "visit", "code"])
    hf_weights = np.array([profile.hf_code_weights.get(c, 0.0) for c in vocab.HF_INDEX_CODES])
    hf_code = np.searchsorted(np.cumsum(hf_weights / hf_weights.sum())[:-1], rng.random(n), side="right").astype(np.int32)
    hf_code_idx = np.array([_CONDITION_INDEX[c] for c in vocab.HF_INDEX_CODES], np.int32)[hf_code]
    other_main = _OTHER_CODE_IDX[_pick(rng, n, _OTHER_CODE_IDX.size)]
    # Index stay: main diagnosis HF (or another cause with HF secondary).
    cond.add(person=person_idx, date=index_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=index_visit,
             code=np.where(hf_main, hf_code_idx, other_main))
    sec = ~hf_main
    cond.add(person=person_idx[sec], date=index_start[sec], status=np.int32(vocab.CONDITION_SECONDARY),
             visit=index_visit[sec], code=hf_code_idx[sec])
    for name in COMORBIDITIES:
        present = comorbidity[name]
        coded = present & (rng.random(n) < profile.comorbidity_coding_completeness)
        cond.add(person=person_idx[coded], date=index_start[coded], status=np.int32(vocab.CONDITION_SECONDARY),
                 visit=index_visit[coded], code=_condition_codes_for(rng, name, int(coded.sum())))
        # Coded at earlier admissions too, which a builder with a look-back finds.
        for hist_who, hist_visit, hist_start in ((prior_who, prior_visit, prior_start), (old_who, old_visit, old_start)):
            again = present[hist_who] & (rng.random(hist_who.shape[0]) < 0.35 * profile.comorbidity_coding_completeness)
            cond.add(person=hist_who[again], date=hist_start[again], status=np.int32(vocab.CONDITION_SECONDARY),
                     visit=hist_visit[again], code=_condition_codes_for(rng, name, int(again.sum())))
    for hist_who, hist_visit, hist_start in ((prior_who, prior_visit, prior_start), (old_who, old_visit, old_start), (ed_who, ed_visit, ed_start)):
        cond.add(person=hist_who, date=hist_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=hist_visit,
                 code=_OTHER_CODE_IDX[_pick(rng, hist_who.shape[0], _OTHER_CODE_IDX.size)])
    known_hf = rng.random(prior_who.shape[0]) < 0.6
    cond.add(person=prior_who[known_hf], date=prior_start[known_hf], status=np.int32(vocab.CONDITION_SECONDARY),
             visit=prior_visit[known_hf], code=np.int32(_HF_SECONDARY_IDX))
    # After discharge: readmissions are heart failure in about 60% (CALIBRATION.md).
    # Patients whose index stay was not coded as heart failure stay out of the
    # cohort: their later stays are coded as other causes too.
    re_hf = (rng.random(readmit_who.shape[0]) < 0.6) & hf_main[readmit_who]
    cond.add(person=readmit_who, date=re_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=readmit_visit,
             code=np.where(re_hf, hf_code_idx[readmit_who], _OTHER_CODE_IDX[_pick(rng, readmit_who.shape[0], _OTHER_CODE_IDX.size)]))
    # A diagnosis first made at the readmission (leakage trap for the builder).
    cond.add(person=readmit_who, date=re_start, status=np.int32(vocab.CONDITION_SECONDARY), visit=readmit_visit,
             code=_condition_codes_for(rng, "renal_failure", readmit_who.shape[0]))
    late_hf = (rng.random(late_who.shape[0]) < 0.5) & hf_main[late_who]
    cond.add(person=late_who, date=late_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=late_visit,
             code=np.where(late_hf, hf_code_idx[late_who], _OTHER_CODE_IDX[_pick(rng, late_who.shape[0], _OTHER_CODE_IDX.size)]))
    cond.add(person=planned_who, date=plan_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=planned_visit,
             code=_PLANNED_CODE_IDX[_pick(rng, planned_who.shape[0], _PLANNED_CODE_IDX.size)])
    cond.add(person=ed_after_who, date=ed_after_start, status=np.int32(vocab.CONDITION_PRIMARY), visit=ed_after_visit,
             code=_OTHER_CODE_IDX[_pick(rng, ed_after_who.shape[0], _OTHER_CODE_IDX.size)])
    c = cond.concat()

    # --- measurements --------------------------------------------------------
    meas = _Events.empty(["person", "date", "visit", "lab", "value"])
    true_values = {
        "nt_probnp": nt_probnp, "creatinine": creatinine, "sodium": sodium, "potassium": potassium,
        "haemoglobin": haemoglobin, "systolic_bp": systolic_bp, "lvef": lvef.astype(float),
    }
    # At admission patients are congested: NT-proBNP higher, sodium lower.
    admission_shift = {"nt_probnp": 1.45, "creatinine": 1.05, "sodium": 0.995, "potassium": 1.0,
                       "haemoglobin": 1.02, "systolic_bp": 1.08, "lvef": 1.0}
    for lab_idx, lab in enumerate(_LAB_NAMES):
        measured = rng.random(n) >= profile.lab_missing[lab]
        if lab == "lvef":
            echo_day = index_start + np.minimum(rng.integers(0, 4, n), los)
            meas.add(person=person_idx[measured], date=echo_day[measured], visit=index_visit[measured],
                     lab=np.int32(lab_idx), value=true_values[lab][measured])
            continue
        noise = rng.normal(0, 0.06, n)
        admission_value = true_values[lab] * admission_shift[lab] * (1 + noise)
        meas.add(person=person_idx[measured], date=index_start[measured], visit=index_visit[measured],
                 lab=np.int32(lab_idx), value=admission_value[measured])
        repeated = measured & (rng.random(n) < profile.lab_repeat_before_discharge)
        discharge_value = true_values[lab] * (1 + rng.normal(0, 0.03, n))
        meas.add(person=person_idx[repeated], date=index_end[repeated], visit=index_visit[repeated],
                 lab=np.int32(lab_idx), value=discharge_value[repeated])
    # History: creatinine and haemoglobin at earlier admissions.
    for lab in ("creatinine", "haemoglobin"):
        lab_idx = _LAB_NAMES.index(lab)
        for hist_who, hist_visit, hist_start in ((prior_who, prior_visit, prior_start), (old_who, old_visit, old_start)):
            meas.add(person=hist_who, date=hist_start, visit=hist_visit, lab=np.int32(lab_idx),
                     value=true_values[lab][hist_who] * (1 + rng.normal(0, 0.1, hist_who.shape[0])))
    # At the readmission: congested again (leakage trap).
    for lab in ("nt_probnp", "sodium"):
        lab_idx = _LAB_NAMES.index(lab)
        meas.add(person=readmit_who, date=re_start, visit=readmit_visit, lab=np.int32(lab_idx),
                 value=true_values[lab][readmit_who] * admission_shift[lab] ** 2)
    m = meas.concat()
    decimals = {"potassium": 1}
    lab_of_row = m["lab"]
    value = m["value"].copy()
    for lab_idx, lab in enumerate(_LAB_NAMES):
        rows = lab_of_row == lab_idx
        value[rows] = np.round(value[rows], decimals.get(lab, 0))

    # --- prescriptions -----------------------------------------------------------
    drugs = _Events.empty(["person", "start", "end", "visit", "code"])
    on_drug = {
        "loop_diuretic": on_loop, "ace_inhibitor_or_arb": on_ras_or_arni & ~arni, "arni": arni,
        "beta_blocker": on_beta_blocker, "mra": on_mra, "sglt2_inhibitor": on_sglt2,
    }
    alive = ~died
    for drug_class in _DRUG_CLASSES:
        gets = on_drug[drug_class] & alive
        k = int(gets.sum())
        drugs.add(person=person_idx[gets], start=index_end[gets], end=index_end[gets] + 90,
                  visit=index_visit[gets], code=_drug_codes_for(rng, drug_class, k))
        # Some were on it before the stay (a prescription from an earlier admission).
        before = on_drug[drug_class] & (rng.random(n) < 0.5)
        start = index_start[before] - rng.integers(30, 300, int(before.sum()))
        drugs.add(person=person_idx[before], start=start, end=start + 90, visit=np.full(int(before.sum()), -1),
                  code=_drug_codes_for(rng, drug_class, int(before.sum())))
    # Started at the readmission (leakage trap).
    drugs.add(person=readmit_who, start=re_end, end=re_end + 90, visit=readmit_visit,
              code=_drug_codes_for(rng, "sglt2_inhibitor", readmit_who.shape[0]))
    d = drugs.concat()

    tables = {
        "person": _person_table(person_id, female, year_of_birth, month_of_birth, day_of_birth, profile.site_code),
        "visit_occurrence": _visit_table(v, person_id, profile.site_code),
        "condition_occurrence": _condition_table(c, person_id, id_base),
        "measurement": _measurement_table(m, value, person_id, id_base),
        "drug_exposure": _drug_table(d, person_id, id_base),
        "death": pa.table(
            [pa.array(death["person_id"]), _dates(death["death_date"]),
             pa.array(np.full(death["person_id"].shape[0], vocab.TYPE_EHR, np.int32))],
            schema=omop.arrow_schema("death"),
        ),
    }
    ground_truth = pa.table({
        "person_id": pa.array(person_id),
        "visit_occurrence_id": pa.array(index_visit),
        "true_risk_30d": pa.array(true_risk),
    })
    return ChunkTables(tables=tables, ground_truth=ground_truth)


def _sorted(person: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(person, kind="stable")
    return [person[order]] + [a[order] for a in arrays]


def _person_table(person_id, female, year, month, day, site_code) -> pa.Table:
    n = person_id.shape[0]
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


def _visit_table(v: dict[str, np.ndarray], person_id: np.ndarray, site_code: int) -> pa.Table:
    person, ids, concept, start, end, adm, dis = _sorted(
        v["person"], v["visit_occurrence_id"], v["visit_concept_id"], v["visit_start_date"],
        v["visit_end_date"], v["admitted_from_concept_id"], v["discharged_to_concept_id"],
    )
    n = person.shape[0]
    return pa.table(
        [
            pa.array(ids), pa.array(person_id[person]), pa.array(concept.astype(np.int32)),
            _dates(start), _dates(end), pa.array(np.full(n, vocab.TYPE_EHR, np.int32)),
            pa.array(np.full(n, site_code, np.int64)), pa.array(adm.astype(np.int32)),
            pa.array(dis.astype(np.int32)),
        ],
        schema=omop.arrow_schema("visit_occurrence"),
    )


def _condition_table(c: dict[str, np.ndarray], person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, date, status, visit, code = _sorted(c["person"], c["date"], c["status"], c["visit"], c["code"])
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


def _measurement_table(m: dict[str, np.ndarray], value: np.ndarray, person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, date, visit, lab, value = _sorted(m["person"], m["date"], m["visit"], m["lab"], value)
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


def _drug_table(d: dict[str, np.ndarray], person_id: np.ndarray, id_base: np.int64) -> pa.Table:
    person, start, end, visit, code = _sorted(d["person"], d["start"], d["end"], d["visit"], d["code"])
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
                omop.arrow_schema(table, dictionary_codes=table in ("condition_occurrence", "measurement", "drug_exposure")),
                **PARQUET_OPTIONS,
            )
            for table in omop.TABLE_NAMES
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
