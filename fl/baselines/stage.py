"""Stage 2: each hospital alone, pooled (the counterfactual the law does not allow), references.

Every model is evaluated on every site's test split, so a reader sees both
how good a hospital's own model is at home and how it transfers. The models
and how they are fitted live in `fl.baselines`; this module runs them for a
profile and builds the stage's tables, checks and summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from compendium.artifacts import save_arrays
from compendium.params import BaselineParams, Profile
from fl.baselines import FittedModel, fit_gbt, fit_torch, shared_schema, single_class_reason, site_splits
from fl.data import FeatureStatistics, PreprocessingSpec, SiteSplit, load_oracle_risk, site_dir
from fl.evaluate import (DELONG_COLUMNS, Estimate, auroc, delong_test, evaluate, not_estimable_reason,
                         subgroup_auroc)
from fl.models import get_weights

DECISION_THRESHOLDS = np.round(np.arange(0.05, 0.51, 0.01), 2)
#: Models whose score is not a probability (discrimination only).
SCORE_ONLY = ("lace",)


@dataclass
class BaselineResults:
    """Predictions and metrics of every model on every site's test split."""

    sites: tuple[str, ...]
    test: dict[str, SiteSplit]
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> site -> scores
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # model -> site -> metrics
    fitted: dict[str, FittedModel] = field(default_factory=dict)
    sweep: pd.DataFrame | None = None
    #: Models that could not be fitted, with the reason (a site whose training data have one outcome class).
    not_fitted: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.predictions)


def run(profile: Profile, build_dir: Path) -> BaselineResults:
    """Train local, pooled and reference models and score them on every site's test split.

    On a provided dataset there is no oracle (no known true risk) and no LACE
    score; a site whose training data have one outcome class gets no local
    model (`not_fitted` says why), though its data still count in the pooled
    model.
    """
    params, seed, sites = profile.baselines, profile.seed, profile.sites
    train = site_splits(build_dir, sites, "train")
    test = site_splits(build_dir, sites, "test")
    schema = shared_schema(train)
    results = BaselineResults(sites=sites, test=test)
    for site in sites:
        reason = single_class_reason(train[site])
        if reason is not None:
            results.not_fitted[f"local_{site}"] = reason
            continue
        results.fitted[f"local_{site}"] = fit_torch(f"local_{site}", [train[site]], params, seed)
    pooled_stats = FeatureStatistics.of_sites([train[site].features for site in sites], schema)
    results.fitted["pooled"] = fit_torch("pooled", [train[site] for site in sites], params, seed,
                                         spec=PreprocessingSpec.from_statistics(pooled_stats, schema))
    gbt = fit_gbt([train[site] for site in sites], params, seed)
    for name, fitted in results.fitted.items():
        results.predictions[name] = {site: fitted.predict(test[site]) for site in sites}
    results.predictions["gbt"] = {site: gbt.predict_proba(test[site].features)[:, 1] for site in sites}
    if profile.dataset is None:  # references that exist only for the synthetic generator's data
        results.predictions["lace"] = {site: test[site].lace for site in sites}
        results.predictions["oracle"] = {site: load_oracle_risk(site_dir(build_dir, site), "test") for site in sites}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    for name, by_site in results.predictions.items():
        results.metrics[name] = {
            site: evaluate(test[site].labels, scores, params.bootstrap_resamples, rng,
                           is_probability=name not in SCORE_ONLY)
            for site, scores in by_site.items()
        }
    results.sweep = size_sweep(train, test, params, seed)
    return results


def smallest_site(train: dict[str, SiteSplit], test: dict[str, SiteSplit] | None = None) -> str:
    """Return the site with the fewest training rows (among those with both outcomes in training and test)."""
    usable = [site for site in train if single_class_reason(train[site]) is None
              and (test is None or not_estimable_reason(test[site].labels) is None)]
    return min(usable or list(train), key=lambda site: len(train[site]))


def _subsample(data: SiteSplit, fraction: float, rng: np.random.Generator) -> SiteSplit:
    return data.take(np.sort(rng.permutation(len(data))[: max(20, int(round(fraction * len(data))))]))


def size_sweep(train: dict[str, SiteSplit], test: dict[str, SiteSplit], params: BaselineParams,
               seed: int) -> pd.DataFrame:
    """Return AUROC on the smallest site's test split as its own training data grow, alone and pooled."""
    small = smallest_site(train, test)
    others = [train[site] for site in train if site != small]
    rows = []
    for fraction in params.sweep_fractions:
        for repeat in range(params.sweep_repeats):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 3, repeat, int(fraction * 1e6)]))
            subset = _subsample(train[small], fraction, rng)
            pooled = fit_torch("pooled", [subset, *others], params, seed + repeat)
            y = test[small].labels
            # A small subsample of a small site may hold one outcome class: no local model then.
            local = fit_torch("local", [subset], params, seed + repeat) if single_class_reason(subset) is None else None
            rows.append({
                "site": small, "fraction": fraction, "repeat": repeat, "train_rows": len(subset),
                "local_auroc": auroc(y, local.predict(test[small])) if local is not None else np.nan,
                "pooled_auroc": auroc(y, pooled.predict(test[small])),
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- tables and checks
def auroc_cell(metrics: dict | None) -> str:
    """Return "AUROC (CI)" for display, or why it is not estimable."""
    if metrics is None:
        return "not estimable"
    if "auroc" not in metrics:
        return metrics.get("not_estimable", "not estimable")
    return str(Estimate(**metrics["auroc"]))


def auroc_table(results: BaselineResults) -> pd.DataFrame:
    """Return AUROC (95% CI) of every model (rows) on every test site (columns); unfitted models say why."""
    table = pd.DataFrame({
        site: {model: auroc_cell(results.metrics[model][site]) for model in results.models}
        for site in results.sites
    })
    for model, reason in results.not_fitted.items():
        table.loc[model] = reason
    return table


def metrics_table(results: BaselineResults) -> pd.DataFrame:
    """Return the long table of every metric of every model on every test site."""
    rows = []
    for model, by_site in results.metrics.items():
        for site, metrics in by_site.items():
            if "auroc" not in metrics:
                continue
            rows.append({
                "model": model, "test_site": site, "patients": metrics["patients"],
                "auroc": metrics["auroc"]["value"], "auroc_lower": metrics["auroc"]["lower"],
                "auroc_upper": metrics["auroc"]["upper"], "auprc": metrics["auprc"]["value"],
                "brier": metrics.get("brier"), "calibration_slope": metrics.get("calibration_slope"),
                "calibration_intercept": metrics.get("calibration_intercept"), "ece": metrics.get("ece"),
            })
    return pd.DataFrame(rows)


def paired_comparisons(results: BaselineResults) -> pd.DataFrame:
    """Return DeLong tests on each site's test split: pooled vs the site's own model, own vs other's model."""
    rows = []
    for site in results.sites:
        y = results.test[site].labels
        if f"local_{site}" not in results.predictions or min(int(y.sum()), int((1 - y).sum())) < 2:
            continue  # no own model, or too few of one outcome on the test split for DeLong's test
        own = results.predictions[f"local_{site}"][site]
        candidates = [("pooled", results.predictions["pooled"][site])]
        candidates += [(f"local_{other}", results.predictions[f"local_{other}"][site])
                       for other in results.sites if other != site and f"local_{other}" in results.predictions]
        for name, scores in candidates:
            test = delong_test(y, scores, own)
            rows.append({"test_site": site, "model": name, "versus": f"local_{site}", **test})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["test_site", "model", "versus", *DELONG_COLUMNS])


def sanity_checks(results: BaselineResults) -> dict[str, dict[str, bool]]:
    """Return the stage's quality bars per site.

    - oracle_not_beaten: the oracle's AUROC is at least every fitted model's lower CI bound
      (synthetic data only: provided data have no oracle);
    - pooled_not_worse: the pooled AUROC is at least the lower CI bound of the site's own model
      (None where either is not estimable).
    """
    fitted = [model for model in results.models if model not in ("oracle", "lace")]
    checks = {}
    for site in results.sites:
        local = results.metrics.get(f"local_{site}", {}).get(site, {}).get("auroc")
        pooled = results.metrics["pooled"][site].get("auroc")
        checks[site] = {"pooled_not_worse": pooled["value"] >= local["lower"] if local and pooled else None}
        if "oracle" in results.metrics and "auroc" in results.metrics["oracle"][site]:
            oracle = results.metrics["oracle"][site]["auroc"]["value"]
            checks[site]["oracle_not_beaten"] = all(oracle >= results.metrics[model][site]["auroc"]["lower"]
                                                    for model in fitted if "auroc" in results.metrics[model][site])
    return checks


def summary(profile: Profile, results: BaselineResults) -> dict:
    """Return stage 2's summary.json content."""
    def pick(key: str) -> dict:
        wanted = ("auroc", "auprc") if key in ("auroc", "auprc") else ("brier",)
        return {model: {site: results.metrics[model][site].get(key) for site in results.sites}
                for model in results.models
                if any(w in results.metrics[model][site] for site in results.sites for w in wanted)
                and (key in ("auroc", "auprc") or model not in SCORE_ONLY)}

    sweep = results.sweep
    by_fraction = sweep.groupby("fraction")[["train_rows", "local_auroc", "pooled_auroc"]].mean().round(4)
    return {
        "stage": "02_local_baselines",
        "profile": profile.profile,
        "seed": profile.seed,
        "model": profile.baselines.model,
        "auroc": pick("auroc"),
        "auprc": pick("auprc"),
        "brier": pick("brier"),
        "calibration_slope": pick("calibration_slope"),
        "calibration_intercept": pick("calibration_intercept"),
        "train_rows": {name: fitted.train_rows for name, fitted in results.fitted.items()},
        "size_sweep": {"site": str(sweep["site"].iloc[0]),
                       "points": by_fraction.reset_index().to_dict(orient="records")},
        "checks": sanity_checks(results),
        "not_estimable": {
            **{model: {site: reason for site in results.sites} for model, reason in results.not_fitted.items()},
            **{model: {site: metrics["not_estimable"] for site, metrics in by_site.items()
                       if "not_estimable" in metrics}
               for model, by_site in results.metrics.items()
               if any("not_estimable" in metrics for metrics in by_site.values())},
        },
        "references": {"oracle": "oracle" in results.predictions, "lace": "lace" in results.predictions},
    }


def predictions_frame(results: BaselineResults) -> pd.DataFrame:
    """Return every model's test predictions (row position within the site's test split, no identifiers)."""
    frames = []
    for model, by_site in results.predictions.items():
        for site, scores in by_site.items():
            frames.append(pd.DataFrame({"model": model, "test_site": site, "row": np.arange(len(scores)),
                                        "readmitted_30d": results.test[site].labels, "score": scores}))
    return pd.concat(frames, ignore_index=True)


def subgroup_table(results: BaselineResults, models: tuple[str, ...] = ("pooled",)) -> pd.DataFrame:
    """Return AUROC by sex and age band on each site's test split for the given models."""
    frames = []
    for model in (*models, *(f"local_{site}" for site in results.sites if f"local_{site}" in results.predictions)):
        for site in results.sites:
            data, scores = results.test[site], results.predictions[model][site]
            for kind, groups in (("sex", data.sex), ("age band", data.age_band)):
                table = subgroup_auroc(data.labels, scores, groups)
                table.insert(0, "subgroup", kind)
                table.insert(0, "test_site", site)
                table.insert(0, "model", model)
                frames.append(table)
    return pd.concat(frames, ignore_index=True)


def save_models(results: BaselineResults, folder: Path) -> None:
    """Write each torch model's weights and preprocessing statistics to folder/<name>.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, fitted in results.fitted.items():
        arrays = {f"weight_{i}": w for i, w in enumerate(get_weights(fitted.model))}
        save_arrays(folder / f"{name}.npz", spec_mean=fitted.spec.mean, spec_std=fitted.spec.std, **arrays)
