"""The synthetic generator: determinism, chunk independence and schema invariants."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_synth import generator, omop
from data_synth import vocabulary as vocab
from data_synth.cohort import CohortSpec, build_cohort
from data_synth.generator import GROUND_TRUTH_FILE, generate_chunk, generate_site
from data_synth.sites import DEFAULT_SITES, site_profile


def _omop_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "omop").glob("*.parquet"))}


def test_same_seed_gives_byte_identical_parquet(tmp_path):
    profile = site_profile("halland", {"patients": 600})
    generate_site(profile, 11, tmp_path / "a", progress=False)
    generate_site(profile, 11, tmp_path / "b", progress=False)
    a, b = _omop_bytes(tmp_path / "a"), _omop_bytes(tmp_path / "b")
    assert set(a) == {f"{t}.parquet" for t in omop.SCHEMAS}
    assert a == b
    assert (tmp_path / "a" / GROUND_TRUTH_FILE).read_bytes() == (tmp_path / "b" / GROUND_TRUTH_FILE).read_bytes()


def test_other_seed_or_site_gives_other_data(tmp_path):
    generate_site(site_profile("halland", {"patients": 600}), 11, tmp_path / "a", progress=False)
    generate_site(site_profile("halland", {"patients": 600}), 12, tmp_path / "b", progress=False)
    generate_site(site_profile("sahlgrenska", {"patients": 600}), 11, tmp_path / "c", progress=False)
    a, b, c = (_omop_bytes(tmp_path / x) for x in "abc")
    assert a["measurement.parquet"] != b["measurement.parquet"]
    assert a["measurement.parquet"] != c["measurement.parquet"]
    ids_a = pq.read_table(tmp_path / "a/omop/person.parquet").column("person_id").to_numpy()
    ids_c = pq.read_table(tmp_path / "c/omop/person.parquet").column("person_id").to_numpy()
    assert not np.intersect1d(ids_a, ids_c).size  # person ids never collide across sites


def test_chunks_do_not_depend_on_site_size(tmp_path, monkeypatch):
    monkeypatch.setattr(generator, "CHUNK_PATIENTS", 200)
    generate_site(site_profile("halland", {"patients": 250}), 5, tmp_path / "small", progress=False)
    generate_site(site_profile("halland", {"patients": 600}), 5, tmp_path / "large", progress=False)
    for table in omop.SCHEMAS:
        small = pq.ParquetFile(tmp_path / f"small/omop/{table}.parquet")
        large = pq.ParquetFile(tmp_path / f"large/omop/{table}.parquet")
        assert small.num_row_groups == 2 and large.num_row_groups == 3
        assert small.read_row_group(0).equals(large.read_row_group(0)), table


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    patients=st.integers(min_value=50, max_value=400),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    site=st.sampled_from(sorted(DEFAULT_SITES)),
    female=st.floats(min_value=0.0, max_value=1.0),
    missing=st.floats(min_value=0.0, max_value=1.0),
)
def test_generated_tables_satisfy_the_schema(patients, seed, site, female, missing):
    profile = site_profile(site, {
        "patients": patients, "female_fraction": female,
        "lab_missing": {lab: missing for lab in DEFAULT_SITES[site].lab_missing},
    })
    chunk = generate_chunk(profile, seed, 0, patients)
    tables = {name: omop.conform(name, table) for name, table in chunk.tables.items()}
    for name, table in tables.items():
        omop.validate_table(name, table)
        ids = table.column("person_id").to_numpy()
        assert np.all(ids[1:] >= ids[:-1]), f"{name} not sorted by person"
    person_ids = tables["person"].column("person_id").to_numpy()
    visit_ids = tables["visit_occurrence"].column("visit_occurrence_id").to_numpy()
    assert person_ids.size == patients
    assert set(tables) == set(omop.SCHEMAS)
    for name in ("visit_occurrence", "condition_occurrence", "measurement", "drug_exposure", "death",
                 "procedure_occurrence"):
        omop.check_foreign_keys(name, tables[name], "person_id", "person", person_ids)
    for name in ("condition_occurrence", "measurement", "drug_exposure", "procedure_occurrence"):
        omop.check_foreign_keys(name, tables[name], "visit_occurrence_id", "visit_occurrence", visit_ids)
    # Nobody has a visit after their death.
    visits = tables["visit_occurrence"].to_pandas()
    death = tables["death"].to_pandas().set_index("person_id")["death_date"]
    last_end = visits.groupby("person_id")["visit_end_date"].max()
    assert (last_end.reindex(death.index) <= death).all()
    risk = chunk.ground_truth.column("true_risk_30d").to_numpy()
    assert np.all((risk > 0) & (risk < 1))


def test_each_planned_device_stay_records_its_implantation_as_a_kva_procedure():
    chunk = generate_chunk(site_profile("sahlgrenska", {"patients": 4000}), 5, 0, 4000)
    tables = {name: omop.conform(name, table).to_pandas() for name, table in chunk.tables.items()}
    conditions, visits = tables["condition_occurrence"], tables["visit_occurrence"]
    procedures = tables["procedure_occurrence"]
    main = conditions[conditions["condition_status_concept_id"] == vocab.CONDITION_PRIMARY]
    device_stays = set(main.loc[main["condition_source_value"] == vocab.DEVICE_STAY_CODE, "visit_occurrence_id"])
    assert len(device_stays) > 10
    assert sorted(procedures["visit_occurrence_id"]) == sorted(device_stays)  # one implantation per device stay
    assert set(procedures["procedure_source_value"]) == set(vocab.DEVICE_PROCEDURES)
    stays = visits.set_index("visit_occurrence_id").loc[procedures["visit_occurrence_id"]]
    assert (stays["visit_concept_id"] == vocab.VISIT_INPATIENT).all()  # planned, not emergency
    assert (procedures["procedure_date"].to_numpy() == stays["visit_start_date"].to_numpy()).all()
    assert not main["condition_source_value"].str.match(r"^[A-Z]{3}[0-9]{2}$").any()  # no procedure code as a diagnosis


def test_cohort_finds_exactly_the_designed_index_stays(tmp_path):
    folder = tmp_path / "site"
    generate_site(site_profile("sahlgrenska", {"patients": 3000}), 3, folder, progress=False)
    cohort, attrition = build_cohort(folder / "omop", CohortSpec(seed=3), "sahlgrenska", progress=False)
    truth = pq.read_table(folder / GROUND_TRUTH_FILE).to_pandas()
    assert set(cohort["index_visit_id"]) <= set(truth["visit_occurrence_id"])
    assert attrition.cohort == len(cohort) and 0.6 * 3000 < len(cohort) < 3000
    rate = cohort["readmitted_30d"].mean()
    assert 0.12 < rate < 0.30  # docs/calibration.md "Readmission": 18-20% (small sample, wide bounds)
    merged = cohort.merge(truth, left_on="index_visit_id", right_on="visit_occurrence_id")
    # Labels follow the true risk: readmitted patients have higher true risk on average.
    by_label = merged.groupby("readmitted_30d")["true_risk_30d"].mean()
    assert by_label[1] > by_label[0] + 0.05


def test_site_profile_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="colour"):
        site_profile("halland", {"colour": "blue"})
    with pytest.raises(ValueError, match="lab_missing"):
        site_profile("halland", {"lab_missing": {"nt_probnp": 0.1}})
    with pytest.raises(ValueError, match="hf_code_weights"):
        site_profile("halland", {"hf_code_weights": {"I21.0": 1.0}})
    with pytest.raises(ValueError, match="unknown site"):
        site_profile("orebro")
