"""Stage 2: each hospital alone, pooled (the counterfactual the law does not allow), references.

Every model is evaluated on every site's test split, so a reader sees both
how good a hospital's own model is at home and how it transfers. The
preprocessing statistics are explicit: a local model standardises with its
own site's statistics, the pooled model with the sum of all sites'
statistics (exactly what the federated stage computes without pooling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from torch import nn

from compendium.artifacts import save_arrays
from compendium.params import BaselineParams, Profile
from fl import evaluate as ev
from fl.data import FeatureStatistics, PreprocessingSpec, SiteSplit, load_oracle_risk, load_site, site_dir
from fl.models import build_model
from fl.train import TrainConfig, fit, predict_proba, validation_mask

DECISION_THRESHOLDS = np.round(np.arange(0.05, 0.51, 0.01), 2)
#: Models whose score is not a probability (discrimination only).
SCORE_ONLY = ("lace",)


def train_config(params: BaselineParams) -> TrainConfig:
    """Return the training configuration of a profile's baselines."""
    return TrainConfig(epochs=params.epochs, batch_size=params.batch_size, learning_rate=params.learning_rate,
                       weight_decay=params.weight_decay, patience=params.patience)


@dataclass
class FittedModel:
    """A torch model with the preprocessing it was trained with."""

    name: str
    model: nn.Module
    spec: PreprocessingSpec
    train_rows: int

    def predict(self, data: SiteSplit) -> np.ndarray:
        return predict_proba(self.model, self.spec.transform(data.features))


def fit_torch(name: str, train: list[SiteSplit], params: BaselineParams, seed: int,
              spec: PreprocessingSpec | None = None) -> FittedModel:
    """Return the profile's model trained on the concatenated training splits (early stopping on 20%)."""
    features = pd.concat([s.features for s in train], ignore_index=True)
    labels = np.concatenate([s.labels for s in train])
    if spec is None:
        spec = PreprocessingSpec.from_statistics(FeatureStatistics.of(features))
    x = spec.transform(features)
    held_out = validation_mask(labels, params.validation_fraction, seed)
    model = build_model(params.model, x.shape[1], seed=seed, hidden=tuple(params.mlp_hidden))
    fit(model, x[~held_out], labels[~held_out], train_config(params), seed=seed,
        validation=(x[held_out], labels[held_out]))
    return FittedModel(name, model, spec, int(len(labels)))


def fit_gbt(train: list[SiteSplit], params: BaselineParams, seed: int) -> HistGradientBoostingClassifier:
    """Return a gradient-boosted trees reference trained on the pooled training splits."""
    features = pd.concat([s.features for s in train], ignore_index=True)
    labels = np.concatenate([s.labels for s in train])
    model = HistGradientBoostingClassifier(max_iter=params.gbt_max_iter, learning_rate=params.gbt_learning_rate,
                                           early_stopping=False, random_state=seed)
    return model.fit(features, labels)


@dataclass
class BaselineResults:
    """Predictions and metrics of every model on every site's test split."""

    sites: tuple[str, ...]
    test: dict[str, SiteSplit]
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> site -> p
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # model -> site -> metrics
    fitted: dict[str, FittedModel] = field(default_factory=dict)
    sweep: pd.DataFrame | None = None

    @property
    def models(self) -> list[str]:
        return list(self.predictions)


def site_splits(build_dir: Path, sites: tuple[str, ...], split: str) -> dict[str, SiteSplit]:
    """Return each site's split, loaded through the single data door."""
    return {site: load_site(site_dir(build_dir, site), split, site) for site in sites}


def run(profile: Profile, build_dir: Path) -> BaselineResults:
    """Train local, pooled and reference models and score them on every site's test split."""
    params, seed, sites = profile.baselines, profile.seed, profile.sites
    train = site_splits(build_dir, sites, "train")
    test = site_splits(build_dir, sites, "test")
    results = BaselineResults(sites=sites, test=test)
    for site in sites:
        results.fitted[f"local_{site}"] = fit_torch(f"local_{site}", [train[site]], params, seed)
    pooled_stats = FeatureStatistics.of_sites([train[s].features for s in sites])
    results.fitted["pooled"] = fit_torch("pooled", [train[s] for s in sites], params, seed,
                                         spec=PreprocessingSpec.from_statistics(pooled_stats))
    gbt = fit_gbt([train[s] for s in sites], params, seed)
    for name, fitted in results.fitted.items():
        results.predictions[name] = {s: fitted.predict(test[s]) for s in sites}
    results.predictions["gbt"] = {s: gbt.predict_proba(test[s].features)[:, 1] for s in sites}
    results.predictions["lace"] = {s: test[s].lace for s in sites}
    results.predictions["oracle"] = {s: load_oracle_risk(site_dir(build_dir, s), "test") for s in sites}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    for name, by_site in results.predictions.items():
        results.metrics[name] = {
            s: ev.evaluate(test[s].labels, p, params.bootstrap_resamples, rng, is_probability=name not in SCORE_ONLY)
            for s, p in by_site.items()
        }
    results.sweep = size_sweep(train, test, params, seed)
    return results


def smallest_site(train: dict[str, SiteSplit]) -> str:
    """Return the site with the fewest training rows."""
    return min(train, key=lambda s: len(train[s]))


def _subsample(data: SiteSplit, fraction: float, rng: np.random.Generator) -> SiteSplit:
    return data.take(np.sort(rng.permutation(len(data))[: max(20, int(round(fraction * len(data))))]))


def size_sweep(train: dict[str, SiteSplit], test: dict[str, SiteSplit], params: BaselineParams,
               seed: int) -> pd.DataFrame:
    """Return AUROC on the smallest site's test split as its own training data grow, alone and pooled."""
    small = smallest_site(train)
    others = [train[s] for s in train if s != small]
    rows = []
    for fraction in params.sweep_fractions:
        for repeat in range(params.sweep_repeats):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 3, repeat, int(fraction * 1e6)]))
            subset = _subsample(train[small], fraction, rng)
            local = fit_torch("local", [subset], params, seed + repeat)
            pooled = fit_torch("pooled", [subset, *others], params, seed + repeat)
            y = test[small].labels
            rows.append({
                "site": small, "fraction": fraction, "repeat": repeat, "train_rows": len(subset),
                "local_auroc": ev.auroc(y, local.predict(test[small])),
                "pooled_auroc": ev.auroc(y, pooled.predict(test[small])),
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- tables and checks
def auroc_table(results: BaselineResults) -> pd.DataFrame:
    """Return AUROC (95% CI) of every model (rows) on every test site (columns)."""
    return pd.DataFrame({
        site: {model: str(ev.Estimate(**results.metrics[model][site]["auroc"])) for model in results.models}
        for site in results.sites
    })


def metrics_table(results: BaselineResults) -> pd.DataFrame:
    """Return the long table of every metric of every model on every test site."""
    rows = []
    for model, by_site in results.metrics.items():
        for site, m in by_site.items():
            rows.append({
                "model": model, "test_site": site, "patients": m["patients"],
                "auroc": m["auroc"]["value"], "auroc_lower": m["auroc"]["lower"], "auroc_upper": m["auroc"]["upper"],
                "auprc": m["auprc"]["value"], "brier": m.get("brier"), "calibration_slope": m.get("calibration_slope"),
                "calibration_intercept": m.get("calibration_intercept"), "ece": m.get("ece"),
            })
    return pd.DataFrame(rows)


def paired_comparisons(results: BaselineResults) -> pd.DataFrame:
    """Return DeLong tests on each site's test split: pooled vs the site's own model, own vs other's model."""
    rows = []
    for site in results.sites:
        y = results.test[site].labels
        own = results.predictions[f"local_{site}"][site]
        candidates = [("pooled", results.predictions["pooled"][site])]
        candidates += [(f"local_{other}", results.predictions[f"local_{other}"][site])
                       for other in results.sites if other != site]
        for name, scores in candidates:
            test = ev.delong_test(y, scores, own)
            rows.append({"test_site": site, "model": name, "versus": f"local_{site}", **test})
    return pd.DataFrame(rows)


def sanity_checks(results: BaselineResults) -> dict[str, dict[str, bool]]:
    """Return the stage's quality bars per site.

    - oracle_not_beaten: the oracle's AUROC is at least every fitted model's lower CI bound;
    - pooled_not_worse: the pooled AUROC is at least the lower CI bound of the site's own model.
    """
    fitted = [m for m in results.models if m not in ("oracle", "lace")]
    checks = {}
    for site in results.sites:
        oracle = results.metrics["oracle"][site]["auroc"]["value"]
        local = results.metrics[f"local_{site}"][site]["auroc"]
        pooled = results.metrics["pooled"][site]["auroc"]["value"]
        checks[site] = {
            "oracle_not_beaten": all(oracle >= results.metrics[m][site]["auroc"]["lower"] for m in fitted),
            "pooled_not_worse": pooled >= local["lower"],
        }
    return checks


def summary(profile: Profile, results: BaselineResults) -> dict:
    """Return stage 2's summary.json content."""
    def pick(key: str) -> dict:
        return {model: {site: results.metrics[model][site].get(key) for site in results.sites}
                for model in results.models if key in results.metrics[model][results.sites[0]]}

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
        "train_rows": {name: f.train_rows for name, f in results.fitted.items()},
        "size_sweep": {"site": str(sweep["site"].iloc[0]),
                       "points": by_fraction.reset_index().to_dict(orient="records")},
        "checks": sanity_checks(results),
    }


def predictions_frame(results: BaselineResults) -> pd.DataFrame:
    """Return every model's test predictions (row position within the site's test split, no identifiers)."""
    frames = []
    for model, by_site in results.predictions.items():
        for site, p in by_site.items():
            frames.append(pd.DataFrame({"model": model, "test_site": site, "row": np.arange(len(p)),
                                        "readmitted_30d": results.test[site].labels, "score": p}))
    return pd.concat(frames, ignore_index=True)


def subgroup_table(results: BaselineResults, models: tuple[str, ...] = ("pooled",)) -> pd.DataFrame:
    """Return AUROC by sex and age band on each site's test split for the given models."""
    frames = []
    for model in (*models, *(f"local_{s}" for s in results.sites)):
        for site in results.sites:
            data, scores = results.test[site], results.predictions[model][site]
            for kind, groups in (("sex", data.sex), ("age band", data.age_band)):
                table = ev.subgroup_auroc(data.labels, scores, groups)
                table.insert(0, "subgroup", kind)
                table.insert(0, "test_site", site)
                table.insert(0, "model", model)
                frames.append(table)
    return pd.concat(frames, ignore_index=True)


def save_models(results: BaselineResults, folder: Path) -> None:
    """Write each torch model's weights and preprocessing statistics to folder/<name>.npz."""
    from fl.models import get_weights

    folder.mkdir(parents=True, exist_ok=True)
    for name, fitted in results.fitted.items():
        arrays = {f"weight_{i}": w for i, w in enumerate(get_weights(fitted.model))}
        save_arrays(folder / f"{name}.npz", spec_mean=fitted.spec.mean, spec_std=fitted.spec.std, **arrays)
