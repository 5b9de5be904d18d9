"""Canaries: injected outlier patients, to show the worst-case exposure of the federated pipeline.

A canary is a synthetic patient whose every value is valid (each lies at the
edge of what the site's records show) but whose combination is implausible,
and whose outcome is the one the population finds least likely. Such
records pull a model hardest and are what a membership attack finds
first. The canaries join one site's training data; K federated pipelines
are re-run with every record, canaries included, in a random half of them,
and LiRA (online) attacks every pipeline in turn, the other K - 1 being its
reference models (leave-one-out, computed for all K targets at once).
The canaries' attack success is read at the threshold that gives a low
false-positive rate on ordinary patients who were not trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression

from data_synth.features import FEATURES
from fl.data import FEATURE_NAMES, FeatureStatistics, PreprocessingSpec, SiteSplit, age_band
from fl.evaluate import auroc, true_label_confidence
from fl.privacy.membership import LOW_FPRS, clopper_pearson, tpr_entries
from fl.privacy.experiment import TrainingRecipe, train_population

#: Canaries take values beyond these quantiles of the site's observed values (low or high at random).
EDGE_QUANTILES = (0.005, 0.995)


def make_canaries(template: SiteSplit, count: int, rng: np.random.Generator) -> SiteSplit:
    """Return `count` outlier patients in the shape of `template`'s rows (no real patient's values are copied whole).

    Each numeric feature sits at the site's 0.5th or 99.5th percentile (at
    random per canary and feature), each binary feature is set at random, and
    the outcome is the opposite of what a logistic regression fitted on the
    site predicts for the canary.
    """
    if count < 1:
        raise ValueError(f"canaries: need at least one, got {count}")
    columns = {}
    for feature in FEATURES:
        observed = template.features[feature.name].dropna().to_numpy()
        if feature.kind == "binary":
            columns[feature.name] = rng.integers(0, 2, count).astype(float)
        else:
            # Observed values, not interpolated ones: a count stays a whole number.
            low = np.quantile(observed, EDGE_QUANTILES[0], method="lower")
            high = np.quantile(observed, EDGE_QUANTILES[1], method="higher")
            columns[feature.name] = np.where(rng.random(count) < 0.5, low, high)
    features = pd.DataFrame(columns)[list(FEATURE_NAMES)]
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([template.features]))
    population = LogisticRegression(max_iter=2000).fit(spec.transform(template.features), template.labels)
    labels = 1 - population.predict(spec.transform(features)).astype(int)
    sex = pd.Series(np.where(features["female"] == 1, "women", "men"))
    return SiteSplit(template.site, template.split, features, labels.astype(template.labels.dtype), sex,
                     age_band(features["age"]), np.full(count, np.nan))


def inject(sites: dict[str, SiteSplit], site: str, canaries: SiteSplit) -> tuple[dict[str, SiteSplit], np.ndarray]:
    """Return the sites with the canaries appended to `site`, and a mask of the canary rows (sites in name order)."""
    if site not in sites:
        raise ValueError(f"canaries: site {site!r} is not one of {sorted(sites)}")
    joined = sites[site]
    joined = SiteSplit(joined.site, joined.split, pd.concat([joined.features, canaries.features], ignore_index=True),
                       np.concatenate([joined.labels, canaries.labels]),
                       pd.concat([joined.sex, canaries.sex], ignore_index=True),
                       pd.concat([joined.age_band, canaries.age_band], ignore_index=True),
                       np.concatenate([joined.lace, canaries.lace]))
    out = {**sites, site: joined}
    mask = np.concatenate([np.r_[np.zeros(len(sites[s]), bool), np.ones(len(canaries), bool)] if s == site
                           else np.zeros(len(sites[s]), bool) for s in sorted(out)])
    return out, mask


def leave_one_out_lira(logits: np.ndarray, labels: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Return (N, K) online LiRA scores of every record against every model, the other K - 1 being references.

    Equal to `membership.lira_scores(logits[:, t], labels, logits[:, others], members[:, others])`
    for each t; the per-record IN and OUT Gaussians are updated by removing the
    target's own contribution, so no loop over models is needed.
    """
    phi = true_label_confidence(logits, labels)
    inside = np.asarray(members, dtype=bool)

    def fit(mask):
        weight = mask.astype(float)
        count = weight.sum(axis=1, keepdims=True) - weight  # (N, K): references excluding the target
        total = (weight * phi).sum(axis=1, keepdims=True) - weight * phi
        squares = (weight * phi**2).sum(axis=1, keepdims=True) - weight * phi**2
        mean = total / np.maximum(count, 1)
        variance = (squares - count * mean**2) / np.maximum(count - 1, 1)
        return mean, np.sqrt(np.maximum(variance, 1e-6))

    mean_in, sd_in = fit(inside)
    mean_out, sd_out = fit(~inside)
    return stats.norm.logpdf(phi, mean_in, sd_in) - stats.norm.logpdf(phi, mean_out, sd_out)


@dataclass(frozen=True)
class CanaryExposure:
    """Canaries' attack success against ordinary patients', at thresholds set on ordinary non-members."""

    canaries: int
    site: str
    models: int
    tpr_at: dict[str, dict[float, tuple[float, float, float]]]  # group -> fpr -> (tpr, lower, upper)
    auc: dict[str, float]  # group -> AUC (members vs non-members of the same group)
    trials: dict[str, int]  # group -> member trials
    canary_rank: float  # median canary's share of ordinary patients with a smaller exposure (score gap)
    threshold_trials: int  # ordinary non-member trials the thresholds are set on

    def table(self) -> pd.DataFrame:
        """Return one row per group: AUC and TPR at 0.1% and 1% FPR (of ordinary non-members) with 95% CIs."""
        rows = []
        for group in ("ordinary patients", "canaries"):
            row = {"group": group, "AUC": round(self.auc[group], 3), "member trials": self.trials[group]}
            for fpr, (tpr, low, high) in self.tpr_at[group].items():
                row[f"TPR@{fpr * 100:g}%FPR"] = f"{tpr:.3f} ({low:.3f}-{high:.3f})"
            rows.append(row)
        return pd.DataFrame(rows)

    def as_dict(self) -> dict:
        groups = {}
        for group in self.tpr_at:
            groups[group] = {"auc": round(self.auc[group], 4), "member_trials": self.trials[group],
                             **tpr_entries(self.tpr_at[group])}
        return {"canaries": self.canaries, "site": self.site, "reference_models": self.models,
                "threshold_set_on": "ordinary non-members", "threshold_trials": self.threshold_trials, "groups": groups,
                "median_canary_exposure_rank": round(self.canary_rank, 4)}


def exposure(scores: np.ndarray, members: np.ndarray, canary: np.ndarray,
             fprs: tuple[float, ...] = LOW_FPRS) -> tuple[dict, dict, dict, float, int]:
    """Return per group (TPR at each FPR with CIs, AUC, member trials), the median canary's exposure rank and
    the number of ordinary non-member trials the thresholds are set on."""
    members = np.asarray(members, dtype=bool)
    group_rows = {"ordinary patients": ~canary, "canaries": canary}
    baseline = np.sort(scores[~canary][~members[~canary]])[::-1]  # ordinary non-member trials, high first
    tpr_at, auc, trials = {}, {}, {}
    for group, rows in group_rows.items():
        s, m = scores[rows], members[rows]
        hits_at = {}
        for fpr in fprs:
            allowed = int(np.floor(fpr * baseline.size))
            threshold = baseline[allowed] if allowed < baseline.size else -np.inf
            hits = int(np.sum(s[m] > threshold))
            hits_at[fpr] = (hits / max(int(m.sum()), 1), *clopper_pearson(hits, int(m.sum())))
        tpr_at[group], trials[group] = hits_at, int(m.sum())
        auc[group] = float(auroc(m.ravel().astype(int), s.ravel()))
    # Per record: mean score when a member minus when not (as `experiment.vulnerability`).
    gap = (np.where(members, scores, 0).sum(axis=1) / np.maximum(members.sum(axis=1), 1)
           - np.where(~members, scores, 0).sum(axis=1) / np.maximum((~members).sum(axis=1), 1))
    ordinary = np.sort(gap[~canary])
    rank = float(np.median(np.searchsorted(ordinary, gap[canary], side="left") / ordinary.size))
    return tpr_at, auc, trials, rank, int(baseline.size)


def run(sites: dict[str, SiteSplit], site: str, count: int, models: int, recipe: TrainingRecipe,
        seed: int) -> CanaryExposure:
    """Inject `count` canaries into `site`, train `models` federated pipelines and attack every one of them."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 8]))
    canaries = make_canaries(sites[site], count, rng)
    injected, canary = inject(sites, site, canaries)
    logits, labels, members, _ = train_population(injected, models, recipe, rng)
    scores = leave_one_out_lira(logits, labels, members)
    return CanaryExposure(count, site, models, *exposure(scores, members, canary))
