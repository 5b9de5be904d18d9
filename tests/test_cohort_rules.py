"""The cohort builder's rules, one by one, on tiny hand-written OMOP folders.

Every expected value below is worked out by hand from the rows a test
writes (see tests/omop_fixture.py for the defaults: a woman born 1940-06-15,
heart-failure stay 2019-03-04 to 2019-03-10, admitted from the emergency
room, discharged home). Each folder also holds the two `anchors()` (persons
901 and 902, one readmitted), because a cohort needs both outcomes.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_synth import cohort
from data_synth.cohort import CohortSpec, assign_split, build_cohort, lace_score, write_cohort
from data_synth.features import ATTRITION_FILE, COHORT_FILE, FEATURE_NAMES, LABEL
from omop_fixture import (ADMIT, AGAINST_ADVICE, DIED, DISCHARGE, ER_AND_INPATIENT, ER_ONLY, FROM_ER, FROM_HOME,
                          INPATIENT, OUTPATIENT, TRANSFER, Patient, after_discharge, anchors, before_admit, hf_patient,
                          index_visit_id, write_patients)

SITE = "testsite"


def build(tmp_path, *patients: Patient, spec: CohortSpec = CohortSpec()) -> tuple[pd.DataFrame, dict]:
    """Return the cohort (indexed by person_id, anchors included) and the attrition as a dict."""
    omop_dir = write_patients(tmp_path, *patients, *anchors())
    frame, attrition = build_cohort(omop_dir, spec, SITE, progress=False)
    return frame.set_index("person_id", drop=False), asdict(attrition)


def attrition(**counts) -> dict:
    """Return an attrition dict: every count 0 unless given."""
    return {**{name: 0 for name in asdict(cohort.Attrition()) if name != "extra"}, "extra": {}, **counts}


# ---------------------------------------------------------------- index stay
def test_index_stay_is_an_inpatient_stay_with_heart_failure_as_main_diagnosis_in_the_window(tmp_path):
    inpatient = hf_patient(1)
    er_inpatient = hf_patient(2, concept=ER_AND_INPATIENT)
    secondary_only = hf_patient(3, hf_code="J18.9")  # pneumonia is the main diagnosis ...
    secondary_only.diagnosis("I50.9", ADMIT, index_visit_id(secondary_only))  # ... HF only secondary
    before_window = hf_patient(4, dt.date(2015, 12, 31), dt.date(2016, 1, 6))  # discharged inside, admitted before
    after_window = hf_patient(5, dt.date(2022, 1, 1), dt.date(2022, 1, 5))
    first_day = hf_patient(6, dt.date(2016, 1, 1), dt.date(2016, 1, 5))
    last_day = hf_patient(7, dt.date(2021, 12, 31), dt.date(2022, 1, 4))
    two_stays = hf_patient(8)
    second_stay = two_stays.visit(after_discharge(60), after_discharge(65), main_diagnosis="I50.1")
    hypertensive_hf = hf_patient(9, hf_code="I13.2")  # exact-code HF diagnosis
    hypertensive_no_hf = hf_patient(10, hf_code="I11.9")  # I11.9: without heart failure
    outpatient = hf_patient(11, concept=OUTPATIENT)
    patients = [inpatient, er_inpatient, secondary_only, before_window, after_window, first_day, last_day,
                two_stays, hypertensive_hf, hypertensive_no_hf, outpatient]

    frame, counts = build(tmp_path, *patients)

    assert sorted(frame.index) == [1, 2, 6, 7, 8, 9, 901, 902]
    assert frame.loc[8, "index_visit_id"] == index_visit_id(two_stays) != second_stay
    assert frame.loc[8, "index_admission_date"] == (ADMIT - dt.date(1970, 1, 1)).days
    assert frame.loc[6, "index_admission_date"] == (dt.date(2016, 1, 1) - dt.date(1970, 1, 1)).days
    # 11 persons + 2 anchors; stays in window: 1, 2, 6, 7, 8 (twice), 9 and the anchors.
    assert counts == attrition(persons=13, hf_index_stays_in_window=9, patients_with_index_stay=8,
                               index_stays_considered=8, cohort=8, readmitted_30d=1)


def test_every_heart_failure_stay_is_an_index_when_not_one_per_patient(tmp_path):
    patient = hf_patient(1)
    patient.lab("sodium", 130.0, DISCHARGE)
    second = patient.visit(after_discharge(100), after_discharge(105), main_diagnosis="I50.9")
    patient.lab("sodium", 140.0, after_discharge(105))
    patient.visit(after_discharge(110))  # 5 days after the second stay
    omop_dir = write_patients(tmp_path, patient, *anchors())
    frame, counts = build_cohort(omop_dir, CohortSpec(one_index_per_patient=False), SITE, progress=False)
    stays = frame[frame["person_id"] == 1].set_index("index_visit_id")
    columns = ["sodium", "prior_admissions_365d", LABEL]
    assert stays.loc[index_visit_id(patient), columns].tolist() == [130.0, 0, 0]
    assert stays.loc[second, columns].tolist() == [140.0, 1, 1]  # its own stay, the first as a prior admission
    assert (counts.index_stays_considered, counts.patients_with_index_stay, counts.cohort) == (4, 3, 4)


# ---------------------------------------------------------------- exclusions
def test_each_exclusion_is_counted_once_in_the_attrition(tmp_path):
    spec = CohortSpec(followup_end=dt.date(2022, 1, 31))
    child = hf_patient(1, born=dt.date(2005, 1, 1))  # 14 at admission
    died_discharge_code = hf_patient(2, discharged_to=DIED)
    died_on_discharge_day = hf_patient(3)  # "discharged home" but a death date on the discharge day
    died_on_discharge_day.died(DISCHARGE)
    died_later = hf_patient(4)  # died after discharge: stays in the cohort
    died_later.died(after_discharge(3))
    transfer = hf_patient(5, discharged_to=TRANSFER)
    against_advice = hf_patient(6, discharged_to=AGAINST_ADVICE)
    # Follow-up ends 2022-01-31: discharge + 30 days must not pass it.
    short_followup = hf_patient(7, dt.date(2021, 12, 20), dt.date(2022, 1, 2))
    just_enough_followup = hf_patient(8, dt.date(2021, 12, 20), dt.date(2022, 1, 1))
    child_transferred = hf_patient(9, born=dt.date(2006, 1, 1), discharged_to=TRANSFER)  # first rule wins
    patients = [child, died_discharge_code, died_on_discharge_day, died_later, transfer, against_advice,
                short_followup, just_enough_followup, child_transferred]

    frame, counts = build(tmp_path, *patients, spec=spec)

    assert sorted(frame.index) == [4, 8, 901, 902]
    assert counts == attrition(persons=11, hf_index_stays_in_window=11, patients_with_index_stay=11,
                               index_stays_considered=11, excluded_under_18=2, excluded_died_in_hospital=2,
                               excluded_transfer_out=1, excluded_against_advice=1, excluded_short_followup=1,
                               cohort=4, readmitted_30d=1)


def test_death_during_the_stay_excludes_even_when_discharged_home(tmp_path):
    died_mid_stay = hf_patient(1)
    died_mid_stay.died(ADMIT + dt.timedelta(days=2))
    frame, counts = build(tmp_path, died_mid_stay)
    assert 1 not in frame.index
    assert counts["excluded_died_in_hospital"] == 1


def test_under_18_means_before_the_18th_birthday(tmp_path):
    eighteenth_birthday = hf_patient(1, born=dt.date(2001, 3, 4))  # ADMIT is 2019-03-04
    day_before_birthday = hf_patient(2, born=dt.date(2001, 3, 5))
    frame, counts = build(tmp_path, eighteenth_birthday, day_before_birthday)
    assert 1 in frame.index and frame.loc[1, "age"] == 18
    assert 2 not in frame.index
    assert counts["excluded_under_18"] == 1


# ---------------------------------------------------------------- label
def test_readmission_label_counts_unplanned_inpatient_admissions_on_days_1_to_30(tmp_path):
    cases = {
        # person: (visit start, visit concept, admitted from, expected label)
        1: (after_discharge(30), INPATIENT, FROM_ER, 1),
        2: (after_discharge(31), INPATIENT, FROM_ER, 0),
        3: (after_discharge(0), INPATIENT, FROM_ER, 0),
        4: (after_discharge(1), INPATIENT, FROM_ER, 1),
        5: (after_discharge(10), INPATIENT, FROM_HOME, 0),  # planned
        6: (after_discharge(10), ER_ONLY, None, 0),  # emergency room only, sent home
        7: (after_discharge(10), ER_AND_INPATIENT, None, 1),
        8: (after_discharge(10), OUTPATIENT, None, 0),
    }
    patients = []
    for person_id, (start, concept, admitted_from, _) in cases.items():
        patient = hf_patient(person_id)
        patient.visit(start, start + dt.timedelta(days=2), concept=concept, admitted_from=admitted_from)
        patients.append(patient)

    frame, counts = build(tmp_path, *patients)

    assert {p: int(frame.loc[p, LABEL]) for p in cases} == {p: case[-1] for p, case in cases.items()}
    assert counts["readmitted_30d"] == 3 + 1  # persons 1, 4, 7 and anchor 901
    assert counts["cohort"] == 8 + 2


def test_a_second_heart_failure_stay_within_30_days_is_the_readmission_not_a_new_index(tmp_path):
    patient = hf_patient(1)
    patient.visit(after_discharge(12), after_discharge(20), main_diagnosis="I50.9")
    frame, counts = build(tmp_path, patient)
    assert frame.loc[1, "index_visit_id"] == index_visit_id(patient)
    assert frame.loc[1, LABEL] == 1
    assert counts["hf_index_stays_in_window"] == 2 + 2 and counts["cohort"] == 1 + 2


# ---------------------------------------------------------------- features
def _stay_records(patient: Patient) -> Patient:
    """Give `patient` the same diagnoses, labs and drugs of the index stay."""
    stay = index_visit_id(patient)
    patient.diagnosis("E11.9", ADMIT, stay)  # diabetes
    patient.lab("nt_probnp", 4200.0, DISCHARGE)
    patient.lab("creatinine", 110.0, DISCHARGE)
    patient.drug("C03CA01", ADMIT, after_discharge(90))  # furosemide
    return patient


def test_records_dated_after_discharge_do_not_change_the_features(tmp_path):
    with_later_records = _stay_records(hf_patient(1))
    without = _stay_records(hf_patient(2))
    readmission = with_later_records.visit(after_discharge(5), after_discharge(9), main_diagnosis="J44.1")  # COPD
    with_later_records.diagnosis("N18.4", after_discharge(5), readmission)  # renal failure
    with_later_records.diagnosis("F32.9", after_discharge(40))  # depression, no visit
    with_later_records.lab("nt_probnp", 9800.0, after_discharge(5))
    with_later_records.lab("creatinine", 310.0, after_discharge(6))
    with_later_records.drug("A10BK01", after_discharge(9), after_discharge(99))  # SGLT2 started later
    with_later_records.drug("C03DA01", after_discharge(1), after_discharge(60))  # MRA from the day after

    frame, _ = build(tmp_path, with_later_records, without)

    features = [*FEATURE_NAMES, "lace_score"]
    pd.testing.assert_series_equal(frame.loc[1, features], frame.loc[2, features], check_names=False)
    assert (frame.loc[1, LABEL], frame.loc[2, LABEL]) == (1, 0)  # the later stay is the label, not a feature
    row = frame.loc[1]
    assert (row["diabetes"], row["copd"], row["renal_failure"], row["psychiatric"]) == (1, 0, 0, 0)
    assert (row["nt_probnp"], row["creatinine"]) == (4200.0, 110.0)
    assert (row["on_loop_diuretic"], row["on_sglt2_inhibitor"], row["on_mra"]) == (1, 0, 0)


def test_lab_feature_is_the_last_value_of_the_stay(tmp_path):
    patient = hf_patient(1)
    patient.lab("sodium", 120.0, before_admit(3))  # before the stay: ignored
    patient.lab("sodium", 130.0, ADMIT)
    patient.lab("sodium", 138.0, DISCHARGE)
    patient.lab("sodium", 134.0, ADMIT + dt.timedelta(days=3))  # written out of date order
    patient.lab("sodium", 150.0, after_discharge(1))  # after: ignored
    patient.lab("potassium", 4.1, ADMIT)
    patient.lab("potassium", None, DISCHARGE)  # no value: skipped
    patient.lab("haemoglobin", 101.0, before_admit(1))  # only before the stay
    frame, _ = build(tmp_path, patient)
    assert frame.loc[1, "sodium"] == 138.0
    assert frame.loc[1, "potassium"] == 4.1
    assert np.isnan(frame.loc[1, "haemoglobin"])
    assert np.isnan(frame.loc[1, "lvef"])


def test_drugs_count_when_active_on_the_discharge_date(tmp_path):
    patient = hf_patient(1)
    patient.drug("C03CA01", ADMIT, after_discharge(90))  # loop diuretic, continued
    patient.drug("C07AB07", before_admit(100), DISCHARGE - dt.timedelta(days=1))  # beta blocker stopped in hospital
    patient.drug("C03DA01", DISCHARGE, after_discharge(90))  # MRA started on the discharge day
    patient.drug("A10BK01", before_admit(60), DISCHARGE)  # SGLT2 inhibitor ending on the discharge day
    patient.drug("C09DX04", ADMIT, after_discharge(90))  # sacubitril/valsartan (ARNI)
    ace_patient = hf_patient(2)
    ace_patient.drug("C09AA05", ADMIT, after_discharge(90))  # ramipril
    frame, _ = build(tmp_path, patient, ace_patient)
    drugs = ["on_loop_diuretic", "on_beta_blocker", "on_mra", "on_sglt2_inhibitor", "on_arni",
             "on_ace_inhibitor_or_arb"]
    assert frame.loc[1, drugs].tolist() == [1, 0, 1, 1, 1, 0]
    assert frame.loc[2, drugs].tolist() == [0, 0, 0, 0, 0, 1]


def test_diagnoses_count_from_the_look_back_window_up_to_discharge(tmp_path):
    patient = hf_patient(1)
    patient.diagnosis("I10", before_admit(5 * 365))  # hypertension, first day of the look-back
    patient.diagnosis("C50.9", before_admit(5 * 365 + 1))  # cancer, one day too early
    patient.diagnosis("I48.0", DISCHARGE)  # atrial fibrillation, on the discharge day
    patient.diagnosis("J44.9", after_discharge(1))  # COPD, the day after
    frame, _ = build(tmp_path, patient)
    row = frame.loc[1]
    assert (row["hypertension"], row["cancer"], row["atrial_fibrillation"], row["copd"]) == (1, 0, 1, 0)


def test_prior_admissions_and_emergency_visits_count_in_their_windows(tmp_path):
    patient = hf_patient(1)
    for days in (1, 200, 365):  # counted
        patient.visit(before_admit(days), before_admit(days) + dt.timedelta(days=1),
                      concept=ER_AND_INPATIENT if days == 200 else INPATIENT)
    patient.visit(before_admit(366), before_admit(360))  # one day too early
    for days in (1, 180, 181):  # emergency-room visits: 1 and 180 count, 181 does not
        patient.visit(before_admit(days), concept=ER_ONLY, admitted_from=None)
    patient.visit(before_admit(30), concept=OUTPATIENT, admitted_from=None)  # neither
    patient.visit(after_discharge(50), concept=ER_ONLY, admitted_from=None)  # after: neither
    patient.visit(after_discharge(60))  # after: neither
    frame, _ = build(tmp_path, patient)
    assert frame.loc[1, "prior_admissions_365d"] == 3
    assert frame.loc[1, "ed_visits_180d"] == 2


def test_an_earlier_heart_failure_stay_counts_when_an_inpatient_main_diagnosis_in_the_look_back(tmp_path):
    counted = hf_patient(1)
    counted.visit(before_admit(5 * 365), before_admit(5 * 365 - 3), main_diagnosis="I50.1")  # first look-back day
    too_early = hf_patient(2)
    too_early.visit(before_admit(5 * 365 + 1), before_admit(5 * 365 - 2), main_diagnosis="I50.9")
    secondary = hf_patient(3)
    pneumonia = secondary.visit(before_admit(900), before_admit(895))  # heart failure only as a secondary code
    secondary.diagnosis("I50.9", before_admit(900), pneumonia)
    emergency_only = hf_patient(4)
    emergency_only.visit(before_admit(800), concept=ER_ONLY, admitted_from=None, main_diagnosis="I50.9")
    no_code_dot = hf_patient(5)
    no_code_dot.visit(before_admit(1200), before_admit(1196), main_diagnosis="I110")  # I11.0 as Swedish systems store it
    frame, _ = build(tmp_path, counted, too_early, secondary, emergency_only, no_code_dot)
    patients = (counted, too_early, secondary, emergency_only, no_code_dot)
    rows = frame.loc[[patient.person_id for patient in patients]]
    assert rows["prior_hf_hospitalisation"].tolist() == [1, 0, 0, 0, 1]
    assert rows["index_visit_id"].tolist() == [index_visit_id(patient) for patient in patients]  # still the index


# ---------------------------------------------------------------- scores
def test_lace_score_points():
    # L: <1 d 0, 1 d 1, 2 d 2, 3 d 3, 4-6 d 4, 7-13 d 5, >=14 d 7; A: acute 3;
    # C: Charlson 0-3 as is, >=4 gives 5; E: ED visits, at most 4.
    los = [0, 1, 2, 3, 4, 6, 7, 13, 14, 40]
    assert lace_score(los, np.zeros(10), np.zeros(10), np.zeros(10)).tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 7, 7]
    charlson = [0, 1, 2, 3, 4, 9]
    assert lace_score(np.zeros(6), np.zeros(6), charlson, np.zeros(6)).tolist() == [0, 1, 2, 3, 5, 5]
    ed = [0, 1, 3, 4, 9]
    assert lace_score(np.zeros(5), np.ones(5), np.zeros(5), ed).tolist() == [3, 4, 6, 7, 7]
    # 5 days (4) + acute (3) + Charlson 2 (2) + 1 ED visit (1) = 10; 14 days (7) + 3 + Charlson 6 (5) + 6 ED (4) = 19
    assert lace_score([5, 14], [True, True], [2, 6], [1, 6]).tolist() == [10, 19]


def test_cohort_lace_score_and_charlson_index(tmp_path):
    patient = hf_patient(1)  # 6-day stay
    patient.diagnosis("E11.9", before_admit(400))  # diabetes: Charlson 1
    patient.diagnosis("N18.4", ADMIT, index_visit_id(patient))  # renal failure: Charlson 2
    patient.diagnosis("I10", ADMIT, index_visit_id(patient))  # hypertension: no Charlson weight
    for days in (20, 90):
        patient.visit(before_admit(days), concept=ER_ONLY, admitted_from=None)
    frame, _ = build(tmp_path, patient)
    # Charlson: heart failure 1 + diabetes 1 + renal failure 2 = 4.
    assert frame.loc[1, "charlson_index"] == 4
    # LACE: 6 days (4) + acute (3) + Charlson 4 (5) + 2 ED visits (2) = 14.
    assert frame.loc[1, "lace_score"] == 14
    # An anchor: 6 days (4) + acute (3) + Charlson 1 (1) + 0 ED visits = 8.
    assert frame.loc[902, "lace_score"] == 8


def test_egfr_is_ckd_epi_2021_from_the_last_creatinine(tmp_path):
    woman = hf_patient(1)  # born 1940-06-15: 78 at admission
    woman.lab("creatinine", 150.0, ADMIT)
    woman.lab("creatinine", 110.0, DISCHARGE)
    man = hf_patient(2, female=False)
    man.lab("creatinine", 70.0, DISCHARGE)
    frame, _ = build(tmp_path, woman, man)
    assert frame.loc[1, "age"] == 78 and frame.loc[2, "age"] == 78
    # Woman: Scr 110/88.4 = 1.2443 mg/dL, /0.7 = 1.7776 > 1;
    # 142 * 1.7776^-1.200 (0.50143) * 0.9938^78 (0.61564) * 1.012 = 44.36.
    assert frame.loc[1, "egfr"] == 44.4
    # Man: Scr 70/88.4 = 0.79186, /0.9 = 0.87985 < 1;
    # 142 * 0.87985^-0.302 (1.03941) * 0.9938^78 (0.61564) = 90.87.
    assert frame.loc[2, "egfr"] == 90.9
    assert np.isnan(frame.loc[901, "egfr"])  # no creatinine, no eGFR


# ---------------------------------------------------------------- split and input order
def test_assign_split_is_stratified_and_deterministic():
    labels = np.array([1] * 10 + [0] * 20)
    first = assign_split(labels, 0.3, np.random.default_rng(7))
    assert ((first == "test") & (labels == 1)).sum() == 3
    assert ((first == "test") & (labels == 0)).sum() == 6
    assert set(first) == {"train", "test"}
    assert np.array_equal(first, assign_split(labels, 0.3, np.random.default_rng(7)))
    assert not np.array_equal(first, assign_split(labels, 0.3, np.random.default_rng(8)))


def test_cohort_split_follows_the_spec(tmp_path):
    patients = [hf_patient(person_id) for person_id in range(1, 13)]
    for patient in patients[:5]:
        patient.visit(after_discharge(7))
    omop_dir = write_patients(tmp_path, *patients, *anchors())
    spec = CohortSpec(test_fraction=0.5, seed=3)
    first, _ = build_cohort(omop_dir, spec, SITE, progress=False)
    second, _ = build_cohort(omop_dir, spec, SITE, progress=False)
    pd.testing.assert_frame_equal(first, second)
    # 6 readmitted (5 + anchor 901) and 8 not: half of each in the test split.
    tested = first.loc[first["split"] == "test", LABEL]
    assert (tested == 1).sum() == 3 and (tested == 0).sum() == 4


def _varied_patients() -> list[Patient]:
    """Four patients with visits, diagnoses, labs and drugs, plus persons without records.

    There is one person more than a streaming batch (`cohort.PERSON_BATCH`): in a
    sorted folder person 30012 ends the first batch and 30040 is the second.
    """
    patients = []
    for k, person_id in enumerate((3, 7, 30_012, 30_040)):
        patient = _stay_records(hf_patient(person_id, female=k % 2 == 0))
        patient.visit(before_admit(40 * k + 10))
        patient.visit(before_admit(k + 1), concept=ER_ONLY, admitted_from=None)
        patient.lab("sodium", 130.0 + k, DISCHARGE)
        if k in (0, 2):
            patient.visit(after_discharge(3 * k + 2))
        patients.append(patient)
    fillers = [Patient(1000 + i, {"person_id": 1000 + i}) for i in range(cohort.PERSON_BATCH - 5)]
    return sorted([*patients, *anchors(), *fillers], key=lambda p: p.person_id)


def test_unsorted_tables_give_the_same_cohort_as_sorted_ones(tmp_path):
    sorted_dir = write_patients(tmp_path / "sorted", *_varied_patients())
    unsorted_dir = write_patients(tmp_path / "unsorted", *reversed(_varied_patients()))
    for name in ("person", "visit_occurrence", "measurement", "drug_exposure"):
        ids = pq.read_table(unsorted_dir / f"{name}.parquet").column("person_id").to_numpy()
        assert (np.diff(ids) < 0).any(), f"{name} should be unsorted"
        assert (np.diff(pq.read_table(sorted_dir / f"{name}.parquet").column("person_id").to_numpy()) >= 0).all()
    expected, expected_counts = build_cohort(sorted_dir, CohortSpec(), SITE, progress=False)
    actual, actual_counts = build_cohort(unsorted_dir, CohortSpec(), SITE, progress=False)
    pd.testing.assert_frame_equal(actual, expected)
    assert actual_counts == expected_counts
    assert expected["person_id"].tolist() == [3, 7, 901, 902, 30_012, 30_040]
    assert expected[LABEL].tolist() == [1, 0, 1, 0, 1, 0]
    assert expected["sodium"].fillna(0).tolist() == [130.0, 131.0, 0, 0, 132.0, 133.0]  # anchors: no sodium
    assert expected_counts.persons == cohort.PERSON_BATCH + 1


# ---------------------------------------------------------------- writing
def test_write_cohort_writes_cohort_and_attrition(tmp_path):
    patient = hf_patient(1)
    patient.visit(after_discharge(3))
    omop_dir = write_patients(tmp_path / "site", patient, *anchors())
    target, counts = write_cohort(omop_dir, tmp_path / "out", CohortSpec(), progress=False)
    assert target == tmp_path / "out" / COHORT_FILE
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ATTRITION_FILE, COHORT_FILE]
    table = pq.read_table(target)
    assert table.column_names == list(cohort.COHORT_COLUMNS)
    assert str(table.schema.field("index_discharge_date").type) == "date32[day]"
    assert table.column("index_discharge_date").to_pylist() == [DISCHARGE] * 3
    assert set(table.column("site").to_pylist()) == {"out"}  # default site: the output folder's name
    assert json.loads((tmp_path / "out" / ATTRITION_FILE).read_text()) == asdict(counts)
    assert counts.cohort == 3 and counts.readmitted_30d == 2


def test_a_cohort_with_one_outcome_only_is_refused(tmp_path):
    omop_dir = write_patients(tmp_path, hf_patient(1), hf_patient(2))
    with pytest.raises(ValueError, match="both outcomes"):
        write_cohort(omop_dir, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omop"]
