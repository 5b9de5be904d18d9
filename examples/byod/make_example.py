"""Write the worked bring-your-own-data example: one flat CSV with four hospitals.

The rows come from the synthetic generator and cohort builder, then are
dressed as a typical hospital export: other column names, text codes for
sex and the outcome, ejection fraction as a category, a patient reference
with a few repeated rows (de-duplicated by the pipeline), a small hospital
that does not measure NT-proBNP (Vaxjo), and a very small unit none of whose
exported patients was readmitted (Ljungby: the script keeps only its
non-readmitted rows, to show a single-class site, which real multi-site data
have). It is not the OMOP path: the pipeline reads only this CSV and
four-sites.yaml.

    .venv/bin/python examples/byod/make_example.py            # rewrites examples/byod/hospitals.csv
    .venv/bin/python examples/byod/make_example.py --out /tmp/x.csv

Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_synth.cohort import CohortSpec, write_cohort  # noqa: E402
from data_synth.features import LABEL  # noqa: E402
from data_synth.generator import generate_site  # noqa: E402
from data_synth.sites import site_profile  # noqa: E402

SEED = 20240601
#: (hospital label in the CSV, synthetic template, patients generated, site code)
HOSPITALS = (("Varberg", "halland", 800, 11), ("Molndal", "sahlgrenska", 1300, 12), ("Vaxjo", "halland", 60, 13),
             ("Ljungby", "sahlgrenska", 50, 14))
#: The small hospital does not measure NT-proBNP (the dataset YAML says `lacks: [ntprobnp]`).
NO_NT_PROBNP = "Vaxjo"
#: The very small unit whose exported patients have one outcome class (no readmission).
SINGLE_CLASS = "Ljungby"
RENAMED = {
    "age": "age_years", "los_days": "length_of_stay", "prior_admissions_365d": "admissions_prev_year",
    "ed_visits_180d": "ed_visits_6m", "hypertension": "dx_hypertension", "atrial_fibrillation": "dx_afib",
    "diabetes": "dx_diabetes", "ischaemic_heart_disease": "dx_ihd", "renal_failure": "dx_ckd", "copd": "dx_copd",
    "nt_probnp": "ntprobnp", "creatinine": "crea", "sodium": "na", "potassium": "k", "haemoglobin": "hb",
    "systolic_bp": "sbp", "on_loop_diuretic": "rx_loop", "on_beta_blocker": "rx_bb", "on_mra": "rx_mra",
    "on_sglt2_inhibitor": "rx_sglt2",
}
REPEATED_ROWS = 3  # per hospital: repeat exports of a patient, dropped by patient_ref


def ejection_fraction_class(lvef: pd.Series) -> pd.Series:
    """Return the heart-failure phenotype by LVEF (ESC 2021): reduced <41, mildly reduced 41-49, preserved >=50."""
    out = pd.Series(pd.NA, index=lvef.index, dtype="object")
    out[lvef < 41] = "HFrEF"
    out[(lvef >= 41) & (lvef < 50)] = "HFmrEF"
    out[lvef >= 50] = "HFpEF"
    return out


def hospital_rows(label: str, template: str, patients: int, code: int, work: Path) -> pd.DataFrame:
    """Return one hospital's export: renamed columns, text codes, repeated rows, no split column."""
    folder = work / label
    profile = site_profile(label.lower(), {"patients": patients, "site_code": code}, template)
    generate_site(profile, SEED, folder, progress=False)
    write_cohort(folder / "omop", folder, CohortSpec(seed=SEED), label.lower(), progress=False)
    cohort = pd.read_parquet(folder / "cohort.parquet")
    rng = np.random.default_rng([SEED, code])
    out = pd.DataFrame({"hospital": np.full(len(cohort), label)})
    # A reference that is not the generator's person_id (which never leaves this script).
    out["patient_ref"] = [f"{code}-{i:05d}" for i in rng.permutation(len(cohort))]
    out = pd.concat([out, cohort[list(RENAMED)].rename(columns=RENAMED)], axis=1)
    out.insert(2, "sex", np.where(cohort["female"] == 1, "F", "M"))
    out["ef_class"] = ejection_fraction_class(cohort["lvef"])
    out["readmit_30"] = np.where(cohort[LABEL] == 1, "yes", "no")
    if label == NO_NT_PROBNP:
        out["ntprobnp"] = np.nan
    if label == SINGLE_CLASS:
        out = out.loc[out["readmit_30"] == "no"].reset_index(drop=True)
    repeats = out.iloc[rng.choice(len(out), REPEATED_ROWS, replace=False)]
    return pd.concat([out, repeats], ignore_index=True)


def make_example(target: Path) -> Path:
    """Write the three hospitals' CSV to `target` and return it."""
    with tempfile.TemporaryDirectory() as work:
        frames = [hospital_rows(*hospital, Path(work)) for hospital in HOSPITALS]
    table = pd.concat(frames, ignore_index=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(target, index=False, float_format="%.6g", lineterminator="\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "hospitals.csv")
    args = parser.parse_args(argv)
    path = make_example(args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
