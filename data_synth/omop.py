"""OMOP CDM v5.4 table shapes used by the compendium, and their validator.

Only the columns the cohort builder needs are required; an extract may carry
more (they are ignored). Source-value columns may be plain strings or
dictionary-encoded strings. Diagnosis and drug codes are normalised when a
table is conformed (`CODE_NORMALISERS`: "i509 " is read as "I50.9"), so they
are validated and matched in the form the code lists use. Validation is
vectorised (pyarrow compute) and stops at the first broken rule with an
`OmopValidationError` that names the table, the column and example rows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_synth import vocabulary as vocab


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False


_ID = pa.int64()
_CONCEPT = pa.int32()
_DATE = pa.date32()
_TEXT = pa.string()

#: table -> required columns, in the order the generator writes them.
TABLES: dict[str, tuple[Column, ...]] = {
    "person": (
        Column("person_id", _ID),
        Column("gender_concept_id", _CONCEPT),
        Column("year_of_birth", _CONCEPT),
        Column("month_of_birth", _CONCEPT, nullable=True),
        Column("day_of_birth", _CONCEPT, nullable=True),
        Column("race_concept_id", _CONCEPT),
        Column("ethnicity_concept_id", _CONCEPT),
        Column("care_site_id", _ID, nullable=True),
    ),
    "visit_occurrence": (
        Column("visit_occurrence_id", _ID),
        Column("person_id", _ID),
        Column("visit_concept_id", _CONCEPT),
        Column("visit_start_date", _DATE),
        Column("visit_end_date", _DATE),
        Column("visit_type_concept_id", _CONCEPT),
        Column("care_site_id", _ID, nullable=True),
        Column("admitted_from_concept_id", _CONCEPT, nullable=True),
        Column("discharged_to_concept_id", _CONCEPT, nullable=True),
    ),
    "condition_occurrence": (
        Column("condition_occurrence_id", _ID),
        Column("person_id", _ID),
        Column("condition_concept_id", _CONCEPT),
        Column("condition_start_date", _DATE),
        Column("condition_type_concept_id", _CONCEPT),
        Column("condition_status_concept_id", _CONCEPT, nullable=True),
        Column("visit_occurrence_id", _ID, nullable=True),
        Column("condition_source_value", _TEXT),
    ),
    "measurement": (
        Column("measurement_id", _ID),
        Column("person_id", _ID),
        Column("measurement_concept_id", _CONCEPT),
        Column("measurement_date", _DATE),
        Column("measurement_type_concept_id", _CONCEPT),
        Column("value_as_number", pa.float64(), nullable=True),
        Column("visit_occurrence_id", _ID, nullable=True),
        Column("measurement_source_value", _TEXT),
        Column("unit_source_value", _TEXT, nullable=True),
    ),
    "drug_exposure": (
        Column("drug_exposure_id", _ID),
        Column("person_id", _ID),
        Column("drug_concept_id", _CONCEPT),
        Column("drug_exposure_start_date", _DATE),
        Column("drug_exposure_end_date", _DATE),
        Column("drug_type_concept_id", _CONCEPT),
        Column("visit_occurrence_id", _ID, nullable=True),
        Column("drug_source_value", _TEXT),
    ),
    "death": (
        Column("person_id", _ID),
        Column("death_date", _DATE),
        Column("death_type_concept_id", _CONCEPT),
    ),
}

TABLE_NAMES = tuple(TABLES)
#: Tables an extract may carry that the cohort builder does not read: validated like the others when
#: written or checked, never required. Procedures (KVÅ codes in Sweden) record what was done at a stay.
OPTIONAL_TABLES: dict[str, tuple[Column, ...]] = {
    "procedure_occurrence": (
        Column("procedure_occurrence_id", _ID),
        Column("person_id", _ID),
        Column("procedure_concept_id", _CONCEPT),
        Column("procedure_date", _DATE),
        Column("procedure_type_concept_id", _CONCEPT),
        Column("visit_occurrence_id", _ID, nullable=True),
        Column("procedure_source_value", _TEXT),
    ),
}
#: Every table shape this module knows: the required ones, then the optional ones.
SCHEMAS: dict[str, tuple[Column, ...]] = {**TABLES, **OPTIONAL_TABLES}

#: Source-value columns read in the code lists' canonical form (see `vocabulary.normalise_icd10`).
CODE_NORMALISERS: dict[tuple[str, str], Callable] = {
    ("condition_occurrence", "condition_source_value"): vocab.normalise_icd10,
    ("drug_exposure", "drug_source_value"): vocab.normalise_atc,
}
#: Source-value columns and the pattern every value must match (once normalised).
CODE_PATTERNS: dict[tuple[str, str], str] = {
    ("condition_occurrence", "condition_source_value"): r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,2})?$",
    ("measurement", "measurement_source_value"): r"^[0-9]{1,6}-[0-9]$",
    ("drug_exposure", "drug_source_value"): r"^[A-Z][0-9]{2}[A-Z]{0,2}[0-9]{0,2}$",
    ("procedure_occurrence", "procedure_source_value"): r"^[A-Z]{3}[0-9]{2}$",  # KVÅ surgical codes
}
#: (table, start column, end column) that must satisfy start <= end.
DATE_ORDER = (
    ("visit_occurrence", "visit_start_date", "visit_end_date"),
    ("drug_exposure", "drug_exposure_start_date", "drug_exposure_end_date"),
)
PRIMARY_KEYS = {
    "person": "person_id",
    "visit_occurrence": "visit_occurrence_id",
    "condition_occurrence": "condition_occurrence_id",
    "measurement": "measurement_id",
    "drug_exposure": "drug_exposure_id",
    "death": "person_id",
    "procedure_occurrence": "procedure_occurrence_id",
}


class OmopValidationError(ValueError):
    """An OMOP table breaks a rule the cohort builder relies on."""


def arrow_schema(table: str, dictionary_codes: bool = False) -> pa.Schema:
    """Return the pyarrow schema of `table`; source values dictionary-encoded if asked."""
    fields = []
    for col in SCHEMAS[table]:
        dtype = col.type
        if dictionary_codes and dtype == _TEXT:
            dtype = pa.dictionary(pa.int32(), pa.string())
        fields.append(pa.field(col.name, dtype, nullable=col.nullable))
    return pa.schema(fields)


def _examples(table: pa.Table, mask: pa.Array | np.ndarray, columns: list[str], limit: int = 3) -> str:
    rows = np.flatnonzero(np.asarray(mask, dtype=bool))[:limit]
    shown = [column for column in columns if column in table.column_names]
    parts = []
    for row in rows:
        values = ", ".join(f"{column}={table.column(column)[int(row)].as_py()!r}" for column in shown)
        parts.append(f"row {int(row)}: {values}")
    return "; ".join(parts)


def _fail(table_name: str, column: str, problem: str, table: pa.Table, mask, row_offset: int = 0) -> None:
    n_bad = int(np.asarray(mask, dtype=bool).sum())
    key = PRIMARY_KEYS[table_name]
    example = _examples(table, mask, [key, column] if key != column else [column])
    where = f" (rows counted from {row_offset})" if row_offset else ""
    raise OmopValidationError(
        f"{table_name}.{column}: {problem} in {n_bad} row(s){where}; e.g. {example}"
    )


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return pa.types.is_string(dtype.value_type) or pa.types.is_large_string(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def check_columns(table_name: str, schema: pa.Schema, source: str = "") -> None:
    """Raise OmopValidationError unless `schema` has every required column with a usable type."""
    where = f" in {source}" if source else ""
    for col in SCHEMAS[table_name]:
        if col.name not in schema.names:
            raise OmopValidationError(
                f"{table_name}: required column {col.name!r} is missing{where}; "
                f"columns present: {schema.names}"
            )
        actual = schema.field(col.name).type
        if col.type == _TEXT:
            ok = _is_text(actual)
        elif pa.types.is_date(col.type):
            ok = pa.types.is_date(actual) or pa.types.is_timestamp(actual)
        else:
            ok = pa.types.is_integer(actual) or (col.type == pa.float64() and pa.types.is_floating(actual))
        if not ok:
            raise OmopValidationError(
                f"{table_name}.{col.name}: expected {col.type}, found {actual}{where}"
            )


def conform(table_name: str, table: pa.Table, source: str = "") -> pa.Table:
    """Return `table` with only the required columns, cast to the canonical types, codes normalised."""
    check_columns(table_name, table.schema, source)
    arrays = []
    for col in SCHEMAS[table_name]:
        array = table.column(col.name)
        if col.type == _TEXT:
            if not pa.types.is_dictionary(array.type):
                array = pc.dictionary_encode(array)
            array = array.cast(pa.dictionary(pa.int32(), pa.string()))
            normalise = CODE_NORMALISERS.get((table_name, col.name))
            if normalise is not None:
                array = normalise(array)  # rewrites the distinct codes only
        elif array.type != col.type:
            try:
                array = array.cast(col.type)
            except pa.ArrowInvalid:
                # e.g. an int64 concept id beyond the int32 range: show the rows that do not fit.
                fits = pc.equal(array.cast(col.type, safe=False).cast(array.type), array)
                _fail(table_name, col.name, f"value does not fit {col.type}", table,
                      pc.invert(pc.fill_null(fits, True)).to_numpy(zero_copy_only=False))
        arrays.append(array)
    return pa.table(arrays, schema=arrow_schema(table_name, dictionary_codes=True))


def validate_table(table_name: str, table: pa.Table, row_offset: int = 0) -> None:
    """Raise OmopValidationError if a conformed table (codes normalised) breaks a row-level rule."""
    for col in SCHEMAS[table_name]:
        if not col.nullable and table.column(col.name).null_count:
            _fail(table_name, col.name, "missing value where one is required", table,
                  pc.is_null(table.column(col.name)).to_numpy(zero_copy_only=False), row_offset)
    key = PRIMARY_KEYS[table_name]
    ids = table.column(key).to_numpy()
    # Increasing ids (as extracts usually come) are unique; only otherwise sort to look.
    if ids.size > 1 and not np.all(ids[1:] > ids[:-1]) and np.unique(ids).size != ids.size:
        order = np.sort(ids)
        dupes = np.unique(order[1:][order[1:] == order[:-1]])
        _fail(table_name, key, "duplicate identifier", table, np.isin(ids, dupes), row_offset)
    for (t, column), pattern in CODE_PATTERNS.items():
        if t != table_name:
            continue
        codes = table.column(column).combine_chunks()
        dictionary = codes.dictionary if pa.types.is_dictionary(codes.type) else None
        if dictionary is not None:
            good = pc.match_substring_regex(dictionary, pattern).to_numpy(zero_copy_only=False)
            indices = codes.indices.to_numpy(zero_copy_only=False)
            bad = ~good[indices] if good.size else np.zeros(len(codes), bool)
        else:
            bad = ~pc.match_substring_regex(codes, pattern).to_numpy(zero_copy_only=False)
        if bad.any():
            read_as = " as read (no spaces, upper case, ICD-10 with its dot)" if (t, column) in CODE_NORMALISERS else ""
            _fail(table_name, column, f"code does not match {pattern}{read_as}", table, bad, row_offset)
    if table_name == "measurement":
        _check_units(table, row_offset)
    for ordered_table, start, end in DATE_ORDER:
        if ordered_table == table_name:
            bad = pc.greater(table.column(start), table.column(end)).to_numpy(zero_copy_only=False)
            if bad.any():
                _fail(table_name, end, f"date before {start}", table, bad, row_offset)
    if table_name == "person":
        bad = pc.invert(pc.is_in(table.column("gender_concept_id"),
                                 pa.array([vocab.GENDER_MALE, vocab.GENDER_FEMALE], pa.int32())))
        if pc.any(bad).as_py():
            _fail(table_name, "gender_concept_id", "unknown gender concept (8507/8532 expected)",
                  table, bad.to_numpy(zero_copy_only=False), row_offset)


def _check_units(table: pa.Table, row_offset: int) -> None:
    codes = table.column("measurement_source_value").combine_chunks()
    units = table.column("unit_source_value").combine_chunks()
    known = pa.array(list(vocab.LOINC_UNITS))
    expected = pa.array([vocab.LOINC_UNITS[code] for code in vocab.LOINC_UNITS])
    codes_str = codes.cast(pa.string()) if pa.types.is_dictionary(codes.type) else codes
    units_str = units.cast(pa.string()) if pa.types.is_dictionary(units.type) else units
    position = pc.index_in(codes_str, value_set=known)
    expected_unit = pc.take(expected, position)
    bad = pc.and_(pc.is_valid(position), pc.invert(pc.equal(pc.fill_null(units_str, ""), expected_unit)))
    bad = pc.fill_null(bad, False).to_numpy(zero_copy_only=False)
    if bad.any():
        _fail("measurement", "unit_source_value", "unit differs from the LOINC code's unit "
              f"{vocab.LOINC_UNITS}", table, bad, row_offset)


def check_foreign_keys(child_name: str, child: pa.Table, column: str, parent_name: str,
                       parent_ids: np.ndarray, row_offset: int = 0) -> None:
    """Raise OmopValidationError if a non-null `child.column` value is missing from `parent_ids`."""
    values = child.column(column)
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    present = np.isin(values.fill_null(0).to_numpy(), parent_ids)
    bad = valid & ~present
    if bad.any():
        _fail(child_name, column, f"refers to a {parent_name} that does not exist", child, bad, row_offset)


def table_path(omop_dir: Path, table: str) -> Path:
    """Return the Parquet (or CSV) file holding `table` in an OMOP folder."""
    for suffix in (".parquet", ".csv"):
        path = Path(omop_dir) / f"{table}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(
        f"OMOP table {table!r} not found in {omop_dir} (expected {table}.parquet or {table}.csv)"
    )
