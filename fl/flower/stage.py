"""Stage 3: run each federated strategy and compare it with stage 2's models on every site.

The federation itself runs through Flower (`engine`); what this module adds
is the analyst's view afterwards: scoring the final global model on each
site's test split (in a deployment each site would do this at home and
report aggregates), paired comparisons with the local and pooled models,
and summaries of the message ledger.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from compendium.params import Profile, load_params, profile_path
from fl.baselines import shared_schema, site_splits
from fl.baselines.stage import auroc_cell
from fl.data import SYNTHETIC_SCHEMA, FeatureSchema, SiteSplit, site_dir
from fl.evaluate import DELONG_COLUMNS, delong_test, evaluate
from fl.federated import personalised_predict, predict
from fl.flower import engine, selection
from fl.flower.server_app import LEDGER_FILE, FederationResult, Personalisation

BASELINES = Path("02_local_baselines")


@dataclass
class StrategyRun:
    """One strategy's federation and its evaluation."""

    result: FederationResult
    folder: Path
    predictions: dict[str, np.ndarray]
    metrics: dict[str, dict]
    seconds: float
    #: method -> site -> test metrics of the model the site personalised and kept at home (finetune,
    #: recalibrate, own-head for FedPer); a site missing under a method could not run it (one class)
    personalised: dict[str, dict[str, dict]] = field(default_factory=dict)
    #: method -> site -> test predictions of those models (for paired tests)
    personalised_predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def personalisation(profile: Profile) -> Personalisation:
    """Return what every site does with each strategy's final model (the profile's `personalisation`)."""
    federated = profile.federated
    return Personalisation(tuple(federated.personalisation), federated.finetune_epochs,
                           profile.baselines.patience or 20, federated.selection.validation_fraction)


def run_strategy(profile: Profile, params_file: Path, strategy: str, build_dir: Path, output_dir: Path) -> FederationResult:
    """Run one strategy with the profile's engine and return its result."""
    dirs = [site_dir(build_dir, site) for site in profile.sites]
    folder = Path(output_dir) / strategy
    if profile.federated.engine == "ray":
        if profile.data and load_params(params_file).data != profile.data:
            raise ValueError("engine: ray reads the profile file, which does not name this dataset; put "
                             f"`data: {profile.data}` in {params_file} or use engine: direct")
        engine.run_ray(params_file, strategy, dirs, folder, personalisation(profile), profile=profile)
        return load_result(folder, strategy, shared_schema(site_splits(build_dir, profile.sites, "test")))
    return engine.run_direct(profile, strategy, dirs, folder, personalisation=personalisation(profile))


def load_result(folder: Path, strategy: str, schema: FeatureSchema = SYNTHETIC_SCHEMA) -> FederationResult:
    """Return a FederationResult read back from a strategy's output folder (features as in `schema`)."""
    from fl.data import PreprocessingSpec
    from fl.flower.server_app import FINAL_MODEL_FILE, HISTORY_FILE, saved_weights

    saved = np.load(folder / FINAL_MODEL_FILE)
    weights = saved_weights(saved)
    spec = PreprocessingSpec(saved["spec_mean"], saved["spec_std"], schema)
    history = json.loads((folder / HISTORY_FILE).read_text())
    return FederationResult(strategy, weights, spec, history, {}, float("nan"), float("nan"))


def run_selection(profile: Profile, build_dir: Path, output_dir: Path) -> selection.Selection | None:
    """Run federated model selection (training data only) and save its choice; None when it is off."""
    if not profile.federated.selection.enabled:
        return None
    dirs = [site_dir(build_dir, site) for site in profile.sites]
    chosen = selection.select(profile, dirs, Path(output_dir) / "selection")
    selection.save(chosen, output_dir)
    return chosen


def run(profile: Profile, build_dir: Path, output_dir: Path, params_file: Path | None = None) -> dict[str, StrategyRun]:
    """Run every strategy of the profile and score each final model on every site's test split.

    The profile's settings are those of `selection.selected_profile` (run
    `run_selection` first). Each site's personalised models are read from its
    own output folder, where the ClientApp left them, and scored on its test
    split, as the site would do at home.
    """
    params_file = Path(params_file or profile_path(profile.profile))
    test = site_splits(build_dir, profile.sites, "test")
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 4]))
    kind, hidden = profile.baselines.model, tuple(profile.baselines.mlp_hidden)
    runs = {}
    for strategy in profile.federated.strategies:
        result, seconds = engine.timed(run_strategy, profile, params_file, strategy, build_dir, output_dir)
        matrices = {site: result.spec.transform(data.features) for site, data in test.items()}
        predictions = {site: predict(kind, hidden, result.weights, matrices[site]) for site in test}
        metrics = {site: evaluate(test[site].labels, site_scores, profile.baselines.bootstrap_resamples, rng)
                   for site, site_scores in predictions.items()}
        run = StrategyRun(result, Path(output_dir) / strategy, predictions, metrics, seconds)
        methods = [*profile.federated.personalisation, *(("own-head",) if strategy == "fedper" else ())]
        for method in methods:
            for site, data in test.items():
                path = engine.site_output_dir(run.folder, site_dir(build_dir, site)) / strategy / f"{method}.npz"
                if not path.exists():
                    continue  # the site could not personalise this way (e.g. one outcome class)
                scores = personalised_predict(kind, hidden, np.load(path), matrices[site])
                run.personalised_predictions.setdefault(method, {})[site] = scores
                run.personalised.setdefault(method, {})[site] = evaluate(
                    data.labels, scores, profile.baselines.bootstrap_resamples, rng)
        if strategy == "fedper":  # the server's model has a placeholder head: each site uses body + its own head
            run.predictions, run.metrics = run.personalised_predictions["own-head"], run.personalised["own-head"]
        runs[strategy] = run
    return runs


def calibration_table(runs: dict[str, StrategyRun], sites: tuple[str, ...]) -> pd.DataFrame:
    """Return per strategy and site the global model's calibration on the test split, before and after the
    site's own recalibration (observed/expected in the large is the intercept's job, spread the slope's)."""
    rows = []
    for strategy, run in runs.items():
        for site in sites:
            before, after = run.metrics[site], run.personalised.get("recalibrate", {}).get(site, {})
            rows.append({"strategy": strategy, "site": site,
                         "calibration slope": before.get("calibration_slope"),
                         "calibration intercept": before.get("calibration_intercept"),
                         "Brier": before.get("brier"),
                         "recalibrated slope": after.get("calibration_slope"),
                         "recalibrated intercept": after.get("calibration_intercept"),
                         "recalibrated Brier": after.get("brier")})
    return pd.DataFrame(rows).set_index(["strategy", "site"])


def personalisation_table(runs: dict[str, StrategyRun], sites: tuple[str, ...]) -> pd.DataFrame:
    """Return per strategy, method and site the test AUROC (CI), calibration slope and intercept and Brier
    score of the federated model and of each model a site personalised from it."""
    rows = []
    for strategy, run in runs.items():
        variants = {"federated": run.metrics,
                    **{method: by_site for method, by_site in run.personalised.items() if method != "own-head"}}
        for method, by_site in variants.items():
            for site in sites:
                metrics = by_site.get(site) or {}
                rows.append({"strategy": strategy, "model": method, "site": site,
                             "AUROC (95% CI)": auroc_cell(metrics) if metrics else "not run",
                             "calibration slope": metrics.get("calibration_slope"),
                             "calibration intercept": metrics.get("calibration_intercept"),
                             "Brier": metrics.get("brier")})
    return pd.DataFrame(rows).set_index(["strategy", "model", "site"])


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
        for method, by_site in run.personalised.items():
            if method != "own-head":
                rows[f"federated_{strategy}+{method}"] = {site: auroc_cell(by_site.get(site)) for site in sites}
    return pd.DataFrame(rows).T


def paired_tests(runs: dict[str, StrategyRun], build_dir: Path, test: dict[str, SiteSplit]) -> pd.DataFrame:
    """Return DeLong tests of each federated model (and each fine-tuned one) against pooled and each site's own model.

    Recalibration is left out: it keeps the ranking, so its AUROC is the global model's.
    """
    baseline = baseline_predictions(build_dir)
    models = {strategy: run.predictions for strategy, run in runs.items()}
    models.update({f"{strategy}+finetune": run.personalised_predictions["finetune"]
                   for strategy, run in runs.items() if "finetune" in run.personalised_predictions})
    rows = []
    for name, predictions in models.items():
        for site, data in test.items():
            if site not in predictions or min(int(data.labels.sum()), int((1 - data.labels).sum())) < 2:
                continue  # DeLong's test needs two patients with and two without the outcome
            for reference in ("pooled", f"local_{site}"):
                scores = baseline.loc[(baseline["model"] == reference) & (baseline["test_site"] == site)]
                if scores.empty:
                    continue  # no local model at a site whose training data have one outcome class
                scores = scores.sort_values("row")["score"].to_numpy()
                result = delong_test(data.labels, predictions[site], scores)
                rows.append({"strategy": name, "test_site": site, "versus": reference, **result})
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


PERSONALISED_KEYS = ("auroc", "brier", "calibration_slope", "calibration_intercept", "ece")


def summary(profile: Profile, runs: dict[str, StrategyRun], chosen: "selection.Selection | None" = None) -> dict:
    """Return stage 3's summary.json content."""
    sites = profile.sites
    selection_summary = None if chosen is None else {
        "chosen": chosen.to_json()["chosen"], "rounds": chosen.rounds, "validation_fraction":
        profile.federated.selection.validation_fraction,
        "candidates": {name: {"best_round": int(row["best_round"]), "validation_loss": float(row["validation_loss"])}
                       for name, row in chosen.table.iterrows()}}
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
        # Each site's personalisation of the final model, done and kept at the site (ClientApp
        # `personalise`), scored on the same test split as above.
        "personalised": {strategy: {method: {site: {key: by_site[site].get(key) for key in PERSONALISED_KEYS}
                                             if site in by_site else None for site in sites}
                                    for method, by_site in run.personalised.items()}
                         for strategy, run in runs.items()},
        "selection": selection_summary,
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
