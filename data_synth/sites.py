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

#: The named terms of the true readmission risk (data_synth.risk.risk_terms), in order: the keys a site's
#: `risk_effect_scale` may use.
RISK_TERMS: tuple[str, ...] = (
    "prior_admissions", "prior_hf_hospitalisation", "ed_visits", "length_of_stay", "comorbidity_burden",
    "renal_function", "copd", "psychiatric", "diabetes", "cancer", "nt_probnp", "anaemia", "hyponatraemia",
    "potassium", "age", "female", "systolic_bp", "guideline_drugs", "reduced_ef", "frailty", "unrecorded_risk",
    "frailty_with_prior_admissions",
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
    # ---- How this hospital differs from others (docs/calibration.md "Site differences"; each knob at its
    # neutral value makes no difference, and the data card shows the transport gap each one produces).
    # Concept shift: multipliers of named terms of the true risk (RISK_TERMS above), e.g. follow-up
    # care that weakens how prior admissions relate to readmission. Missing terms are 1.
    risk_effect_scale: dict[str, Annotated[float, Field(ge=0, le=3)]] = {}
    # Share of discharged patients followed up by a nurse-led heart-failure clinic (lowers their risk by
    # the generator's FOLLOW_UP_CLINIC_LOG_OR; not recorded in the extract).
    follow_up_clinic: Fraction = 0.0
    # Ascertainment: share of a patient's hospital admissions (before and after the index stay) that happen
    # where this site's extract can see them; the rest are at other hospitals and never reach the record.
    record_coverage: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Assay calibration: each lab's recorded value is the true one times this factor (missing labs are 1).
    lab_calibration: dict[str, Annotated[float, Field(ge=0.5, le=2.0)]] = {}
    # Referral and elective activity: mean planned admissions (device, angiography) in the year before the
    # index stay; recorded as inpatient stays, so they count among prior admissions, but carry no risk.
    elective_admissions_365d: Annotated[float, Field(ge=0, le=5)] = 0.0
    # Calendar effects: log-odds shift of readmission by index year (e.g. fewer admissions in 2020).
    calendar_logit_shift: dict[int, Annotated[float, Field(ge=-3, le=3)]] = {}

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
        for field, known in (("risk_effect_scale", RISK_TERMS), ("lab_calibration", LABS)):
            unknown = sorted(set(getattr(self, field)) - set(known))
            if unknown:
                raise ValueError(f"{field}: unknown keys {unknown}; known: {list(known)}")
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

#: Readmission log-odds by index year, both sites: fewer heart-failure admissions in 2020 (Denmark's
#: spring lockdown: about 30% fewer, S33; a quarter of the year, so about -0.10 for the year: assumption).
_CALENDAR = {2020: -0.10}

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
        # Recorded 30-day rate near 19% (docs/calibration.md "Readmission") once readmissions elsewhere,
        # the follow-up clinic and 2020 are accounted for.
        readmission_logit_shift=0.07,
        # Site differences (docs/calibration.md "Site differences"). A region-wide record sees the
        # region's hospitals; readmissions outside the region are missed (assumption).
        record_coverage=0.95,
        follow_up_clinic=0.40,  # assumption
        # Assays within published between-laboratory spreads: creatinine 4-5% (Equalis, S31),
        # NT-proBNP method slopes 0.83-1.20 (S32); the other site is the reference.
        lab_calibration={"creatinine": 1.04, "nt_probnp": 1.10},
        elective_admissions_365d=0.05,  # assumption: few planned stays at a county hospital
        calendar_logit_shift=_CALENDAR,
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
        # Recorded 30-day rate near SU/Ostra's 20.3% (Wideqvist 2021, from the hospital's own records) once
        # the readmissions elsewhere (17%), the clinic and 2020 are accounted for: a true rate near 24%.
        readmission_logit_shift=0.55,
        # One hospital's record: 16.8% of heart-failure readmissions happen elsewhere (McAlister 2017, S29).
        record_coverage=0.83,
        follow_up_clinic=0.60,  # assumption: a university hospital's nurse-led clinic
        # Follow-up care changes how risk works (assumption on the sizes, tuned to the published transport
        # loss, S30): frequent admissions are caught by the clinic, and guideline drugs are titrated.
        risk_effect_scale={"prior_admissions": 0.6, "guideline_drugs": 1.6},
        elective_admissions_365d=0.30,  # assumption: device and angiography stays at a referral centre
        calendar_logit_shift=_CALENDAR,
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
