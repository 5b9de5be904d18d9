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
from sklearn.linear_model import LogisticRegression

from data_synth.features import FEATURES
from fl.data import FEATURE_NAMES, FeatureStatistics, PreprocessingSpec, SiteSplit
from fl.evaluate import record_loss
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
    """How well one guesser recovers the attribute over one group of trials.

    The intervals are 95% percentile intervals of a bootstrap over patients:
    pooled over target models, one patient gives several trials, so the
    trials are not independent and a binomial interval would be too narrow.
    """

    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    trials: int
    with_attribute: int
    patients: int

    def as_dict(self) -> dict:
        return {"accuracy": {"value": round(self.accuracy, 4), "lower": round(self.accuracy_ci[0], 4),
                             "upper": round(self.accuracy_ci[1], 4)},
                "auc": {"value": round(self.auc, 4), "lower": round(self.auc_ci[0], 4),
                        "upper": round(self.auc_ci[1], 4)},
                "trials": self.trials, "patients": self.patients, "with_attribute": self.with_attribute}


#: Bootstrap resamples of patients behind every interval of this module.
BOOTSTRAP = 200


class RankedScores:
    """One guesser's scores over a group's trials, sorted once, for AUCs under many sets of trial weights."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        self.truth = np.asarray(truth, dtype=bool)[self.order]
        _, self.blocks = np.unique(np.asarray(scores)[self.order], return_index=True)  # tied scores share a block

    def auc(self, weights: np.ndarray) -> float:
        """Return the weighted Mann-Whitney AUC (ties count one half); nan without both classes."""
        w = np.asarray(weights, dtype=float)[self.order]
        positive = np.add.reduceat(w * self.truth, self.blocks)
        negative = np.add.reduceat(w * ~self.truth, self.blocks)
        below = np.cumsum(negative) - negative
        total = positive.sum() * negative.sum()
        return float((positive * (below + 0.5 * negative)).sum() / total) if total > 0 else float("nan")


def _interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def evaluate_guesses(scores: np.ndarray, truth: np.ndarray, patients: np.ndarray,
                     resampled: np.ndarray) -> tuple[GuessResult, np.ndarray]:
    """Return accuracy (guess: score > 0) and AUC with patient-bootstrap intervals, and the bootstrap AUCs.

    `patients` names each trial's patient; `resampled` is (B, N): how often
    each patient is drawn in each of B bootstrap resamples (shared across
    guessers, so differences between guessers can be bootstrapped in pairs).
    """
    truth = np.asarray(truth, dtype=bool)
    correct = (scores > 0) == truth
    ranked = RankedScores(scores, truth)
    weights = resampled[:, patients].astype(float)  # (B, trials)
    accuracies = (weights @ correct) / weights.sum(axis=1)
    aucs = np.array([ranked.auc(w) for w in weights])
    positives = int(truth.sum())
    result = GuessResult(float(correct.mean()), _interval(accuracies), ranked.auc(np.ones(truth.size)),
                         _interval(aucs), int(truth.size), positives, int(np.unique(patients).size))
    return result, aucs


@dataclass
class AttributeInference:
    """Attribute-inference results per group (members, non-members) and guesser, pooled over target models."""

    attribute: str
    prevalence: float
    results: dict[tuple[str, str], GuessResult]  # (group, guesser) -> result
    targets: int
    gain_ci: dict[str, tuple[float, float]]  # group -> patient-bootstrap interval of the model's AUC gain

    def table(self) -> pd.DataFrame:
        """Return one row per group and guesser: accuracy and AUC with 95% intervals, trials and patients."""
        rows = []
        for (group, guesser), r in self.results.items():
            rows.append({"group": group, "guesser": guesser,
                         "accuracy": f"{r.accuracy:.3f} ({r.accuracy_ci[0]:.3f}-{r.accuracy_ci[1]:.3f})",
                         "AUC": f"{r.auc:.3f} ({r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f})", "trials": r.trials,
                         "patients": r.patients})
        return pd.DataFrame(rows)

    def as_dict(self) -> dict:
        return {"attribute": self.attribute, "population_prevalence": round(self.prevalence, 4),
                "target_models": self.targets,
                "groups": [{"group": g, "guesser": k, **r.as_dict()} for (g, k), r in self.results.items()],
                "model_gain_auc": {g: {"value": round(self.gain(g), 4), "lower": round(self.gain_ci[g][0], 4),
                                       "upper": round(self.gain_ci[g][1], 4)} for g in ("members", "non-members")},
                "intervals": f"95% percentile intervals of {BOOTSTRAP} bootstrap resamples of patients"}

    def gain(self, group: str) -> float:
        """Return what the released model adds to the population baseline's AUC in `group`."""
        return self.results[(group, "model")].auc - self.results[(group, "population")].auc


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
    patient = np.tile(np.arange(len(truth))[:, None], targets)
    resampled = rng.multinomial(len(truth), np.full(len(truth), 1 / len(truth)), size=BOOTSTRAP)  # (B, N)
    results, gain_ci = {}, {}
    for group, mask in (("members", member), ("non-members", ~member)):
        aucs = {}
        for guesser in GUESSERS:
            results[(group, guesser)], aucs[guesser] = evaluate_guesses(
                scores[guesser][mask], truth_trials[mask], patient[mask], resampled)
        gain_ci[group] = _interval(aucs["model"] - aucs["population"])
    return AttributeInference(attribute, prevalence, results, targets, gain_ci)
