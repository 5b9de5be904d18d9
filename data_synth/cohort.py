"""The cohort builder: OMOP tables in, one modelling row per index heart-failure stay out.

It reads only OMOP tables (see `omop.TABLES`), so a real extract can replace
the synthetic one. The rules, in the style of the CMS readmission measure:

- index stay: an inpatient visit (OMOP 9201 or 262) whose main diagnosis
  (condition status 32902) is heart failure (I50.*, I11.0, I13.0, I13.2),
  starting inside the study window; one per patient by default: the first;
- exclusions, counted in the attrition table: age under 18, death in
  hospital (discharge to "patient died" or a death date on or before
  discharge), transfer to another acute hospital, discharge against medical
  advice, follow-up shorter than 30 days before the end of the extract;
- label `readmitted_30d`: an unplanned inpatient admission (admitted from
  the emergency room, or an emergency-and-inpatient visit) starting 1 to 30
  days after the index discharge date; planned admissions do not count;
- features: only records dated on or before the index discharge date
  (labs and drugs of the stay, diagnoses of a look-back window, visits
  before admission). Nothing after discharge leaks in.

Codes are matched as the code lists in `vocabulary` write them: each table is
normalised as it is read (`omop.conform`), so ICD-10 codes may come with or
without the dot ("I509" is I50.9), in any case and with stray spaces, and ATC
codes in any case. A code matches a listed code or prefix when it starts with
it, so an ICD-10-SE subdivision (I50.9A, I11.0X) counts as its parent.

Tables sorted by person_id (as the generator writes them) are streamed in
person batches so memory stays flat; unsorted tables are read whole.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from compendium.artifacts import atomic_write
from data_synth import omop
from data_synth import vocabulary as vocab
from data_synth.features import ATTRITION_FILE, COHORT_COLUMNS, COHORT_FILE, LABEL, SPLIT
# Re-exported until the importers outside data_synth read data_synth.features.
from data_synth.features import FEATURE_NAMES, FEATURES, KEY_COLUMNS, SCORE_COLUMNS, Feature  # noqa: F401
from data_synth.risk import egfr_ckd_epi_2021
from data_synth.sites import COMORBIDITIES

READMISSION_WINDOW_DAYS = 30
PERSON_BATCH = 20_000
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class CohortSpec:
    """The cohort's definition; defaults match the synthetic extract."""

    study_start: dt.date = dt.date(2016, 1, 1)
    study_end: dt.date = dt.date(2021, 12, 31)
    followup_end: dt.date = dt.date(2022, 12, 31)
    lookback_days: int = 5 * 365
    one_index_per_patient: bool = True
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.study_start <= self.study_end <= self.followup_end:
            raise ValueError("cohort window: need study_start <= study_end <= followup_end")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")


@dataclass
class Attrition:
    """Counts of each step from OMOP persons to the modelling cohort."""

    persons: int = 0
    hf_index_stays_in_window: int = 0
    patients_with_index_stay: int = 0
    index_stays_considered: int = 0
    excluded_under_18: int = 0
    excluded_died_in_hospital: int = 0
    excluded_transfer_out: int = 0
    excluded_against_advice: int = 0
    excluded_short_followup: int = 0
    cohort: int = 0
    readmitted_30d: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, other: "Attrition") -> None:
        for name, value in asdict(other).items():
            if isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)


# ---------------------------------------------------------------- reading
def _days(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_timestamp(array.type):
        array = array.cast(pa.date32())
    return array.cast(pa.int32()).to_numpy(zero_copy_only=False)


def _codes_matching(array: pa.ChunkedArray | pa.Array, prefixes: tuple[str, ...], exact: tuple[str, ...] = ()) -> np.ndarray:
    """Return a boolean mask of dictionary-encoded codes that start with a prefix or equal a code."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    values = np.asarray(array.dictionary.to_pylist(), dtype=object)
    hit = np.array([v is not None and (v.startswith(prefixes) or v in exact) for v in values], dtype=bool)
    indices = array.indices.to_numpy(zero_copy_only=False)
    if hit.size == 0:
        return np.zeros(len(array), bool)
    return hit[indices] & pc.is_valid(array.indices).to_numpy(zero_copy_only=False)


def _open_batches(name: str, path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Return record batches of `columns` of an OMOP table file (Parquet or CSV), columns checked first."""
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise omop.OmopValidationError(f"{name}: {path} is not a readable Parquet file ({error})") from error
        # Checked here: iter_batches silently drops a requested column that is absent.
        omop.check_columns(name, parquet.schema_arrow, str(path))
        return _row_group_batches(parquet, columns, batch_rows)
    types = {column.name: column.type for column in omop.TABLES[name] if column.name in columns}
    try:
        return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 24),
                              convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns,
                                                                   strings_can_be_null=True))
    except (pa.ArrowInvalid, KeyError) as error:
        raise omop.OmopValidationError(f"{name}: cannot read {path} as CSV ({error})") from error


def _row_group_batches(parquet: pq.ParquetFile, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    # A fresh reader per row group: one iter_batches over a whole file holds
    # memory until the file closes (pyarrow 26), so memory grew with the site.
    for group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


class _TableStream:
    """Record batches of one OMOP table, handed out by person_id upper bound."""

    def __init__(self, name: str, path: Path, batch_rows: int = 200_000):
        self.name = name
        self.path = path
        self._batches = _open_batches(name, path, [column.name for column in omop.TABLES[name]], batch_rows)
        self._buffer: pa.Table | None = None
        self._rows_seen = 0
        self._exhausted = False

    def _pull(self) -> bool:
        try:
            batch = next(self._batches)
        except StopIteration:
            self._exhausted = True
            return False
        except (pa.ArrowInvalid, OSError) as error:
            raise omop.OmopValidationError(f"{self.name}: cannot read {self.path} ({error})") from error
        table = omop.conform(self.name, pa.Table.from_batches([batch]), str(self.path))
        omop.validate_table(self.name, table, row_offset=self._rows_seen)
        self._rows_seen += table.num_rows
        self._buffer = table if self._buffer is None else pa.concat_tables([self._buffer, table])
        return True

    def take_through(self, max_person_id: int) -> pa.Table:
        """Return the buffered and next rows with person_id <= max_person_id (table sorted by person)."""
        while not self._exhausted and (self._buffer is None or self._buffer.num_rows == 0
                                        or self._buffer.column("person_id")[-1].as_py() <= max_person_id):
            if not self._pull():
                break
        if self._buffer is None:
            return omop.arrow_schema(self.name, dictionary_codes=True).empty_table()
        ids = self._buffer.column("person_id").to_numpy()
        cut = int(np.searchsorted(ids, max_person_id, side="right"))
        taken, self._buffer = self._buffer.slice(0, cut), self._buffer.slice(cut)
        return taken

    def rest(self) -> pa.Table:
        """Return every row not yet handed out."""
        while self._pull():
            pass
        if self._buffer is None:
            return omop.arrow_schema(self.name, dictionary_codes=True).empty_table()
        return self._buffer


def _sorted_by_person(name: str, path: Path) -> bool:
    """Return True if the table's person_id column never decreases (read column-only, streamed)."""
    batches = _open_batches(name, path, ["person_id"], 1_000_000)
    last = None
    try:
        for batch in batches:
            ids = batch.column(0).to_numpy(zero_copy_only=False)
            if ids.size == 0:
                continue
            if np.any(ids[1:] < ids[:-1]) or (last is not None and ids[0] < last):
                return False
            last = ids[-1]
    except (pa.ArrowInvalid, KeyError, OSError) as error:
        raise omop.OmopValidationError(f"{name}: cannot read person_id from {path} ({error})") from error
    return True


def _person_batches(omop_dir: Path) -> Iterator[dict[str, pa.Table]]:
    """Yield dicts of table -> rows for consecutive batches of persons."""
    paths = {name: omop.table_path(omop_dir, name) for name in omop.TABLE_NAMES}
    if not all(_sorted_by_person(name, path) for name, path in paths.items()):
        # Real extracts are often unsorted: read whole tables (memory grows with the site).
        yield {name: _TableStream(name, path).rest().sort_by("person_id") for name, path in paths.items()}
        return
    streams = {name: _TableStream(name, path) for name, path in paths.items() if name != "person"}
    person = _TableStream("person", paths["person"], batch_rows=PERSON_BATCH)
    while True:
        more = person._pull()
        if person._buffer is not None and (not more or person._buffer.num_rows >= PERSON_BATCH):
            people, person._buffer = person._buffer, None
            if people.num_rows:
                max_id = int(people.column("person_id")[-1].as_py())
                chunk = {"person": people}
                for name, stream in streams.items():
                    chunk[name] = stream.rest() if not more else stream.take_through(max_id)
                yield chunk
        elif not more:
            # The persons ended exactly on a batch boundary: rows left in the other tables
            # belong to no person; hand them out so the foreign-key check sees them.
            leftovers = {name: stream.rest() for name, stream in streams.items()}
            if any(table.num_rows for table in leftovers.values()):
                yield {"person": omop.arrow_schema("person", dictionary_codes=True).empty_table(), **leftovers}
        if not more:
            return


# ---------------------------------------------------------------- rules
def _check_foreign_keys(chunk: dict[str, pa.Table]) -> None:
    person_ids = chunk["person"].column("person_id").to_numpy()
    visit_ids = chunk["visit_occurrence"].column("visit_occurrence_id").to_numpy()
    for name in ("visit_occurrence", "condition_occurrence", "measurement", "drug_exposure", "death"):
        omop.check_foreign_keys(name, chunk[name], "person_id", "person", person_ids)
    for name in ("condition_occurrence", "measurement", "drug_exposure"):
        omop.check_foreign_keys(name, chunk[name], "visit_occurrence_id", "visit_occurrence", visit_ids)


def build_chunk(chunk: dict[str, pa.Table], spec: CohortSpec, site: str) -> tuple[pd.DataFrame, Attrition]:
    """Return the cohort rows and attrition counts for one batch of persons."""
    _check_foreign_keys(chunk)
    attrition = Attrition(persons=chunk["person"].num_rows)
    visits = chunk["visit_occurrence"]
    v_person = visits.column("person_id").to_numpy()
    v_id = visits.column("visit_occurrence_id").to_numpy()
    v_concept = visits.column("visit_concept_id").to_numpy()
    v_start = _days(visits.column("visit_start_date"))
    v_end = _days(visits.column("visit_end_date"))
    v_from = visits.column("admitted_from_concept_id").fill_null(0).to_numpy()
    v_to = visits.column("discharged_to_concept_id").fill_null(0).to_numpy()
    inpatient = np.isin(v_concept, vocab.INPATIENT_VISITS)

    conditions = chunk["condition_occurrence"]
    c_code = conditions.column("condition_source_value")
    c_main = conditions.column("condition_status_concept_id").fill_null(0).to_numpy() == vocab.CONDITION_PRIMARY
    c_hf = _codes_matching(c_code, vocab.HF_INDEX_PREFIXES)
    hf_visit_ids = np.unique(conditions.column("visit_occurrence_id").fill_null(-1).to_numpy()[c_main & c_hf])

    start_day, end_day = _day(spec.study_start), _day(spec.study_end)
    hf_stay = inpatient & np.isin(v_id, hf_visit_ids)
    candidate = hf_stay & (v_start >= start_day) & (v_start <= end_day)
    attrition.hf_index_stays_in_window = int(candidate.sum())
    idx = np.flatnonzero(candidate)
    # First stay per patient: order by person, start date, visit id.
    idx = idx[np.lexsort((v_id[idx], v_start[idx], v_person[idx]))]
    if spec.one_index_per_patient and idx.size:
        first = np.ones(idx.size, bool)
        first[1:] = v_person[idx][1:] != v_person[idx][:-1]
        idx = idx[first]
    attrition.patients_with_index_stay = int(np.unique(v_person[idx]).size)
    attrition.index_stays_considered = int(idx.size)

    index = pd.DataFrame({
        "person_id": v_person[idx], "index_visit_id": v_id[idx],
        "admit": v_start[idx], "discharge": v_end[idx], "discharged_to": v_to[idx],
    })
    people = chunk["person"]
    person_frame = pd.DataFrame({
        "person_id": people.column("person_id").to_numpy(),
        "female": people.column("gender_concept_id").to_numpy() == vocab.GENDER_FEMALE,
        "birth": _birth_days(people),
    })
    index = index.merge(person_frame, on="person_id", how="left", validate="many_to_one")
    index["age"] = _age_years(index["birth"].to_numpy(), index["admit"].to_numpy())
    death = chunk["death"]
    death_day = pd.Series(_days(death.column("death_date")), index=death.column("person_id").to_numpy())
    death_day = death_day.groupby(level=0).min()
    died_by_discharge = index["person_id"].map(death_day).le(index["discharge"]).to_numpy()

    rules = [
        ("excluded_under_18", index["age"].to_numpy() < 18),
        ("excluded_died_in_hospital", (index["discharged_to"].to_numpy() == vocab.DISCHARGED_DIED) | died_by_discharge),
        ("excluded_transfer_out", index["discharged_to"].to_numpy() == vocab.DISCHARGED_TRANSFER),
        ("excluded_against_advice", index["discharged_to"].to_numpy() == vocab.DISCHARGED_AGAINST_ADVICE),
        ("excluded_short_followup", index["discharge"].to_numpy() + READMISSION_WINDOW_DAYS > _day(spec.followup_end)),
    ]
    keep = np.ones(len(index), bool)
    for name, rule in rules:
        hit = keep & rule
        setattr(attrition, name, int(hit.sum()))
        keep &= ~rule
    index = index.loc[keep].reset_index(drop=True)
    if index.empty:
        return pd.DataFrame(columns=[column for column in COHORT_COLUMNS if column != SPLIT]), attrition

    # Each event is paired with every index row of its person (one row per person
    # when one_index_per_patient), then filtered by that row's dates.
    features = _visit_features(index, v_person, v_concept, v_start, inpatient, hf_stay, spec.lookback_days)
    features.update(_condition_features(index, conditions, spec))
    features.update(_lab_features(index, chunk["measurement"]))
    features.update(_drug_features(index, chunk["drug_exposure"]))

    frame = pd.DataFrame({
        "person_id": index["person_id"].to_numpy(np.int64),
        "index_visit_id": index["index_visit_id"].to_numpy(np.int64),
        "site": site,
        "index_admission_date": index["admit"].to_numpy(np.int32),
        "index_discharge_date": index["discharge"].to_numpy(np.int32),
        "age": np.floor(index["age"].to_numpy()),
        "female": index["female"].to_numpy(np.int8),
        "los_days": (index["discharge"] - index["admit"]).to_numpy(np.float64),
        **features,
    })
    frame["egfr"] = np.round(egfr_ckd_epi_2021(frame["creatinine"], frame["age"], frame["female"].astype(bool)), 1)
    frame["charlson_index"] = frame.pop("charlson_index").astype(np.int8)
    frame["lace_score"] = lace_score(frame["los_days"], acute=np.ones(len(frame), bool),
                                     charlson=frame["charlson_index"], ed_visits=frame["ed_visits_180d"])
    frame[LABEL] = _readmitted(index, v_person, v_start, v_concept, v_from, inpatient)
    attrition.cohort = len(frame)
    attrition.readmitted_30d = int(frame[LABEL].sum())
    return frame, attrition


def _day(date: dt.date) -> int:
    return (date - _EPOCH).days


def _birth_days(people: pa.Table) -> np.ndarray:
    year = people.column("year_of_birth").to_numpy(zero_copy_only=False).astype(np.int64)
    month = people.column("month_of_birth").fill_null(7).to_numpy(zero_copy_only=False).astype(np.int64)
    day = people.column("day_of_birth").fill_null(1).to_numpy(zero_copy_only=False).astype(np.int64)
    months = (year - 1970) * 12 + (month - 1)
    return months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) + day - 1


def _age_years(birth: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Return the age in completed years on day `on` (days since 1970), exact on birthdays."""
    def year_and_month_day(days):
        date = np.asarray(days, dtype=np.int64).astype("datetime64[D]")
        month = date.astype("datetime64[M]")
        month_day = (month.astype(np.int64) % 12) * 32 + (date - month.astype("datetime64[D]")).astype(np.int64)
        return date.astype("datetime64[Y]").astype(np.int64), month_day

    (birth_year, birth_md), (year, md) = year_and_month_day(birth), year_and_month_day(on)
    return (year - birth_year - (md < birth_md)).astype(np.float64)


def _rows_of(index: pd.DataFrame, person: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (event positions, index rows): each event paired with every index row of its person.

    `index` is sorted by person_id; with one index stay per patient each event has at most one pair.
    """
    order = index["person_id"].to_numpy()
    first = np.searchsorted(order, person, side="left")
    count = np.searchsorted(order, person, side="right") - first
    events = np.repeat(np.arange(person.shape[0]), count)
    rows = np.repeat(first, count) + np.arange(events.size) - np.repeat(np.cumsum(count) - count, count)
    return events, rows


def _count_per_index(rows: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(rows[mask], minlength=n).astype(np.float64)


def _visit_features(index, v_person, v_concept, v_start, inpatient, hf_stay, lookback_days) -> dict[str, np.ndarray]:
    """Return admissions in the prior year, emergency visits in the prior 180 days, and whether an earlier
    inpatient stay in the look-back window had heart failure as its main diagnosis."""
    n = len(index)
    events, rows = _rows_of(index, v_person)
    start, admit = v_start[events], index["admit"].to_numpy()[rows]
    before = start < admit
    prior = inpatient[events] & before & (start >= admit - 365)
    ed = (v_concept[events] == vocab.VISIT_EMERGENCY) & before & (start >= admit - 180)
    earlier_hf = hf_stay[events] & before & (start >= admit - lookback_days)
    return {
        "prior_admissions_365d": _count_per_index(rows, prior, n),
        "ed_visits_180d": _count_per_index(rows, ed, n),
        "prior_hf_hospitalisation": (_count_per_index(rows, earlier_hf, n) > 0).astype(np.int8),
    }


def _condition_features(index: pd.DataFrame, conditions: pa.Table, spec: CohortSpec) -> dict[str, np.ndarray]:
    """Return each comorbidity flag and the Charlson index from diagnoses in the look-back window up to discharge."""
    n = len(index)
    events, rows = _rows_of(index, conditions.column("person_id").to_numpy())
    day = _days(conditions.column("condition_start_date"))[events]
    in_window = (day <= index["discharge"].to_numpy()[rows]) & (day >= index["admit"].to_numpy()[rows] - spec.lookback_days)
    code = conditions.column("condition_source_value")

    def has(prefixes: tuple[str, ...]) -> np.ndarray:
        return _count_per_index(rows, in_window & _codes_matching(code, prefixes)[events], n) > 0

    features = {name: has(vocab.COMORBIDITY_PREFIXES[name]).astype(np.int8) for name in COMORBIDITIES}
    group = {name: np.ones(n, bool) if name == "heart_failure" else has(prefixes)
             for name, (_weight, prefixes) in vocab.CHARLSON_GROUPS.items()}
    for severe, mild in vocab.CHARLSON_SUPERSEDES.items():
        group[mild] = group[mild] & ~group[severe]
    features["charlson_index"] = sum(weight * group[name] for name, (weight, _) in vocab.CHARLSON_GROUPS.items())
    return features


def _lab_features(index: pd.DataFrame, measurements: pa.Table) -> dict[str, np.ndarray]:
    n = len(index)
    events, rows = _rows_of(index, measurements.column("person_id").to_numpy())
    day = _days(measurements.column("measurement_date"))[events]
    value = measurements.column("value_as_number").to_numpy(zero_copy_only=False).astype(float)[events]
    during_stay = (day >= index["admit"].to_numpy()[rows]) & (day <= index["discharge"].to_numpy()[rows]) & ~np.isnan(value)
    code = measurements.column("measurement_source_value")
    out = {}
    for lab, (loinc, _unit) in vocab.LAB_LOINC.items():
        take = during_stay & _codes_matching(code, (), (loinc,))[events]
        result = np.full(n, np.nan)
        if take.any():
            # Last value of the stay: sort by (row, day) and keep the last per row.
            order = np.lexsort((day[take], rows[take]))
            taken_rows, taken_values = rows[take][order], value[take][order]
            last = np.ones(taken_rows.size, bool)
            last[:-1] = taken_rows[1:] != taken_rows[:-1]
            result[taken_rows[last]] = taken_values[last]
        out[lab] = result
    return out


def _drug_features(index: pd.DataFrame, drugs: pa.Table) -> dict[str, np.ndarray]:
    n = len(index)
    events, rows = _rows_of(index, drugs.column("person_id").to_numpy())
    discharge = index["discharge"].to_numpy()[rows]
    start = _days(drugs.column("drug_exposure_start_date"))[events]
    end = _days(drugs.column("drug_exposure_end_date"))[events]
    active = (start <= discharge) & (end >= discharge)
    code = drugs.column("drug_source_value")
    arni = _codes_matching(code, vocab.DRUG_ATC["arni"][0])[events]
    out = {}
    for drug, (prefixes, _codes) in vocab.DRUG_ATC.items():
        hit = _codes_matching(code, prefixes)[events]
        if drug == "ace_inhibitor_or_arb":
            hit &= ~arni
        out[f"on_{drug}"] = (_count_per_index(rows, active & hit, n) > 0).astype(np.int8)
    return out


def _readmitted(index, v_person, v_start, v_concept, v_from, inpatient) -> np.ndarray:
    n = len(index)
    events, rows = _rows_of(index, v_person)
    days_after = v_start[events] - index["discharge"].to_numpy()[rows]
    unplanned = (v_concept == vocab.VISIT_EMERGENCY_INPATIENT) | (v_from == vocab.ADMITTED_FROM_EMERGENCY_ROOM)
    hit = (inpatient & unplanned)[events] & (days_after >= 1) & (days_after <= READMISSION_WINDOW_DAYS)
    return (_count_per_index(rows, hit, n) > 0).astype(np.int8)


def lace_score(los_days, acute, charlson, ed_visits) -> np.ndarray:
    """Return the LACE index (0-19) from length of stay, acuity, Charlson index and ED visits."""
    los = np.asarray(los_days, dtype=float)
    l_points = np.select([los < 1, los < 2, los < 3, los < 4, los < 7, los < 14], [0, 1, 2, 3, 4, 5], 7)
    a_points = np.where(np.asarray(acute, bool), 3, 0)
    charlson = np.asarray(charlson, dtype=float)
    c_points = np.where(charlson >= 4, 5, charlson)
    e_points = np.minimum(np.asarray(ed_visits, dtype=float), 4)
    return (l_points + a_points + c_points + e_points).astype(np.int16)


def assign_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return "train"/"test" per row, stratified by label, with a seeded permutation."""
    split = np.full(labels.shape[0], "train", dtype=object)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        chosen = rng.permutation(members)[: int(round(test_fraction * members.size))]
        split[chosen] = "test"
    return split


# ---------------------------------------------------------------- entry point
def _cohort_batches(omop_dir: Path, spec: CohortSpec, site: str, progress: bool):
    """Yield (cohort rows, attrition) per person batch, each batch sorted by person and index stay."""
    omop_dir = Path(omop_dir)
    if not omop_dir.is_dir():
        raise FileNotFoundError(f"OMOP folder {omop_dir} does not exist")
    for chunk in tqdm(_person_batches(omop_dir), desc=f"cohort {site}", unit="batch", disable=not progress):
        frame, attrition = build_chunk(chunk, spec, site)
        # Persons never span batches, so sorting each batch sorts the whole cohort.
        yield frame.sort_values(["person_id", "index_visit_id"], kind="stable").reset_index(drop=True), attrition


def _no_stays(omop_dir: Path, spec: CohortSpec, site: str) -> ValueError:
    return ValueError(f"site {site!r}: no index heart-failure stays in {omop_dir} between "
                      f"{spec.study_start} and {spec.study_end}")


def site_split(labels: np.ndarray, spec: CohortSpec, site: str) -> np.ndarray:
    """Return the site's fixed train/test assignment, stratified by label and seeded by (seed, site)."""
    if np.unique(labels).size < 2:
        raise ValueError(f"site {site!r}: every index stay has {LABEL}={labels[0]}; a split needs both outcomes")
    site_seed = np.random.SeedSequence([spec.seed, *site.encode()])
    return assign_split(labels, spec.test_fraction, np.random.default_rng(site_seed))


def build_cohort(omop_dir: Path, spec: CohortSpec, site: str, progress: bool = True) -> tuple[pd.DataFrame, Attrition]:
    """Return the modelling cohort and attrition for the OMOP extract in `omop_dir` (held in memory)."""
    frames, total = [], Attrition()
    for frame, attrition in _cohort_batches(omop_dir, spec, site, progress):
        if len(frame):
            frames.append(frame)
        total.add(attrition)
    if not frames:
        raise _no_stays(omop_dir, spec, site)
    cohort = pd.concat(frames, ignore_index=True)
    cohort[SPLIT] = site_split(cohort[LABEL].to_numpy(), spec, site)
    return cohort[list(COHORT_COLUMNS)], total


def cohort_table(cohort: pd.DataFrame) -> pa.Table:
    """Return the cohort as an Arrow table with fixed types (dates as date32)."""
    table = pa.Table.from_pandas(cohort, preserve_index=False)
    for name in ("index_admission_date", "index_discharge_date"):
        position = table.schema.get_field_index(name)
        table = table.set_column(position, name, table.column(name).cast(pa.date32()))
    return table.replace_schema_metadata(None)


def write_cohort(omop_dir: Path, out_dir: Path | None = None, spec: CohortSpec | None = None,
                 site: str | None = None, progress: bool = True) -> tuple[Path, Attrition]:
    """Build the cohort of an OMOP folder and write cohort.parquet and attrition.json atomically.

    Streams: each person batch is written as it is built, keeping only the
    labels in memory; a second pass over the written batches adds the
    stratified split. Memory stays flat as the site grows.
    """
    omop_dir = Path(omop_dir)
    out_dir = Path(out_dir) if out_dir is not None else omop_dir.parent
    site = site or out_dir.name
    spec = spec or CohortSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{COHORT_FILE}.rows.", dir=out_dir)
    os.close(fd)
    try:
        writer, labels, total = None, [], Attrition()
        for frame, attrition in _cohort_batches(omop_dir, spec, site, progress):
            total.add(attrition)
            if not len(frame):
                continue
            table = cohort_table(frame[[column for column in COHORT_COLUMNS if column != SPLIT]])
            if writer is None:
                writer = pq.ParquetWriter(staging, table.schema, compression="snappy")
            writer.write_table(table.cast(writer.schema))
            labels.append(frame[LABEL].to_numpy())
        if writer is None:
            raise _no_stays(omop_dir, spec, site)
        writer.close()
        split = site_split(np.concatenate(labels), spec, site)

        def with_split(path: Path) -> None:
            rows = pq.ParquetFile(staging)
            out, offset = None, 0
            for group in range(rows.num_row_groups):
                table = rows.read_row_group(group)
                table = table.append_column(SPLIT, pa.array(split[offset:offset + table.num_rows], pa.string()))
                offset += table.num_rows
                out = out or pq.ParquetWriter(path, table.schema, compression="snappy")
                out.write_table(table)
            out.close()

        target = out_dir / COHORT_FILE
        atomic_write(target, with_split)
    finally:
        Path(staging).unlink(missing_ok=True)
    atomic_write(out_dir / ATTRITION_FILE,
                  lambda path: Path(path).write_text(json.dumps(asdict(total), indent=2) + "\n"))
    return target, total
