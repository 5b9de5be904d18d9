"""Membership inference: given a patient's record and the model, was the patient in the training data?

Attacks score every candidate record; a higher score means "member".

- `loss_scores`: the loss-threshold baseline (Yeom et al. 2018): low loss, member.
- `lira_scores`: the likelihood-ratio attack (Carlini et al. 2022): per-record
  Gaussians of the logit-scaled confidence under reference models that
  included the record (IN) and did not (OUT); online uses both, offline only OUT.
- `rmia_scores`: the relative membership inference attack (Zarifzadeh et al.
  2024): the record's likelihood ratio against population records.

`ATTACKS` registers each attack once: its name in summary.json, its label
in tables and figures, and how it scores from what the attacker knows.

Results are AUC and TPR at low FPR, with Clopper-Pearson intervals on the
TPR, and are pooled over several target models so that a 0.1% FPR rests on
enough non-member trials.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from fl.evaluate import auroc, record_loss, true_label_confidence

LOW_FPRS = (0.001, 0.01)


def loss_scores(target_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return loss-threshold scores: the negative loss under the target model."""
    return -record_loss(target_logits, labels)


def lira_scores(target_logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray,
                reference_members: np.ndarray, online: bool = True, global_variance: bool = False) -> np.ndarray:
    """Return LiRA scores for each record.

    `reference_logits` is (n, R) from R reference models, `reference_members`
    the (n, R) boolean membership of each record in each reference model.
    Online: log N(phi; in) - log N(phi; out). Offline: the one-sided
    log-probability that an OUT model would be as confident.
    """
    phi_target = true_label_confidence(target_logits, labels)
    phi = true_label_confidence(reference_logits, labels)
    inside = np.asarray(reference_members, dtype=bool)

    def fit(mask):
        count = mask.sum(axis=1)
        mean = np.where(mask, phi, 0.0).sum(axis=1) / np.maximum(count, 1)
        variance = np.where(mask, (phi - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count - 1, 1)
        if global_variance:
            variance = np.full_like(variance, np.nanmedian(variance))
        return mean, np.sqrt(np.maximum(variance, 1e-6))

    mean_out, sd_out = fit(~inside)
    if not online:
        return stats.norm.logsf(phi_target, loc=mean_out, scale=sd_out) * -1.0
    mean_in, sd_in = fit(inside)
    return (stats.norm.logpdf(phi_target, mean_in, sd_in) - stats.norm.logpdf(phi_target, mean_out, sd_out))


def rmia_scores(target_logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray,
                population: np.ndarray, gamma: float = 1.0, offline_a: float = 0.3,
                reference_members: np.ndarray | None = None) -> np.ndarray:
    """Return RMIA scores: the share of population records z whose likelihood ratio the record beats.

    Pr(x|theta) / Pr(x) with Pr(x) the mean over reference models; with only
    OUT reference models (offline), Pr(x) is corrected by (1 + a) / 2 * out + (1 - a) / 2
    as in the paper. `population` indexes records used as z (non-members of the target).
    """
    def probability(logits):
        return 1.0 / (1.0 + np.exp(-true_label_confidence(logits, labels)))

    p_target = probability(target_logits)
    p_reference = probability(reference_logits)
    if reference_members is None:
        p_marginal = p_reference.mean(axis=1)
    else:
        out = ~np.asarray(reference_members, dtype=bool)
        p_out = np.where(out, p_reference, 0.0).sum(axis=1) / np.maximum(out.sum(axis=1), 1)
        p_marginal = (1 + offline_a) / 2 * p_out + (1 - offline_a) / 2
    ratio = p_target / np.maximum(p_marginal, 1e-12)
    z_ratio = np.sort(ratio[population])
    # Share of z with ratio_x / ratio_z > gamma, i.e. ratio_z < ratio_x / gamma.
    return np.searchsorted(z_ratio, ratio / gamma, side="left") / z_ratio.size


@dataclass(frozen=True)
class AttackerKnowledge:
    """What a black-box attacker holds against one target model: its logits, the labels, and reference models."""

    target_logits: np.ndarray  # (n,) the target model's log-odds of every candidate record
    labels: np.ndarray  # (n,)
    reference_logits: np.ndarray  # (n, R) the reference models' log-odds
    reference_members: np.ndarray  # (n, R) each record's membership in each reference model
    population: np.ndarray  # indices of records used as population samples (RMIA's z)


@dataclass(frozen=True)
class Attack:
    """One membership attack: its name in summary.json, its label in tables and figures, and its scores."""

    name: str
    label: str
    scores: Callable[[AttackerKnowledge], np.ndarray]


#: Every membership attack, in the order results, tables and figures list them.
ATTACKS: dict[str, Attack] = {attack.name: attack for attack in (
    Attack("loss", "loss threshold", lambda known: loss_scores(known.target_logits, known.labels)),
    Attack("lira_online", "LiRA (online)", lambda known: lira_scores(
        known.target_logits, known.labels, known.reference_logits, known.reference_members, online=True)),
    Attack("lira_offline", "LiRA (offline)", lambda known: lira_scores(
        known.target_logits, known.labels, known.reference_logits, known.reference_members, online=False)),
    Attack("rmia", "RMIA", lambda known: rmia_scores(
        known.target_logits, known.labels, known.reference_logits, known.population)),
)}


@dataclass(frozen=True)
class AttackResult:
    """How well an attack separates members from non-members, over pooled trials."""

    auc: float
    tpr_at: dict[float, tuple[float, float, float]]  # fpr -> (tpr, lower, upper)
    members: int
    non_members: int

    def as_dict(self) -> dict:
        return {"auc": round(self.auc, 4), "members": self.members, "non_members": self.non_members,
                **tpr_entries(self.tpr_at)}


def fpr_label(fpr: float) -> str:
    """Return how summaries name a false-positive rate in their keys: 0.01 -> "1pct_fpr"."""
    return f"{fpr * 100:g}pct_fpr"


def tpr_entries(tpr_at: dict[float, tuple[float, float, float]]) -> dict[str, dict[str, float]]:
    """Return {"tpr_at_<fpr>": {"value", "lower", "upper"}} for each FPR's (TPR, lower, upper): summary.json's shape."""
    return {f"tpr_at_{fpr_label(fpr)}": {"value": round(tpr, 5), "lower": round(low, 5), "upper": round(high, 5)}
            for fpr, (tpr, low, high) in tpr_at.items()}


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Return the exact (Clopper-Pearson) binomial confidence interval for successes / trials.

    Without trials (no members to find) the interval is all of [0, 1].
    """
    if trials == 0:
        return 0.0, 1.0
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> tuple[float, int, int]:
    """Return (tpr, true positives, members) at the most lenient threshold whose FPR is at most `fpr`."""
    members = np.asarray(members, dtype=bool)
    negatives = np.sort(scores[~members])[::-1]
    allowed = int(np.floor(fpr * negatives.size))
    # Flag records scoring strictly above the (allowed+1)-th highest non-member score.
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    hits = int(np.sum(scores[members] > threshold))
    return hits / max(int(members.sum()), 1), hits, int(members.sum())


def evaluate_attack(scores: np.ndarray, members: np.ndarray, fprs: tuple[float, ...] = LOW_FPRS) -> AttackResult:
    """Return AUC and TPR at each low FPR (with Clopper-Pearson intervals) of pooled attack trials."""
    scores = np.asarray(scores, dtype=float)
    members = np.asarray(members, dtype=bool)
    tpr_at = {}
    for fpr in fprs:
        tpr, hits, total = tpr_at_fpr(scores, members, fpr)
        low, high = clopper_pearson(hits, total)
        tpr_at[fpr] = (tpr, low, high)
    return AttackResult(float(auroc(members.astype(int), scores)), tpr_at, int(members.sum()), int((~members).sum()))
