"""What the modelling table holds: its variables, label, split and file names.

One source of truth for the cohort's columns, read by the cohort builder, the
data card, the federated layer and the report. Pure facts: this module
imports only the code lists (`vocabulary`) and the comorbidity names
(`sites`), so anything may import it without pulling in the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_synth import vocabulary as vocab
from data_synth.sites import COMORBIDITIES

#: The cohort file a site folder holds, and its attrition counts beside it.
COHORT_FILE = "cohort.parquet"
ATTRITION_FILE = "attrition.json"


@dataclass(frozen=True)
class Feature:
    """One modelling variable: its name, kind and why the model needs it (data minimisation)."""

    name: str
    kind: str  # "numeric" | "binary"
    source: str
    why: str


#: The modelling variables, in column order. The one list every stage imports.
FEATURES: tuple[Feature, ...] = (
    Feature("age", "numeric", "person (birth date) and index admission date", "risk rises with age (weak)"),
    Feature("female", "binary", "person.gender_concept_id", "women have slightly lower readmission risk"),
    Feature("los_days", "numeric", "index visit start and end", "longer stays signal severity (LACE L)"),
    Feature("prior_admissions_365d", "numeric", "inpatient visits in the year before admission", "the strongest known predictor"),
    Feature("ed_visits_180d", "numeric", "emergency visits in the 180 days before admission", "utilisation predicts readmission (LACE E)"),
    Feature("prior_hf_hospitalisation", "binary", "an inpatient stay with heart failure as main diagnosis in the look-back before admission",
            "earlier heart-failure stays mark established, more advanced disease"),
    *(
        Feature(name, "binary", f"ICD-10 {', '.join(vocab.COMORBIDITY_PREFIXES[name][:4])}... up to discharge",
                "comorbidity burden drives readmission (LACE C)")
        for name in COMORBIDITIES
    ),
    Feature("nt_probnp", "numeric", "LOINC 33762-6, last value of the stay", "congestion and severity of heart failure"),
    Feature("creatinine", "numeric", "LOINC 14682-9, last value of the stay", "renal function"),
    Feature("egfr", "numeric", "CKD-EPI 2021 from creatinine, age and sex", "renal dysfunction raises risk (threshold effects)"),
    Feature("sodium", "numeric", "LOINC 2951-2, last value of the stay", "hyponatraemia raises risk"),
    Feature("potassium", "numeric", "LOINC 2823-3, last value of the stay", "both low and high potassium raise risk"),
    Feature("haemoglobin", "numeric", "LOINC 718-7, last value of the stay", "anaemia raises risk"),
    Feature("systolic_bp", "numeric", "LOINC 8480-6, last value of the stay", "higher pressure is protective"),
    Feature("lvef", "numeric", "LOINC 10230-1 (echocardiography) during the stay", "heart-failure phenotype"),
    *(
        Feature(f"on_{drug}", "binary", f"ATC {', '.join(vocab.DRUG_ATC[drug][0])} active at discharge",
                "recommended drugs lower risk; prescribing differs by site")
        for drug in vocab.DRUG_ATC
    ),
)
FEATURE_NAMES: tuple[str, ...] = tuple(feature.name for feature in FEATURES)
LABEL = "readmitted_30d"
#: Columns besides the features. person_id stays at the site (de-duplication,
#: splitting); no later stage sends it anywhere.
KEY_COLUMNS = ("person_id", "index_visit_id", "site", "index_admission_date", "index_discharge_date")
#: Clinical scores kept for description and as references, not as model inputs:
#: the Charlson index is a fixed sum of comorbidity flags the model already
#: has, and an exactly collinear input made training ill-conditioned.
SCORE_COLUMNS = ("charlson_index", "lace_score")
SPLIT = "split"
COHORT_COLUMNS = (*KEY_COLUMNS, *FEATURE_NAMES, *SCORE_COLUMNS, LABEL, SPLIT)
