"""Broken OMOP input: each is refused with an error naming the table and column, and nothing is written.

Every test starts from a valid folder (the two anchors of omop_fixture and
one more patient), breaks one thing, and calls `write_cohort` with the
output going next to the OMOP folder; afterwards that folder must hold
nothing but omop/ (no cohort.parquet, attrition.json or temp file).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_synth import cohort
from data_synth.cohort import write_cohort
from data_synth.omop import OmopValidationError
from omop_fixture import (ADMIT, DISCHARGE, Patient, after_discharge, anchors, hf_patient,
                          index_visit_id, omop_tables, write_patients, write_tables)

REPO = Path(__file__).resolve().parents[1]


def patients() -> list[Patient]:
    patient = hf_patient(1)
    patient.diagnosis("I10", ADMIT, index_visit_id(patient))
    patient.lab("sodium", 138.0, DISCHARGE)
    patient.drug("C03CA01", ADMIT, after_discharge(90))
    return [patient, *anchors()]


def rejected(omop_dir: Path, error: type[Exception], *fragments: str) -> str:
    """Run write_cohort, check the error and its message, check nothing was written; return the message."""
    out_dir = omop_dir.parent
    with pytest.raises(error) as caught:
        write_cohort(omop_dir, out_dir, progress=False)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert [p.name for p in out_dir.iterdir() if p != omop_dir] == []
    return message


def replace_table(omop_dir: Path, name: str, table: pa.Table) -> None:
    pq.write_table(table, omop_dir / f"{name}.parquet")


def test_the_valid_folder_is_accepted(tmp_path):
    # The baseline every other test breaks.
    _, counts = write_cohort(write_patients(tmp_path, *patients()), progress=False)
    assert counts.cohort == 3


# ---------------------------------------------------------------- file and schema
@pytest.mark.parametrize("table, column", [
    ("visit_occurrence", "discharged_to_concept_id"),
    ("measurement", "unit_source_value"),
    ("condition_occurrence", "person_id"),
    ("person", "person_id"),
])
def test_missing_required_column(tmp_path, table, column):
    omop_dir = write_patients(tmp_path, *patients())
    replace_table(omop_dir, table, pq.read_table(omop_dir / f"{table}.parquet").drop_columns([column]))
    rejected(omop_dir, OmopValidationError, f"{table}: required column {column!r} is missing",
             f"{table}.parquet")


def test_wrong_column_type(tmp_path):
    omop_dir = write_patients(tmp_path, *patients())
    visits = pq.read_table(omop_dir / "visit_occurrence.parquet")
    position = visits.schema.get_field_index("visit_start_date")
    as_text = visits.column(position).cast(pa.string())  # '2019-03-04' as a string
    replace_table(omop_dir, "visit_occurrence", visits.set_column(position, "visit_start_date", as_text))
    rejected(omop_dir, OmopValidationError, "visit_occurrence.visit_start_date", "expected date32", "found string")


def test_integer_too_large_for_the_column_type(tmp_path):
    # Concept ids are int32; an int64 column is accepted but its values must fit.
    omop_dir = write_patients(tmp_path, *patients())
    visits = pq.read_table(omop_dir / "visit_occurrence.parquet")
    position = visits.schema.get_field_index("visit_concept_id")
    values = visits.column(position).cast(pa.int64()).to_pylist()
    values[2] = 2**40
    replace_table(omop_dir, "visit_occurrence",
                  visits.set_column(position, "visit_concept_id", pa.array(values, pa.int64())))
    rejected(omop_dir, OmopValidationError, "visit_occurrence.visit_concept_id", "int32",
             f"visit_concept_id={2**40}", "visit_occurrence_id=90102")


@pytest.mark.parametrize("damage", ["truncated", "garbage pages", "not parquet"])
def test_corrupted_parquet_file(tmp_path, damage):
    omop_dir = write_patients(tmp_path, *patients())
    path = omop_dir / "measurement.parquet"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage pages":  # keep the magic bytes and footer, scramble the rest
        data[4:-200] = bytes((i * 7919) % 256 for i in range(4, len(data) - 200))
    else:
        data = b"person_id,measurement_id\n1,2\n" * 10
    path.write_bytes(bytes(data))
    rejected(omop_dir, OmopValidationError, "measurement:", str(path))


def test_missing_table_file(tmp_path):
    omop_dir = write_patients(tmp_path, *patients())
    (omop_dir / "drug_exposure.parquet").unlink()
    rejected(omop_dir, FileNotFoundError, "'drug_exposure'", "drug_exposure.parquet", str(omop_dir))


def test_missing_omop_folder(tmp_path):
    omop_dir = tmp_path / "omop"
    rejected(omop_dir, FileNotFoundError, str(omop_dir))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- row rules
def test_malformed_icd_code(tmp_path):
    broken, *others = patients()
    broken.diagnosis("150.9", DISCHARGE, index_visit_id(broken))  # digit one for the letter I (I509 is fine: no dot is normalised)
    omop_dir = write_patients(tmp_path, broken, *others)
    rejected(omop_dir, OmopValidationError, "condition_occurrence.condition_source_value",
             "1 row(s)", "condition_source_value='150.9'", "condition_occurrence_id=3")


def test_measurement_unit_that_does_not_match_its_loinc_code(tmp_path):
    broken, *others = patients()
    broken.lab("sodium", 3.1, DISCHARGE, unit="mg/dL")  # sodium (2951-2) is reported in mmol/L
    omop_dir = write_patients(tmp_path, broken, *others)
    rejected(omop_dir, OmopValidationError, "measurement.unit_source_value", "1 row(s)",
             "unit_source_value='mg/dL'", "measurement_id=2")


def test_visit_that_ends_before_it_starts(tmp_path):
    broken, *others = patients()
    broken.visit(after_discharge(10), after_discharge(8))
    omop_dir = write_patients(tmp_path, broken, *others)
    rejected(omop_dir, OmopValidationError, "visit_occurrence.visit_end_date", "before visit_start_date",
             "visit_occurrence_id=102")


def test_condition_pointing_to_a_visit_that_does_not_exist(tmp_path):
    broken, *others = patients()
    broken.diagnosis("I48.0", DISCHARGE, visit_id=555)
    omop_dir = write_patients(tmp_path, broken, *others)
    rejected(omop_dir, OmopValidationError, "condition_occurrence.visit_occurrence_id",
             "refers to a visit_occurrence that does not exist", "visit_occurrence_id=555")


def test_visit_pointing_to_a_person_that_does_not_exist(tmp_path):
    orphan = Patient(77, person={})  # has records but no person row
    orphan.visit(ADMIT)
    valid = patients()
    tables = omop_tables(
        persons=[p.person for p in valid],
        visits=[row for p in [*valid, orphan] for row in p.visits],
        conditions=[row for p in valid for row in p.conditions],
    )
    omop_dir = write_tables(tmp_path / "omop", tables)
    rejected(omop_dir, OmopValidationError, "visit_occurrence.person_id", "refers to a person that does not exist",
             "person_id=77")


def test_orphan_rows_after_a_full_batch_of_persons_are_still_checked(tmp_path):
    # Exactly one streaming batch of persons (sorted tables); the orphan visit sorts after all of them.
    valid = patients()
    fillers = [{"person_id": 1000 + i} for i in range(cohort.PERSON_BATCH - len(valid))]
    orphan = Patient(5_000_000, person={})
    orphan.visit(ADMIT)
    tables = omop_tables(
        persons=[p.person for p in valid] + fillers,
        visits=[row for p in [*valid, orphan] for row in p.visits],
        conditions=[row for p in valid for row in p.conditions],
    )
    assert tables["person"].num_rows == cohort.PERSON_BATCH
    omop_dir = write_tables(tmp_path / "omop", tables)
    rejected(omop_dir, OmopValidationError, "visit_occurrence.person_id", "person_id=5000000")


@pytest.mark.parametrize("table, key", [
    ("person", "person_id"),
    ("visit_occurrence", "visit_occurrence_id"),
    ("measurement", "measurement_id"),
    ("death", "person_id"),
])
def test_duplicate_primary_key(tmp_path, table, key):
    broken, *others = patients()
    if table == "person":
        others.append(Patient(1, person=dict(broken.person)))
    elif table == "visit_occurrence":
        broken.visit(after_discharge(40))
        broken.visits[-1]["visit_occurrence_id"] = index_visit_id(broken)
    elif table == "measurement":
        broken.lab("potassium", 4.0, DISCHARGE)
        broken.measurements[-1]["measurement_id"] = 1
    else:
        broken.died(after_discharge(100))
        broken.died(after_discharge(101))
    omop_dir = write_patients(tmp_path, broken, *others)
    rejected(omop_dir, OmopValidationError, f"{table}.{key}", "duplicate identifier", "2 row(s)")


# ---------------------------------------------------------------- command line
def test_cli_exits_non_zero_with_the_error_on_stderr(tmp_path):
    broken, *others = patients()
    broken.diagnosis("i50,9", DISCHARGE, index_visit_id(broken))  # a decimal comma (case and a missing dot are normalised)
    write_patients(tmp_path, broken, *others)
    result = subprocess.run(
        [sys.executable, "-m", "data_synth", "cohort", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: condition_occurrence.condition_source_value")
    assert "'I50,9'" in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omop"]
