"""Tiny, hand-readable OMOP folders for the cohort-rule tests.

A test names only the rows and columns it cares about; every other required
column (see `omop.TABLES`) gets a plain default: EHR provenance, concept id 0
for source-coded columns, no care site, the LOINC code's own unit. Row ids
that a test does not give are numbered 1, 2, 3, ... in each table.

    patient = hf_patient(1)                      # one index heart-failure stay
    patient.visit(after_discharge(10))           # an unplanned readmission
    patient.lab("creatinine", 110, DISCHARGE)    # last creatinine of the stay
    write_patients(tmp_path, patient, *anchors())

`hf_patient` is the reference case every rule test starts from: a woman born
1940-06-15, admitted from the emergency room on ADMIT with heart failure
(I50.9) as the main diagnosis, discharged home on DISCHARGE (6 days), alive,
well inside the default study window and follow-up.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_synth import omop
from data_synth import vocabulary as vocab

ADMIT = dt.date(2019, 3, 4)
DISCHARGE = dt.date(2019, 3, 10)  # a 6-day stay

INPATIENT = vocab.VISIT_INPATIENT  # 9201
ER_AND_INPATIENT = vocab.VISIT_EMERGENCY_INPATIENT  # 262
ER_ONLY = vocab.VISIT_EMERGENCY  # 9203
OUTPATIENT = vocab.VISIT_OUTPATIENT  # 9202
FROM_ER = vocab.ADMITTED_FROM_EMERGENCY_ROOM  # 8870
FROM_HOME = vocab.ADMITTED_FROM_HOME  # 8536 (a planned admission)
HOME = vocab.DISCHARGED_HOME  # 8536
DIED = vocab.DISCHARGED_DIED  # 4216643
TRANSFER = vocab.DISCHARGED_TRANSFER  # 8717
AGAINST_ADVICE = vocab.DISCHARGED_AGAINST_ADVICE  # 4021968
MAIN = vocab.CONDITION_PRIMARY  # 32902
SECONDARY = vocab.CONDITION_SECONDARY  # 32908


def after_discharge(days: int) -> dt.date:
    return DISCHARGE + dt.timedelta(days=days)


def before_admit(days: int) -> dt.date:
    return ADMIT - dt.timedelta(days=days)


#: Values of the columns a test leaves out.
DEFAULTS: dict[str, dict] = {
    "person": {"gender_concept_id": vocab.GENDER_FEMALE, "year_of_birth": 1940, "month_of_birth": 6,
               "day_of_birth": 15, "race_concept_id": 0, "ethnicity_concept_id": 0, "care_site_id": None},
    "visit_occurrence": {"visit_concept_id": INPATIENT, "visit_type_concept_id": vocab.TYPE_EHR,
                         "care_site_id": None, "admitted_from_concept_id": FROM_ER,
                         "discharged_to_concept_id": HOME},
    "condition_occurrence": {"condition_concept_id": 0, "condition_type_concept_id": vocab.TYPE_EHR,
                             "condition_status_concept_id": SECONDARY, "visit_occurrence_id": None},
    "measurement": {"measurement_concept_id": 0, "measurement_type_concept_id": vocab.TYPE_EHR,
                    "value_as_number": None, "visit_occurrence_id": None},
    "drug_exposure": {"drug_concept_id": 0, "drug_type_concept_id": vocab.TYPE_EHR_PRESCRIPTION,
                      "visit_occurrence_id": None},
    "death": {"death_type_concept_id": vocab.TYPE_EHR},
}
_ROW_ID = {"condition_occurrence": "condition_occurrence_id", "measurement": "measurement_id",
           "drug_exposure": "drug_exposure_id"}


def _complete(table: str, rows: list[dict]) -> list[dict]:
    out = []
    for number, row in enumerate(rows, start=1):
        full = {**DEFAULTS[table], **row}
        if table in _ROW_ID:
            full.setdefault(_ROW_ID[table], number)
        if table == "measurement":
            full.setdefault("unit_source_value", vocab.LOINC_UNITS.get(full["measurement_source_value"]))
        out.append(full)
    return out


def omop_tables(persons=(), visits=(), conditions=(), measurements=(), drugs=(), deaths=()) -> dict[str, pa.Table]:
    """Return the six OMOP tables, with the canonical schema, from lists of row dicts."""
    rows = dict(zip(omop.TABLE_NAMES, (persons, visits, conditions, measurements, drugs, deaths)))
    return {name: pa.Table.from_pylist(_complete(name, list(rows[name])), schema=omop.arrow_schema(name))
            for name in omop.TABLE_NAMES}


def write_tables(omop_dir: Path, tables: dict[str, pa.Table]) -> Path:
    """Write each table to `omop_dir`/<name>.parquet and return the folder."""
    omop_dir = Path(omop_dir)
    omop_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, omop_dir / f"{name}.parquet")
    return omop_dir


def write_omop(folder: Path, **rows) -> Path:
    """Write `folder`/omop/*.parquet from row lists (persons=, visits=, ...) and return the OMOP folder."""
    return write_tables(Path(folder) / "omop", omop_tables(**rows))


@dataclass
class Patient:
    """One person and their records; methods add rows and return nothing but visit ids."""

    person_id: int
    person: dict
    visits: list[dict] = field(default_factory=list)
    conditions: list[dict] = field(default_factory=list)
    measurements: list[dict] = field(default_factory=list)
    drugs: list[dict] = field(default_factory=list)
    deaths: list[dict] = field(default_factory=list)

    def visit(self, start: dt.date, end: dt.date | None = None, concept: int = INPATIENT,
              admitted_from: int | None = FROM_ER, discharged_to: int | None = HOME,
              main_diagnosis: str | None = "J18.9") -> int:
        """Add a visit (by default an unplanned pneumonia stay of one day) and return its id."""
        visit_id = self.person_id * 100 + len(self.visits) + 1
        self.visits.append({
            "visit_occurrence_id": visit_id, "person_id": self.person_id, "visit_concept_id": concept,
            "visit_start_date": start, "visit_end_date": end or start,
            "admitted_from_concept_id": admitted_from, "discharged_to_concept_id": discharged_to,
        })
        if main_diagnosis:
            self.diagnosis(main_diagnosis, start, visit_id, main=True)
        return visit_id

    def diagnosis(self, code: str, date: dt.date, visit_id: int | None = None, main: bool = False) -> None:
        self.conditions.append({
            "person_id": self.person_id, "condition_start_date": date, "condition_source_value": code,
            "condition_status_concept_id": MAIN if main else SECONDARY, "visit_occurrence_id": visit_id,
        })

    def lab(self, name: str, value: float, date: dt.date, unit: str | None = None) -> None:
        """Add a result of a lab named in `vocab.LAB_LOINC` (or a raw LOINC code)."""
        loinc = vocab.LAB_LOINC[name][0] if name in vocab.LAB_LOINC else name
        row = {"person_id": self.person_id, "measurement_date": date, "measurement_source_value": loinc,
               "value_as_number": value}
        if unit is not None:
            row["unit_source_value"] = unit
        self.measurements.append(row)

    def drug(self, atc: str, start: dt.date, end: dt.date) -> None:
        self.drugs.append({"person_id": self.person_id, "drug_source_value": atc,
                           "drug_exposure_start_date": start, "drug_exposure_end_date": end})

    def died(self, date: dt.date) -> None:
        self.deaths.append({"person_id": self.person_id, "death_date": date})


def hf_patient(person_id: int, admit: dt.date = ADMIT, discharge: dt.date = DISCHARGE, *,
               born: dt.date = dt.date(1940, 6, 15), female: bool = True,
               hf_code: str = "I50.9", concept: int = INPATIENT, discharged_to: int = HOME) -> Patient:
    """Return a patient whose first visit is a heart-failure stay (HF as main diagnosis)."""
    patient = Patient(person_id, {
        "person_id": person_id, "year_of_birth": born.year, "month_of_birth": born.month,
        "day_of_birth": born.day,
        "gender_concept_id": vocab.GENDER_FEMALE if female else vocab.GENDER_MALE,
    })
    patient.visit(admit, discharge, concept=concept, discharged_to=discharged_to, main_diagnosis=hf_code)
    return patient


def index_visit_id(patient: Patient) -> int:
    return patient.visits[0]["visit_occurrence_id"]


def anchors() -> list[Patient]:
    """Two plain index patients (ids 901, 902): one readmitted on day 10, one not.

    `build_cohort` refuses a cohort with one outcome only (a split needs
    both), so rule tests add these to their own patients.
    """
    readmitted, not_readmitted = hf_patient(901), hf_patient(902)
    readmitted.visit(after_discharge(10))
    return [readmitted, not_readmitted]


def write_patients(folder: Path, *patients: Patient) -> Path:
    """Write the patients' rows (in the order given) to `folder`/omop and return that folder."""
    return write_omop(
        folder,
        persons=[p.person for p in patients],
        visits=[row for p in patients for row in p.visits],
        conditions=[row for p in patients for row in p.conditions],
        measurements=[row for p in patients for row in p.measurements],
        drugs=[row for p in patients for row in p.drugs],
        deaths=[row for p in patients for row in p.deaths],
    )
