"""Codes as a real extract writes them: without the dot, in any case, with stray spaces.

Swedish systems store ICD-10 codes without the dot (I509, I110, I132). The
cohort builder reads every diagnosis and drug code through
`vocabulary.normalise_icd10` / `normalise_atc`, so such an extract gives the
cohort of the dotted original; without the normaliser it is refused, and
without the code check as well it silently loses index stays.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_synth import omop
from data_synth import vocabulary as vocab
from data_synth.cohort import CohortSpec, build_cohort
from data_synth.generator import generate_site
from data_synth.omop import OmopValidationError
from data_synth.sites import site_profile
from data_synth.vocabulary import normalise_atc, normalise_icd10
from omop_fixture import ADMIT, DISCHARGE, anchors, hf_patient, index_visit_id, omop_tables, write_patients

CONDITION = ("condition_occurrence", "condition_source_value")
DRUG = ("drug_exposure", "drug_source_value")


# ---------------------------------------------------------------- the normaliser
@pytest.mark.parametrize("source, canonical", [
    ("I50.9", "I50.9"),      # already canonical: unchanged
    ("I509", "I50.9"),       # Swedish: no dot
    ("I110", "I11.0"),
    ("I130", "I13.0"),
    ("I132", "I13.2"),
    ("i50.9 ", "I50.9"),     # lower case, trailing space
    (" i509\t", "I50.9"),
    ("I50 9", "I50.9"),      # a space inside
    ("\u00a0I509", "I50.9"),  # a non-breaking space (spreadsheet exports)
    ("I50", "I50"),          # a category alone: no dot to insert
    ("I10", "I10"),
    ("F03", "F03"),
    ("I509A", "I50.9A"),     # ICD-10-SE fifth character: keeps its parent's prefix
    ("I50.9A", "I50.9A"),
    ("S7200", "S72.00"),
    ("150.9", "150.9"),      # digit one for the letter I: not a code, left for validation to name
    ("I5", "I5"),
    ("", ""),
    (None, None),
])
def test_icd10_codes_are_read_in_the_form_of_the_code_lists(source, canonical):
    assert normalise_icd10(source) == canonical


@pytest.mark.parametrize("source, canonical", [
    ("C03CA01", "C03CA01"),
    ("c03ca01", "C03CA01"),
    (" C07AB07 ", "C07AB07"),
    ("C09 DX04", "C09DX04"),
    ("A10BK", "A10BK"),
    (None, None),
])
def test_atc_codes_are_upper_cased_and_stripped_never_dotted(source, canonical):
    assert normalise_atc(source) == canonical


def test_every_code_the_lists_hold_is_already_canonical():
    # So the generator's output, written from these lists, passes through unchanged.
    icd10 = {*vocab.HF_INDEX_CODES, *vocab.HF_INDEX_PREFIXES, *vocab.OTHER_ADMISSION_CODES,
             *vocab.PLANNED_ADMISSION_CODES, *(c for codes in vocab.COMORBIDITY_CODES.values() for c in codes),
             *(c for codes in vocab.COMORBIDITY_PREFIXES.values() for c in codes)}
    atc = {c for prefixes, codes in vocab.DRUG_ATC.values() for c in (*prefixes, *codes)}
    assert [code for code in sorted(icd10) if normalise_icd10(code) != code] == []
    assert [code for code in sorted(atc) if normalise_atc(code) != code] == []


def test_arrays_plain_dictionary_and_chunked_give_the_scalar_answers():
    sources = ["I509", "I50.9", "i509 ", None, "I10", "I110"]
    expected = [normalise_icd10(code) for code in sources]
    plain = pa.array(sources, pa.string())
    assert normalise_icd10(plain).to_pylist() == expected
    encoded = plain.dictionary_encode()
    normalised = normalise_icd10(encoded)
    assert normalised.type == encoded.type
    assert normalised.cast(pa.string()).to_pylist() == expected
    # The three spellings of I50.9 become one dictionary entry.
    assert sorted(normalised.dictionary.to_pylist()) == ["I10", "I11.0", "I50.9"]
    chunked = pa.chunked_array([encoded, encoded.slice(2)])
    assert normalise_icd10(chunked).cast(pa.string()).to_pylist() == expected + expected[2:]


def test_a_canonical_dictionary_array_is_returned_as_it_is():
    encoded = pa.array(["I50.9", "I10", "I50.9"]).dictionary_encode()
    assert normalise_icd10(encoded) is encoded


# ---------------------------------------------------------------- validation and rules
def test_an_undotted_code_passes_validation_and_a_non_code_still_fails():
    table = omop_tables(conditions=[{"person_id": 1, "condition_start_date": ADMIT, "condition_source_value": code}
                                    for code in ("I509", " i132")])["condition_occurrence"]
    conformed = omop.conform("condition_occurrence", table)
    omop.validate_table("condition_occurrence", conformed)
    assert conformed.column("condition_source_value").cast(pa.string()).to_pylist() == ["I50.9", "I13.2"]
    broken = table.set_column(7, "condition_source_value", pa.array(["I509", "150.9"]))
    with pytest.raises(OmopValidationError, match=r"condition_source_value: code does not match .* as read"):
        omop.validate_table("condition_occurrence", omop.conform("condition_occurrence", broken))


def test_swedish_spellings_make_index_stays_comorbidities_and_drugs(tmp_path):
    undotted = hf_patient(1, hf_code="I110")          # hypertensive heart disease with HF, no dot
    lower = hf_patient(2, hf_code=" i132 ")           # lower case with spaces
    subdivided = hf_patient(3, hf_code="I509A")       # an ICD-10-SE subdivision of I50.9
    not_hf = hf_patient(4, hf_code="I119")            # I11.9: hypertensive heart disease without HF
    undotted.diagnosis("e119", ADMIT, index_visit_id(undotted))  # diabetes
    undotted.drug(" c03ca01", ADMIT, DISCHARGE)                  # loop diuretic
    omop_dir = write_patients(tmp_path, undotted, lower, subdivided, not_hf, *anchors())
    frame, _ = build_cohort(omop_dir, CohortSpec(), "s", progress=False)
    frame = frame.set_index("person_id")
    assert sorted(frame.index) == [1, 2, 3, 901, 902]
    assert frame.loc[1, "diabetes"] == 1 and frame.loc[1, "hypertension"] == 1
    assert frame.loc[1, "on_loop_diuretic"] == 1
    assert frame.loc[2, "diabetes"] == 0 and frame.loc[2, "on_loop_diuretic"] == 0


# ---------------------------------------------------------------- a whole extract
@pytest.fixture(scope="module")
def dotted_site(tmp_path_factory) -> tuple:
    """A small synthetic site (codes as the generator writes them) and its cohort."""
    folder = tmp_path_factory.mktemp("dotted")
    omop_dir = generate_site(site_profile("sahlgrenska", {"patients": 600}), 3, folder, progress=False)
    spec = CohortSpec(seed=3)
    return omop_dir, spec, *build_cohort(omop_dir, spec, "s", progress=False)


def _as_a_swedish_system_writes_them(codes: pa.ChunkedArray, drop_dots: bool, spellings: bool) -> pa.Array:
    """Return the codes without dots (ICD-10) and, with `spellings`, in three by row: as is, lower case, padded."""
    text = codes.combine_chunks().cast(pa.string())
    if drop_dots:
        text = pc.replace_substring(text, ".", "")
    if not spellings:
        return text
    row = np.arange(len(text)) % 3
    padded = pc.binary_join_element_wise(" ", text, "\t", "")
    return pc.if_else(pa.array(row == 1), pc.utf8_lower(text), pc.if_else(pa.array(row == 2), padded, text))


def _rewritten_extract(omop_dir, out_dir, suffix: str, spellings: bool = True):
    out_dir.mkdir()
    for name in omop.TABLE_NAMES:
        table = pq.read_table(omop_dir / f"{name}.parquet")
        for (table_name, column), drop_dots in ((CONDITION, True), (DRUG, False)):
            position = table.schema.get_field_index(column)
            if table_name == name:
                table = table.set_column(position, column,
                                         _as_a_swedish_system_writes_them(table.column(column), drop_dots, spellings))
        if suffix == ".csv":
            pacsv.write_csv(table.cast(pa.schema([
                field.with_type(pa.string()) if pa.types.is_dictionary(field.type) else field
                for field in table.schema])), out_dir / f"{name}.csv")
        else:
            pq.write_table(table, out_dir / f"{name}.parquet")
    return out_dir


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_undotted_lower_case_extract_gives_the_dotted_cohort(dotted_site, tmp_path, suffix):
    omop_dir, spec, dotted, dotted_attrition = dotted_site
    swedish = _rewritten_extract(omop_dir, tmp_path / "swedish", suffix)
    written = pq.read_table(swedish / "condition_occurrence.parquet") if suffix == ".parquet" else None
    if written is not None:  # the rewrite really removed every dot
        assert not pc.any(pc.match_substring(written.column("condition_source_value"), ".")).as_py()
    cohort, attrition = build_cohort(swedish, spec, "s", progress=False)
    pd.testing.assert_frame_equal(cohort, dotted)
    assert attrition == dotted_attrition


def test_without_the_normaliser_the_undotted_extract_is_refused_or_loses_stays(dotted_site, tmp_path, monkeypatch):
    omop_dir, spec, dotted, dotted_attrition = dotted_site
    # Dots dropped only: the stays lost below are lost for the missing dot alone.
    swedish = _rewritten_extract(omop_dir, tmp_path / "swedish", ".parquet", spellings=False)
    monkeypatch.setitem(omop.CODE_NORMALISERS, CONDITION, lambda codes: codes)
    monkeypatch.setitem(omop.CODE_NORMALISERS, DRUG, lambda codes: codes)
    with pytest.raises(OmopValidationError, match="condition_source_value"):
        build_cohort(swedish, spec, "s", progress=False)
    # With the code check off too, the extract is read but I11.0, I13.0, I13.2 stays are missed.
    monkeypatch.setattr(omop, "CODE_PATTERNS", {})
    cohort, attrition = build_cohort(swedish, spec, "s", progress=False)
    assert attrition.hf_index_stays_in_window < dotted_attrition.hf_index_stays_in_window
    assert len(cohort) < len(dotted)
