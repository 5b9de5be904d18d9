"""Attribute inference (positions A and B): recover a sensitive diagnosis from the rest of a record and the model.

The attacker knows a patient's other features and outcome and wants one
binary attribute (for example `renal_failure`). Three guessers, each a score
whose sign is the guess:

- `marginal`: the population prevalence alone (always guesses the majority).
- `population`: a logistic regression fitted on population records predicts
  the attribute from the other features and the label, without the target
  model. Whatever this reaches is a fact about the population, not a leak.
- `model`: the population's prior from the other features, times the target
  model's likelihood of the patient's true label with the attribute set to 1
  versus 0 (Fredrikson et al. 2014; Yeom et al. 2018).

The question is whether `model` beats `population`, and by more on members
(patients the target model was trained on) than on non-members. The
population models are cross-fitted (fitted on one half of the records,
applied to the other), so no record is scored by a model that saw it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression

from data_synth.cohort import FEATURES
from fl.data import FEATURE_NAMES, FeatureStatistics, PreprocessingSpec, SiteSplit
from fl.evaluate import auroc, record_loss
from fl.privacy.membership import clopper_pearson
from fl.privacy.reference import BatchedModels, SiteTensors

GUESSERS = ("marginal", "population", "model")
BINARY_FEATURES = tuple(f.name for f in FEATURES if f.kind == "binary")


def require_binary(attribute: str) -> None:
    """Raise unless `attribute` is one of the cohort's binary features."""
    if attribute not in BINARY_FEATURES:
        raise ValueError(f"attribute inference needs a binary feature; {attribute!r} is not one of {BINARY_FEATURES}")


def _design(features: pd.DataFrame, attribute: str, spec: PreprocessingSpec) -> np.ndarray:
    """Return the standardised model inputs without the attribute's column (what the attacker knows)."""
    inputs = spec.transform(features)
    return np.delete(inputs, FEATURE_NAMES.index(attribute), axis=1)


def population_logits(features: pd.DataFrame, labels: np.ndarray, attribute: str, with_label: bool,
                      rng: np.random.Generator, population: tuple[pd.DataFrame, np.ndarray] | None = None,
                      folds: int = 2) -> np.ndarray:
    """Return log-odds that each record has the attribute, from a model fitted on population records only.

    The attacker's population is `population` (features, labels) when given,
    disjoint from the records scored; otherwise the records themselves,
    cross-fitted: each fold is scored by a logistic regression fitted on the
    other folds. Inputs are the other features and, with `with_label`, the outcome.
    """
    require_binary(attribute)

    def fitted(fit_features, fit_labels, score_features, score_labels):
        spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([fit_features]))
        x_fit, x_score = _design(fit_features, attribute, spec), _design(score_features, attribute, spec)
        if with_label:
            x_fit, x_score = np.c_[x_fit, fit_labels], np.c_[x_score, score_labels]
        truth = fit_features[attribute].to_numpy().astype(int)
        return LogisticRegression(C=1.0, max_iter=2000).fit(x_fit, truth).decision_function(x_score)

    if population is not None:
        return fitted(population[0], population[1], features, labels)
    fold = rng.permutation(len(labels)) % folds
    out = np.empty(len(labels))
    for k in range(folds):
        fit, score = fold != k, fold == k
        out[score] = fitted(features[fit], labels[fit], features[score], labels[score])
    return out


def model_log_likelihood_ratio(models: BatchedModels, sites: dict[str, SiteSplit], attribute: str) -> np.ndarray:
    """Return (N, M) log p(y | x, attribute=1) - log p(y | x, attribute=0) under each of M models (sites in name order)."""
    parts = []
    with torch.no_grad():
        for name in sorted(sites):
            split = sites[name]
            loss = []
            for value in (1.0, 0.0):
                features = split.features.copy()
                features[attribute] = value
                logits = models.logits(SiteTensors.of(features, split.labels)).double().numpy()
                loss.append(record_loss(logits, split.labels[:, None]))
            parts.append(loss[1] - loss[0])
    return np.concatenate(parts)


@dataclass(frozen=True)
class GuessResult:
    """How well one guesser recovers the attribute over one group of trials."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    trials: int
    with_attribute: int

    def as_dict(self) -> dict:
        return {"accuracy": {"value": round(self.accuracy, 4), "lower": round(self.accuracy_ci[0], 4),
                             "upper": round(self.accuracy_ci[1], 4)},
                "auc": {"value": round(self.auc, 4), "lower": round(self.auc_ci[0], 4),
                        "upper": round(self.auc_ci[1], 4)},
                "trials": self.trials, "with_attribute": self.with_attribute}


def hanley_mcneil(auc: float, positives: int, negatives: int, level: float = 0.95) -> tuple[float, float]:
    """Return the normal-approximation confidence interval of an AUC (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / max(
        positives * negatives, 1)
    half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def evaluate_guesses(scores: np.ndarray, truth: np.ndarray) -> GuessResult:
    """Return accuracy (guess: score > 0) with a Clopper-Pearson interval, and AUC with a Hanley-McNeil interval."""
    truth = np.asarray(truth, dtype=bool)
    correct = int(np.sum((scores > 0) == truth))
    positives = int(truth.sum())
    auc = float(auroc(truth.astype(int), scores)) if 0 < positives < truth.size else float("nan")
    return GuessResult(correct / truth.size, clopper_pearson(correct, truth.size), auc,
                       hanley_mcneil(auc, positives, truth.size - positives), int(truth.size), positives)


@dataclass
class AttributeInference:
    """Attribute-inference results per group (members, non-members) and guesser, pooled over target models."""

    attribute: str
    prevalence: float
    results: dict[tuple[str, str], GuessResult]  # (group, guesser) -> result
    targets: int

    def table(self) -> pd.DataFrame:
        """Return one row per group and guesser: accuracy and AUC with 95% intervals, trials."""
        rows = []
        for (group, guesser), r in self.results.items():
            rows.append({"group": group, "guesser": guesser,
                         "accuracy": f"{r.accuracy:.3f} ({r.accuracy_ci[0]:.3f}-{r.accuracy_ci[1]:.3f})",
                         "AUC": f"{r.auc:.3f} ({r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f})", "trials": r.trials})
        return pd.DataFrame(rows)

    def as_dict(self) -> dict:
        return {"attribute": self.attribute, "population_prevalence": round(self.prevalence, 4),
                "target_models": self.targets,
                "groups": [{"group": g, "guesser": k, **r.as_dict()} for (g, k), r in self.results.items()],
                "model_gain_auc": {g: round(self.results[(g, "model")].auc - self.results[(g, "population")].auc, 4)
                                   for g in ("members", "non-members")}}


def run(models: BatchedModels, membership: np.ndarray, sites: dict[str, SiteSplit], attribute: str, targets: int,
        rng: np.random.Generator, population: dict[str, SiteSplit] | None = None) -> AttributeInference:
    """Attack the first `targets` of the models; return results for members and non-members of each.

    `membership` is the (N, M) membership of the records (sites in name
    order) in the models, as `experiment.run` keeps it. `population`, when
    given, is the attacker's own sample of patients (none of them in `sites`);
    otherwise the population models are cross-fitted on the records.
    """
    require_binary(attribute)
    names = sorted(sites)
    features = pd.concat([sites[s].features for s in names], ignore_index=True)
    labels = np.concatenate([sites[s].labels for s in names])
    truth = features[attribute].to_numpy() == 1
    if np.isnan(features[attribute].to_numpy()).any():
        raise ValueError(f"attribute {attribute!r} has missing values; attribute inference needs it recorded")
    sample = None
    if population is not None:
        sample = (pd.concat([population[s].features for s in sorted(population)], ignore_index=True),
                  np.concatenate([population[s].labels for s in sorted(population)]))
    prevalence = float((sample[0] if sample else features)[attribute].mean())
    prior = population_logits(features, labels, attribute, False, rng, sample)
    baseline = population_logits(features, labels, attribute, True, rng, sample)
    ratio = model_log_likelihood_ratio(models, sites, attribute)[:, :targets]  # (N, T)
    marginal = np.full(len(truth), np.log(prevalence / (1 - prevalence)))
    member = np.asarray(membership, dtype=bool)[:, :targets]
    scores = {"marginal": np.tile(marginal[:, None], targets), "population": np.tile(baseline[:, None], targets),
              "model": prior[:, None] + ratio}
    truth_trials = np.tile(truth[:, None], targets)
    results = {}
    for group, mask in (("members", member), ("non-members", ~member)):
        for guesser in GUESSERS:
            results[(group, guesser)] = evaluate_guesses(scores[guesser][mask], truth_trials[mask])
    return AttributeInference(attribute, prevalence, results, targets)
