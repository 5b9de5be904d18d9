"""Site profiles: how the synthetic hospitals differ, calibrated to published figures.

Every default below cites its anchor, listed with its full source in
docs/calibration.md; the data card reports the realised value next to the
target. A profile is
validated like any parameter: unknown keys and out-of-range values are errors.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

#: Comorbidities the generator simulates; the keys of every prevalence table.
COMORBIDITIES = (
    "hypertension",
    "atrial_fibrillation",
    "diabetes",
    "ischaemic_heart_disease",
    "renal_failure",
    "copd",
    "psychiatric",
    "cancer",
    "valve_disease",
    "dementia",
)

#: Index-stay laboratory tests (keys of missingness tables; LOINC in vocabulary).
LABS = ("nt_probnp", "creatinine", "sodium", "potassium", "haemoglobin", "systolic_bp", "lvef")


class SiteProfile(BaseModel):
    """One hospital's synthetic population and recording habits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    site_code: Annotated[int, Field(ge=1, le=250)]
    patients: Annotated[int, Field(ge=50, le=50_000_000)]
    # Demography. National register HF median age 80 [71-87]; SwedeHF 77 [69-84].
    age_median: Annotated[float, Field(ge=40, le=95)]
    age_sd: Annotated[float, Field(gt=0, le=25)]
    # National register 46.5% women; SwedeHF 38%.
    female_fraction: Fraction
    # Comorbidity prevalence (national register and SwedeHF ranges).
    comorbidity_prevalence: dict[str, Fraction]
    # EF classes among known EF: Davidge 2022 (Halland); SwedeHF 49/25/26.
    # EF missingness is lab_missing["lvef"] (Davidge 2022: 43% in Halland).
    ef_class_probs: Annotated[list[Fraction], Field(min_length=3, max_length=3)]  # HFrEF, HFmrEF, HFpEF
    # Probability a lab is not recorded during the index stay.
    lab_missing: dict[str, Fraction]
    # Probability a lab drawn at admission is repeated before discharge.
    lab_repeat_before_discharge: Fraction
    # Coding habits: share of HF stays coded as the main diagnosis, share of
    # present comorbidities that get coded, and the ICD-10-SE HF codes used.
    hf_main_diagnosis: Fraction
    comorbidity_coding_completeness: Fraction
    hf_code_weights: dict[str, Annotated[float, Field(ge=0)]]
    # Length of stay, SwedeHF median 5 [3-9].
    los_median_days: Annotated[float, Field(gt=0, le=30)]
    # Discharge outcomes of the index stay (assumptions, US and older Swedish figures).
    in_hospital_death: Fraction
    transfer_out: Fraction
    against_advice: Fraction
    planned_readmission: Fraction
    # Drug habits: ARNI share among RAS inhibition (assumption: higher at SU).
    arni_share: Fraction
    # Site shift of the ground-truth log-odds (base rate: SU/Ostra 20.3%).
    readmission_logit_shift: Annotated[float, Field(ge=-3, le=3)]

    @model_validator(mode="after")
    def _known_keys(self) -> "SiteProfile":
        for field, expected in (
            ("comorbidity_prevalence", COMORBIDITIES),
            ("lab_missing", LABS),
        ):
            given = set(getattr(self, field))
            if given != set(expected):
                missing = sorted(set(expected) - given)
                unknown = sorted(given - set(expected))
                raise ValueError(
                    f"{field} must name exactly {list(expected)}; "
                    f"missing {missing}, unknown {unknown}"
                )
        from data_synth.vocabulary import HF_INDEX_CODES

        unknown_codes = sorted(set(self.hf_code_weights) - set(HF_INDEX_CODES))
        if unknown_codes or not self.hf_code_weights:
            raise ValueError(
                f"hf_code_weights must use heart-failure index codes {list(HF_INDEX_CODES)}; "
                f"unknown {unknown_codes}"
            )
        if sum(self.hf_code_weights.values()) <= 0:
            raise ValueError("hf_code_weights must have a positive total")
        if abs(sum(self.ef_class_probs) - 1.0) > 1e-6:
            raise ValueError(f"ef_class_probs must sum to 1, got {sum(self.ef_class_probs):.4f}")
        if self.in_hospital_death + self.transfer_out + self.against_advice >= 1:
            raise ValueError("in_hospital_death + transfer_out + against_advice must be below 1")
        return self


_SHARED_PREVALENCE = {
    # National patient register / SwedeHF ranges (docs/calibration.md "Comorbidities").
    "hypertension": 0.60,
    "atrial_fibrillation": 0.50,
    "diabetes": 0.25,
    "ischaemic_heart_disease": 0.48,
    "renal_failure": 0.14,
    "copd": 0.13,
    "psychiatric": 0.12,  # assumption: depression/anxiety diagnoses
    "cancer": 0.10,  # assumption
    "valve_disease": 0.09,  # SwedeHF aetiology: valve disease about 8%
    "dementia": 0.06,  # assumption
}

#: The two pilot hospitals. Region Halland: three hospitals, regional; about
#: 7,500 HF patients in 2012-2016 (Ashfaq 2019). Sahlgrenska (Region Vastra
#: Gotaland): a university hospital, larger.
DEFAULT_SITES: dict[str, SiteProfile] = {
    "halland": SiteProfile(
        site_code=1,
        patients=8_000,
        age_median=80.0,
        age_sd=11.0,
        female_fraction=0.45,
        comorbidity_prevalence=_SHARED_PREVALENCE,
        ef_class_probs=[0.35, 0.27, 0.38],
        lab_missing={
            "nt_probnp": 0.30,
            # Routine inpatient chemistry is almost always taken (assumption).
            "creatinine": 0.01,
            "sodium": 0.01,
            "potassium": 0.01,
            "haemoglobin": 0.01,
            "systolic_bp": 0.10,
            "lvef": 0.40,  # Davidge 2022: 43% without a conclusive EF
        },
        lab_repeat_before_discharge=0.35,
        hf_main_diagnosis=0.88,
        comorbidity_coding_completeness=0.80,
        hf_code_weights={"I50.9": 0.70, "I50.1": 0.12, "I50.0": 0.10, "I11.0": 0.06, "I13.0": 0.02},
        los_median_days=5.0,
        in_hospital_death=0.04,
        transfer_out=0.03,
        against_advice=0.01,
        planned_readmission=0.03,
        arni_share=0.08,
        readmission_logit_shift=-0.10,
    ),
    "sahlgrenska": SiteProfile(
        site_code=2,
        patients=14_000,
        age_median=78.0,
        age_sd=11.5,
        female_fraction=0.42,
        comorbidity_prevalence={
            **_SHARED_PREVALENCE,
            "ischaemic_heart_disease": 0.51,  # assumption: tertiary referrals
            "valve_disease": 0.12,
            "cancer": 0.12,
        },
        ef_class_probs=[0.45, 0.25, 0.30],
        lab_missing={
            "nt_probnp": 0.12,
            "creatinine": 0.005,
            "sodium": 0.005,
            "potassium": 0.005,
            "haemoglobin": 0.005,
            "systolic_bp": 0.05,
            "lvef": 0.25,  # assumption: more echocardiography at a university hospital
        },
        lab_repeat_before_discharge=0.70,
        hf_main_diagnosis=0.92,
        comorbidity_coding_completeness=0.92,
        hf_code_weights={
            "I50.9": 0.30, "I50.0": 0.25, "I50.1": 0.20, "I11.0": 0.15, "I13.0": 0.06, "I13.2": 0.04,
        },
        los_median_days=5.5,
        in_hospital_death=0.04,
        transfer_out=0.02,
        against_advice=0.01,
        planned_readmission=0.04,
        arni_share=0.20,
        readmission_logit_shift=0.0,
    ),
}

SITE_NAMES: tuple[str, ...] = tuple(DEFAULT_SITES)


def site_profile(name: str, overrides: dict | None = None, template: str | None = None) -> SiteProfile:
    """Return the profile for site `name`, defaults from `template` (or itself) plus overrides."""
    base_name = template or name
    if base_name not in DEFAULT_SITES:
        raise ValueError(
            f"unknown site {base_name!r}: known sites are {list(SITE_NAMES)}; "
            "a new site needs `template: <known site>`"
        )
    merged = DEFAULT_SITES[base_name].model_dump()
    merged.update(overrides or {})
    return SiteProfile.model_validate(merged)
