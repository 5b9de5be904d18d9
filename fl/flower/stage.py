"""Stage 3: run each federated strategy and compare it with stage 2's models on every site.

The federation itself runs through Flower (`engine`); what this module adds
is the analyst's view afterwards: scoring the final global model on each
site's test split (in a deployment each site would do this at home and
report aggregates), paired comparisons with the local and pooled models,
and summaries of the message ledger.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from compendium.params import Profile, load_params, profile_path
from fl.baselines import shared_schema, site_splits
from fl.baselines.stage import auroc_cell
from fl.data import SYNTHETIC_SCHEMA, FeatureSchema, SiteSplit, site_dir
from fl.evaluate import DELONG_COLUMNS, delong_test, evaluate, not_estimable_reason, recalibrated, recalibration
from fl.federated import predict
from fl.flower import engine
from fl.flower.server_app import LEDGER_FILE, FederationResult

BASELINES = Path("02_local_baselines")


@dataclass
class StrategyRun:
    """One strategy's federation and its evaluation."""

    result: FederationResult
    folder: Path
    predictions: dict[str, np.ndarray]
    metrics: dict[str, dict]
    seconds: float
    #: per site: the global model recalibrated on the site's own training split (intercept, slope) and its
    #: test metrics; empty where a site's training split has one class
    recalibrated: dict[str, dict]


def run_strategy(profile: Profile, params_file: Path, strategy: str, build_dir: Path, output_dir: Path) -> FederationResult:
    """Run one strategy with the profile's engine and return its result."""
    dirs = [site_dir(build_dir, site) for site in profile.sites]
    folder = Path(output_dir) / strategy
    if profile.federated.engine == "ray":
        if profile.data and load_params(params_file).data != profile.data:
            raise ValueError("engine: ray reads the profile file, which does not name this dataset; put "
                             f"`data: {profile.data}` in {params_file} or use engine: direct")
        engine.run_ray(params_file, strategy, dirs, folder)
        return load_result(folder, strategy, shared_schema(site_splits(build_dir, profile.sites, "test")))
    return engine.run_direct(profile, strategy, dirs, folder)


def load_result(folder: Path, strategy: str, schema: FeatureSchema = SYNTHETIC_SCHEMA) -> FederationResult:
    """Return a FederationResult read back from a strategy's output folder (features as in `schema`)."""
    from fl.data import PreprocessingSpec
    from fl.flower.server_app import FINAL_MODEL_FILE, HISTORY_FILE, saved_weights

    saved = np.load(folder / FINAL_MODEL_FILE)
    weights = saved_weights(saved)
    spec = PreprocessingSpec(saved["spec_mean"], saved["spec_std"], schema)
    history = json.loads((folder / HISTORY_FILE).read_text())
    return FederationResult(strategy, weights, spec, history, {}, float("nan"), float("nan"))


def run(profile: Profile, build_dir: Path, output_dir: Path, params_file: Path | None = None) -> dict[str, StrategyRun]:
    """Run every strategy of the profile and score each final model on every site's test split."""
    params_file = Path(params_file or profile_path(profile.profile))
    test = site_splits(build_dir, profile.sites, "test")
    train = site_splits(build_dir, profile.sites, "train")
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 4]))
    runs = {}
    for strategy in profile.federated.strategies:
        result, seconds = engine.timed(run_strategy, profile, params_file, strategy, build_dir, output_dir)

        def scores(data: SiteSplit) -> np.ndarray:
            return predict(profile.baselines.model, tuple(profile.baselines.mlp_hidden), result.weights,
                           result.spec.transform(data.features))

        predictions = {site: scores(data) for site, data in test.items()}
        metrics = {site: evaluate(test[site].labels, site_scores, profile.baselines.bootstrap_resamples, rng)
                   for site, site_scores in predictions.items()}
        recalibrated = {site: site_recalibration(train[site].labels, scores(train[site]), test[site].labels,
                                                 predictions[site], profile.baselines.bootstrap_resamples, rng)
                        for site in test}
        runs[strategy] = StrategyRun(result, Path(output_dir) / strategy, predictions, metrics, seconds, recalibrated)
    return runs


def site_recalibration(train_labels: np.ndarray, train_scores: np.ndarray, test_labels: np.ndarray,
                       test_scores: np.ndarray, resamples: int, rng: np.random.Generator) -> dict:
    """Return a site's recalibration of the global model (intercept and slope fitted on its own training
    split, which never leaves it) and the recalibrated model's test metrics; empty without both classes."""
    if not_estimable_reason(train_labels) is not None or not_estimable_reason(test_labels) is not None:
        return {}
    intercept, slope = recalibration(train_labels, train_scores)
    return {"intercept": round(intercept, 4), "slope": round(slope, 4),
            **evaluate(test_labels, recalibrated(test_scores, intercept, slope), resamples, rng)}


def calibration_table(runs: dict[str, StrategyRun], sites: tuple[str, ...]) -> pd.DataFrame:
    """Return per strategy and site the global model's calibration on the test split, before and after the
    site's own recalibration (observed/expected in the large is the intercept's job, spread the slope's)."""
    rows = []
    for strategy, run in runs.items():
        for site in sites:
            before, after = run.metrics[site], run.recalibrated.get(site, {})
            rows.append({"strategy": strategy, "site": site,
                         "calibration slope": before.get("calibration_slope"),
                         "calibration intercept": before.get("calibration_intercept"),
                         "Brier": before.get("brier"),
                         "recalibrated slope": after.get("calibration_slope"),
                         "recalibrated intercept": after.get("calibration_intercept"),
                         "recalibrated Brier": after.get("brier")})
    return pd.DataFrame(rows).set_index(["strategy", "site"])


def baseline_predictions(build_dir: Path) -> pd.DataFrame:
    """Return stage 2's test predictions (model, test_site, row, label, score)."""
    return pd.read_parquet(Path(build_dir) / BASELINES / "predictions.parquet")


def comparison_table(runs: dict[str, StrategyRun], build_dir: Path, sites: tuple[str, ...]) -> pd.DataFrame:
    """Return AUROC (CI) per model on each site: federated strategies next to stage 2's models."""
    stage2 = json.loads((Path(build_dir) / BASELINES / "summary.json").read_text())["auroc"]
    rows = {}
    for model in ("oracle", "pooled", *(f"local_{s}" for s in sites)):
        if model in stage2:  # no oracle on provided data; no local model at a single-class site
            rows[model] = {site: auroc_cell({"auroc": stage2[model][site]} if stage2[model][site] else None)
                           for site in sites}
    for strategy, run in runs.items():
        rows[f"federated_{strategy}"] = {site: auroc_cell(run.metrics[site]) for site in sites}
    return pd.DataFrame(rows).T


def paired_tests(runs: dict[str, StrategyRun], build_dir: Path, test: dict[str, SiteSplit]) -> pd.DataFrame:
    """Return DeLong tests of each federated model against pooled and each site's own model."""
    baseline = baseline_predictions(build_dir)
    rows = []
    for strategy, run in runs.items():
        for site, data in test.items():
            if min(int(data.labels.sum()), int((1 - data.labels).sum())) < 2:
                continue  # DeLong's test needs two patients with and two without the outcome
            for reference in ("pooled", f"local_{site}"):
                scores = baseline.loc[(baseline["model"] == reference) & (baseline["test_site"] == site)]
                if scores.empty:
                    continue  # no local model at a site whose training data have one outcome class
                scores = scores.sort_values("row")["score"].to_numpy()
                result = delong_test(data.labels, run.predictions[site], scores)
                rows.append({"strategy": strategy, "test_site": site, "versus": reference, **result})
    return pd.DataFrame(rows, columns=["strategy", "test_site", "versus", *DELONG_COLUMNS]) if not rows else pd.DataFrame(rows)


def ledger_frame(folder: Path) -> pd.DataFrame:
    """Return the ledger of one strategy's run as a table (one row per message)."""
    lines = [json.loads(line) for line in (Path(folder) / LEDGER_FILE).read_text().splitlines()]
    return pd.DataFrame(lines)


def bytes_per_round(runs: dict[str, StrategyRun]) -> pd.DataFrame:
    """Return bytes per round, direction and site for every strategy."""
    frames = []
    for strategy, run in runs.items():
        ledger = ledger_frame(run.folder)
        table = ledger.groupby(["round", "direction", "site"], as_index=False)["bytes"].sum()
        table.insert(0, "strategy", strategy)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def history_frame(runs: dict[str, StrategyRun]) -> pd.DataFrame:
    """Return the per-round history (loss, AUROC per site) of every strategy."""
    frames = [pd.DataFrame(run.result.history).assign(strategy=strategy) for strategy, run in runs.items()]
    return pd.concat(frames, ignore_index=True)


def summary(profile: Profile, runs: dict[str, StrategyRun]) -> dict:
    """Return stage 3's summary.json content."""
    sites = profile.sites
    ledgers = {strategy: ledger_frame(run.folder) for strategy, run in runs.items()}
    return {
        "stage": "03_federated_training",
        "profile": profile.profile,
        "seed": profile.seed,
        "engine": profile.federated.engine,
        "rounds": profile.federated.rounds,
        "local_epochs": profile.federated.local_epochs,
        "strategies": list(runs),
        "auroc": {strategy: {site: run.metrics[site].get("auroc") for site in sites} for strategy, run in runs.items()},
        "brier": {strategy: {site: run.metrics[site].get("brier") for site in sites} for strategy, run in runs.items()},
        "calibration_slope": {strategy: {site: run.metrics[site].get("calibration_slope") for site in sites}
                              for strategy, run in runs.items()},
        "calibration_intercept": {strategy: {site: run.metrics[site].get("calibration_intercept") for site in sites}
                                  for strategy, run in runs.items()},
        # Each site's recalibration of the global model on its own training split (a local step: the two
        # numbers stay at the site); the same test split as above.
        "site_recalibrated": {strategy: {site: {key: run.recalibrated[site].get(key) for key in
                                                ("intercept", "slope", "auroc", "brier", "calibration_slope",
                                                 "calibration_intercept")} if run.recalibrated.get(site) else None
                                         for site in sites} for strategy, run in runs.items()},
        "not_estimable": {site: run.metrics[site]["not_estimable"] for run in runs.values() for site in sites
                          if "not_estimable" in run.metrics[site]},
        "bytes_exchanged_per_site": {
            strategy: {site: int(ledger.loc[ledger["site"] == site, "bytes"].sum()) for site in sites}
            for strategy, ledger in ledgers.items()
        },
        "messages_per_site": {
            strategy: {site: int((ledger["site"] == site).sum()) for site in sites}
            for strategy, ledger in ledgers.items()
        },
    }
