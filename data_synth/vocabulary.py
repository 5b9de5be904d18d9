"""Every code the synthetic EHR writes and the cohort builder reads.

One source of truth: ICD-10-SE diagnosis codes, LOINC laboratory codes with
their units, ATC drug classes and the OMOP concept ids used for visits,
sex, discharge destinations and record provenance. Source codes are written
in `*_source_value` columns with `*_concept_id` = 0 ("no matching concept"),
as in an OMOP extract loaded without the standard vocabulary mapping; the
cohort builder therefore reads source values.

The code lists are written in one canonical form: ICD-10 upper case with
the dot after the third character ("I50.9"), ATC upper case ("C03CA01").
Source systems differ (Swedish ones store ICD-10 without the dot, "I509"),
so codes read from an extract are first put in that form by
`normalise_icd10` and `normalise_atc`; the generator writes canonical codes,
which they leave unchanged.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# --- OMOP concept ids (standard OMOP vocabulary) -------------------------
GENDER_MALE = 8507
GENDER_FEMALE = 8532

VISIT_INPATIENT = 9201  # Inpatient Visit
VISIT_OUTPATIENT = 9202  # Outpatient Visit
VISIT_EMERGENCY = 9203  # Emergency Room Visit
VISIT_EMERGENCY_INPATIENT = 262  # Emergency Room and Inpatient Visit
INPATIENT_VISITS = (VISIT_INPATIENT, VISIT_EMERGENCY_INPATIENT)

ADMITTED_FROM_HOME = 8536  # Home
ADMITTED_FROM_EMERGENCY_ROOM = 8870  # Emergency Room - Hospital

DISCHARGED_HOME = 8536  # Home
DISCHARGED_DIED = 4216643  # Patient died
DISCHARGED_TRANSFER = 8717  # Inpatient Hospital (transfer to another acute hospital)
DISCHARGED_AGAINST_ADVICE = 4021968  # Patient self-discharge against medical advice

TYPE_EHR = 32817  # EHR (record provenance, all *_type_concept_id)
TYPE_EHR_PRESCRIPTION = 32838  # EHR prescription
CONDITION_PRIMARY = 32902  # Primary diagnosis
CONDITION_SECONDARY = 32908  # Secondary diagnosis

# --- ICD-10-SE diagnoses --------------------------------------------------
# Index heart-failure diagnoses (main diagnosis of the stay): I50.*, I11.0,
# I13.0, I13.2. The wider Swedish sets (I25.5, I42, ...) are not used.
HF_INDEX_CODES = ("I50.0", "I50.1", "I50.9", "I11.0", "I13.0", "I13.2")
#: A (normalised) code matches when it starts with one of these, so the
#: ICD-10-SE subdivisions of a listed code (I50.9A, I11.0X) count as it.
HF_INDEX_PREFIXES = ("I50", "I11.0", "I13.0", "I13.2")

#: Code written for each comorbidity, and the prefixes the cohort builder
#: recognises for it (ICD-10 chapter ranges, Charlson-style groups).
COMORBIDITY_CODES: dict[str, tuple[str, ...]] = {
    "hypertension": ("I10",),
    "atrial_fibrillation": ("I48.0", "I48.1", "I48.9"),
    "diabetes": ("E11.9", "E10.9", "E11.6"),
    "ischaemic_heart_disease": ("I25.1", "I25.9", "I20.9", "I25.2"),  # I25.2: old myocardial infarction
    "renal_failure": ("N18.4", "N18.3", "N19"),
    "copd": ("J44.9", "J44.1"),
    "psychiatric": ("F32.9", "F41.1", "F33.1"),
    "cancer": ("C61", "C50.9", "C18.9", "C34.9"),
    "valve_disease": ("I35.0", "I34.0", "I36.1"),
    "dementia": ("F03", "G30.9", "F01.9"),
}
#: Codes only one sex can carry (prostate, breast cancer: male breast cancer
#: is too rare to write): the generator draws them for that sex only.
SEX_SPECIFIC_CODES: dict[str, str] = {"C61": "male", "C50.9": "female"}
COMORBIDITY_PREFIXES: dict[str, tuple[str, ...]] = {
    "hypertension": ("I10", "I11", "I12", "I13", "I15"),
    "atrial_fibrillation": ("I48",),
    "diabetes": ("E10", "E11", "E12", "E13", "E14"),
    "ischaemic_heart_disease": ("I20", "I21", "I22", "I23", "I24", "I25"),
    "renal_failure": ("N17", "N18", "N19"),
    "copd": ("J43", "J44"),
    "psychiatric": ("F2", "F30", "F31", "F32", "F33", "F40", "F41"),
    "cancer": tuple(f"C{n:02d}" for n in range(0, 98)),
    "valve_disease": ("I34", "I35", "I36", "I37"),
    "dementia": ("F00", "F01", "F02", "F03", "G30"),
}

def _range(letter: str, first: int, last: int) -> tuple[str, ...]:
    """Return the ICD-10 categories letter+first .. letter+last ("I60".."I69")."""
    return tuple(f"{letter}{number:02d}" for number in range(first, last + 1))


def _subdivisions(category: str, digits: str) -> tuple[str, ...]:
    """Return the listed subdivisions of one category ("E10", "2345" -> E10.2 .. E10.5)."""
    return tuple(f"{category}.{digit}" for digit in digits)


_DIABETES = ("E10", "E11", "E12", "E13", "E14")
#: Charlson comorbidity groups as ICD-10 prefixes, with their weights: the
#: coding algorithm of Quan et al. 2005 (docs/calibration.md "Clinical
#: reference scores"), weights of Charlson 1987. Heart failure itself scores 1
#: for every cohort member. Where a patient has both, the complicated form
#: supersedes the uncomplicated one (CHARLSON_SUPERSEDES). I25.1 and I20.9
#: (chronic ischaemic heart disease, angina) are not myocardial infarction,
#: and E11.6 is diabetes *without* chronic complication in Quan's mapping.
CHARLSON_GROUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "heart_failure": (1, ()),
    "myocardial_infarction": (1, ("I21", "I22", "I25.2")),
    "peripheral_vascular": (1, ("I70", "I71", "I73.1", "I73.8", "I73.9", "I77.1", "I79.0", "I79.2", "K55.1",
                                "K55.8", "K55.9", "Z95.8", "Z95.9")),
    "cerebrovascular": (1, ("G45", "G46", "H34.0") + _range("I", 60, 69)),
    "dementia": (1, ("F00", "F01", "F02", "F03", "F05.1", "G30", "G31.1")),
    "chronic_pulmonary": (1, ("I27.8", "I27.9") + _range("J", 40, 47) + _range("J", 60, 67)
                          + ("J68.4", "J70.1", "J70.3")),
    "rheumatic": (1, ("M05", "M06", "M31.5", "M32", "M33", "M34", "M35.1", "M35.3", "M36.0")),
    "peptic_ulcer": (1, _range("K", 25, 28)),
    "mild_liver": (1, ("B18", "K70.0", "K70.1", "K70.2", "K70.3", "K70.9", "K71.3", "K71.4", "K71.5", "K71.7",
                       "K73", "K74", "K76.0", "K76.2", "K76.3", "K76.4", "K76.8", "K76.9", "Z94.4")),
    "diabetes": (1, tuple(code for category in _DIABETES for code in _subdivisions(category, "01689"))),
    "diabetes_with_complication": (2, tuple(code for category in _DIABETES for code in _subdivisions(category, "23457"))),
    "hemiplegia": (2, ("G04.1", "G11.4", "G80.1", "G80.2", "G81", "G82", "G83.0", "G83.1", "G83.2", "G83.3",
                       "G83.4", "G83.9")),
    "renal_disease": (2, ("I12.0", "I13.1", "N18", "N19", "N25.0", "Z49.0", "Z49.1", "Z49.2", "Z94.0", "Z99.2")
                      + _subdivisions("N03", "234567") + _subdivisions("N05", "234567")),
    "malignancy": (2, _range("C", 0, 26) + _range("C", 30, 34) + _range("C", 37, 41) + ("C43",)
                   + _range("C", 45, 58) + _range("C", 60, 76) + _range("C", 81, 85) + ("C88",)
                   + _range("C", 90, 97)),
    "severe_liver": (3, ("I85.0", "I85.9", "I86.4", "I98.2", "K70.4", "K71.1", "K72.1", "K72.9", "K76.5",
                         "K76.6", "K76.7")),
    "metastatic_tumour": (6, _range("C", 77, 80)),
    "hiv_aids": (6, ("B20", "B21", "B22", "B24")),
}
#: group -> the milder group it replaces when both are present.
CHARLSON_SUPERSEDES: dict[str, str] = {
    "diabetes_with_complication": "diabetes", "metastatic_tumour": "malignancy", "severe_liver": "mild_liver",
}

#: Main diagnoses of non-heart-failure admissions and emergency visits, with
#: their relative frequency (docs/calibration.md "Readmission": infections,
#: arrhythmia, renal and lung disease lead after heart failure itself; the
#: weights are assumptions) and the comorbidity a code requires: an
#: exacerbation of COPD, an atrial-fibrillation admission, a myocardial
#: infarction or acute kidney injury goes to a patient who has that condition
#: (the others get a code without a requirement).
OTHER_ADMISSION_CAUSES: dict[str, tuple[float, str | None]] = {
    "J18.9": (0.14, None),  # pneumonia
    "J22.9": (0.06, None),  # lower respiratory infection
    "A41.9": (0.06, None),  # sepsis
    "N39.0": (0.07, None),  # urinary tract infection
    "I48.9": (0.08, "atrial_fibrillation"),
    "I21.9": (0.06, "ischaemic_heart_disease"),  # myocardial infarction
    "I63.9": (0.04, None),  # ischaemic stroke
    "J44.1": (0.08, "copd"),  # COPD exacerbation
    "N17.9": (0.08, "renal_failure"),  # acute kidney injury
    "R07.4": (0.06, None),  # chest pain
    "R06.0": (0.05, None),  # dyspnoea
    "R55.9": (0.05, None),  # syncope
    "K92.2": (0.06, None),  # gastrointestinal bleeding
    "E87.1": (0.04, None),  # hyponatraemia
    "S72.0": (0.03, None),  # hip fracture
}
OTHER_ADMISSION_CODES = tuple(OTHER_ADMISSION_CAUSES)
#: Main diagnoses of planned (elective) admissions: device implantation,
#: elective angiography, scheduled chemotherapy.
PLANNED_ADMISSION_CODES = ("Z45.0", "I25.1", "Z51.1")
#: The planned stays whose procedure is a device implantation (main diagnosis Z45.0).
DEVICE_STAY_CODE = "Z45.0"
#: KVÅ (Socialstyrelsen's Klassifikation av vårdåtgärder) codes of the device implantations, recorded in
#: procedure_occurrence: a biventricular (CRT) pacemaker for reduced EF, a dual-chamber pacemaker
#: otherwise (the choice by EF is an assumption). Titles as Socialstyrelsen gives them
#: (docs/calibration.md "Codes", S28).
DEVICE_PROCEDURES: dict[str, str] = {
    "FPE26": "Inläggande av transvenös pacemaker med biventrikulära elektroder",
    "FPE20": "Inläggande av transvenös pacemaker med förmaks- och ventrikelelektrod",
}

# --- LOINC laboratory codes and units --------------------------------------
#: lab name -> (LOINC, unit as Swedish labs report it)
LAB_LOINC: dict[str, tuple[str, str]] = {
    "nt_probnp": ("33762-6", "ng/L"),
    "creatinine": ("14682-9", "umol/L"),
    "sodium": ("2951-2", "mmol/L"),
    "potassium": ("2823-3", "mmol/L"),
    "haemoglobin": ("718-7", "g/L"),
    "systolic_bp": ("8480-6", "mm[Hg]"),
    "lvef": ("10230-1", "%"),
}
LOINC_UNITS: dict[str, str] = {code: unit for code, unit in LAB_LOINC.values()}

# --- ATC drug classes -------------------------------------------------------
#: drug class -> (ATC prefix the cohort builder matches, code written)
DRUG_ATC: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "loop_diuretic": (("C03CA",), ("C03CA01", "C03CA02")),
    "ace_inhibitor_or_arb": (("C09A", "C09B", "C09C", "C09D"), ("C09AA05", "C09AA02", "C09CA01", "C09CA06")),
    "arni": (("C09DX04",), ("C09DX04",)),
    "beta_blocker": (("C07AB", "C07AG02"), ("C07AB02", "C07AB07", "C07AG02")),  # metoprolol, bisoprolol, carvedilol
    "mra": (("C03DA",), ("C03DA01", "C03DA04")),
    "sglt2_inhibitor": (("A10BK",), ("A10BK01", "A10BK03")),
}
#: ACE/ARB prefixes include C09D; ARNI (C09DX04) is taken out before matching.


# --- Normalising codes read from an extract -------------------------------
#: Any whitespace, inside a code or around it (RE2: ASCII \s and Unicode separators).
_WHITESPACE = r"[\s\p{Z}]+"
#: An ICD-10 category (letter, two digits) followed directly by a subdivision: the dot is missing.
_ICD10_WITHOUT_DOT = r"^([A-Z][0-9]{2})([0-9A-Z])"

CodeArray = pa.Array | pa.ChunkedArray


def normalise_icd10(codes: str | None | CodeArray) -> str | None | CodeArray:
    """Return ICD-10 codes in the code lists' form: no spaces, upper case, dot after the third character.

    "I509" -> "I50.9", " i50.9 " -> "I50.9", "I50" -> "I50", "I509A" -> "I50.9A"
    (an ICD-10-SE subdivision keeps matching its parent). A value that is no
    ICD-10 code ("150.9", "I5") gets no dot, only the spaces and case
    rewritten, so that validation can name it. Takes one code or a pyarrow
    array of codes (plain or dictionary-encoded strings, chunked or not) and
    returns the same kind.
    """
    return _normalised(codes, _icd10_text)


def normalise_atc(codes: str | None | CodeArray) -> str | None | CodeArray:
    """Return ATC codes in the code lists' form: no spaces, upper case (" c03ca01" -> "C03CA01").

    Takes one code or a pyarrow array of codes, as `normalise_icd10` does.
    """
    return _normalised(codes, _compact_upper)


def _compact_upper(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(pc.utf8_upper(text), _WHITESPACE, "")


def _icd10_text(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(_compact_upper(text), _ICD10_WITHOUT_DOT, r"\1.\2")


def _normalised(codes, rewrite):
    if codes is None or isinstance(codes, str):
        return rewrite(pa.array([codes], pa.string()))[0].as_py()
    if isinstance(codes, pa.ChunkedArray):
        return pa.chunked_array([_normalised(chunk, rewrite) for chunk in codes.chunks], type=codes.type)
    if not pa.types.is_dictionary(codes.type):
        return rewrite(codes)
    # Rewrite the distinct values only, then point each row at its rewritten value.
    dictionary = rewrite(codes.dictionary)
    if dictionary.equals(codes.dictionary):
        return codes  # already canonical, as the generator writes them
    # Two spellings of one code ("I509", "I50.9") become one dictionary entry.
    merged = pc.dictionary_encode(dictionary)
    indices = pc.take(merged.indices, codes.indices).cast(codes.type.index_type)
    return pa.DictionaryArray.from_arrays(indices, merged.dictionary)
