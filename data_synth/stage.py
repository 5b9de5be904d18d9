"""Stage 1 of the pipeline: generate every site's OMOP extract and build its cohort."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from compendium.params import Profile
from data_synth import heterogeneity
from data_synth.cohort import Attrition, CohortSpec, write_cohort
from data_synth.features import LABEL, SPLIT
from data_synth.generator import GROUND_TRUTH_FILE, generate_site, true_risk

SITES_DIR = "sites"


@dataclass
class SiteResult:
    """What stage 1 produced for one site."""

    site: str
    folder: Path
    cohort: pd.DataFrame
    attrition: Attrition
    oracle_auroc_test: float


def cohort_spec(profile: Profile) -> CohortSpec:
    """Return the cohort definition of a profile."""
    cohort = profile.cohort
    return CohortSpec(study_start=cohort.study_start, study_end=cohort.study_end, followup_end=cohort.followup_end,
                      one_index_per_patient=cohort.one_index_per_patient, test_fraction=cohort.test_fraction,
                      seed=profile.seed)


def oracle_auroc(cohort: pd.DataFrame, ground_truth: pd.DataFrame, split: str = "test") -> float:
    """Return the AUROC of the generator's true risk on the cohort's `split` rows."""
    rows = cohort.loc[cohort[SPLIT] == split]
    return float(roc_auc_score(rows[LABEL], true_risk(rows["index_visit_id"], ground_truth)))


def run(profile: Profile, output_dir: Path, progress: bool = True) -> dict[str, SiteResult]:
    """Generate each site's OMOP tables and cohort under output_dir/sites/<site>/."""
    spec = cohort_spec(profile)
    results = {}
    for site, site_profile in profile.site_profiles().items():
        folder = Path(output_dir) / SITES_DIR / site
        omop_dir = generate_site(site_profile, profile.seed, folder, progress=progress)
        cohort_path, attrition = write_cohort(omop_dir, folder, spec, site, progress=progress)
        cohort = pd.read_parquet(cohort_path)
        truth = pq.read_table(folder / GROUND_TRUTH_FILE).to_pandas()
        results[site] = SiteResult(site, folder, cohort, attrition, oracle_auroc(cohort, truth))
    return results


def transport(profile: Profile, results: dict[str, SiteResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the transport gap between the profile's own cohorts, and each group of site differences'
    gap alone (sites regenerated at `synthetic.transport_patients` each: data_synth.heterogeneity)."""
    cohorts = {site: result.cohort for site, result in results.items()}
    attribution = heterogeneity.knob_attribution(profile.site_profiles(), profile.synthetic.transport_patients,
                                                 profile.seed, cohort_spec(profile))
    return heterogeneity.transport_gap(cohorts), attribution


def summary(profile: Profile, results: dict[str, SiteResult], transport_gap: pd.DataFrame | None = None,
            attribution: pd.DataFrame | None = None) -> dict:
    """Return stage 1's summary.json content: per site size, readmission rate, oracle AUROC, and the
    transport gaps (when given)."""
    sites = {}
    for site, result in results.items():
        labels = result.cohort[LABEL].to_numpy()
        test = result.cohort[SPLIT].to_numpy() == "test"
        sites[site] = {
            "patients": result.attrition.persons,
            "index_admissions": int(labels.size),
            "readmitted_30d": int(labels.sum()),
            "readmission_rate": round(float(labels.mean()), 4),
            "test_index_admissions": int(test.sum()),
            "oracle_auroc_test": round(result.oracle_auroc_test, 4),
        }
    all_labels = np.concatenate([result.cohort[LABEL].to_numpy() for result in results.values()])
    return {
        "stage": "01_synthetic_ehr",
        "profile": profile.profile,
        "seed": profile.seed,
        "sites": sites,
        "total": {"index_admissions": int(all_labels.size), "readmission_rate": round(float(all_labels.mean()), 4)},
        "attrition": {site: {step: count for step, count in asdict(result.attrition).items() if step != "extra"}
                      for site, result in results.items()},
        **({"transport_gap": transport_gap.to_dict(orient="records")} if transport_gap is not None else {}),
        **({"transport_by_knob": {"patients_per_site": profile.synthetic.transport_patients,
                                  "rows": attribution.to_dict(orient="records")}} if attribution is not None else {}),
    }
