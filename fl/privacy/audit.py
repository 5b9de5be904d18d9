"""An empirical audit of DP-SGD's epsilon: canaries inside the DP federations, and a lower bound on epsilon.

The accountant gives an upper bound: no test on a patient can tell, better
than epsilon allows, whether they were trained on. The audit tries. A
canary patient (`fl.privacy.canaries.make_canaries`: every value at the
edge of the site's range, the outcome the unlikely one) joins the first
site's data in a random half of M federations; everything else is the same
in all M (the dataset D, the neighbouring datasets being D and D plus the
canary). The federations are the batched DP-SGD pipelines of
`fl.privacy.reference.train_federated_dp` (Opacus's DP-SGD, tested equal
to it), each with its own noise and Poisson sampling. The attacker holds
each released model (positions A/B) and scores the canary by the model's
log-odds of the canary's outcome: trained on, the model leans towards it.
(A canary built to use inputs no other patient uses, a "Dirac" canary,
was tried and gave weaker bounds: nothing pulls those weights back, so
the noise of every step accumulates in them.)

Any test of "canary in" against "canary out" with false-positive rate FPR
and false-negative rate FNR satisfies, under (epsilon, delta)-DP,
FPR + e^epsilon * FNR >= 1 - delta and FNR + e^epsilon * FPR >= 1 - delta
(Kairouz et al. 2015). So

    epsilon >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)),

and with FPR and FNR replaced by the upper ends of their Clopper-Pearson
intervals (each at 97.5%, so both hold together with 95% confidence) this
is a lower bound on epsilon that holds with 95% confidence (Jagielski,
Ullman and Oprea 2020, "Auditing differentially private machine learning";
Nasr et al. 2021, "Adversary instantiation", and 2023, "Tight auditing of
differentially private machine learning"). The threshold is chosen on half
of the federations and the bound computed on the other half, so choosing
it costs no confidence.

The bound can refute an accounted epsilon (a bug in the training or the
accounting), never confirm it. With n federations per half, even a perfect
test cannot show an epsilon above log((1 - delta - u) / u), u the upper
Clopper-Pearson limit of 0 out of n/2 (the audit's *ceiling*); an accounted
epsilon at or above it is "not testable" by this audit, not "no violation".
The canary here is a black-box attack on the final model only, weaker
than the accountant's adversary (who sees every step), so the lower bound
is expected to sit well below the accounted epsilon; the planted-fault
control (training with less noise than the accountant is told) shows it
is strong enough to catch an accounting that is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fl.data import PreprocessingSpec, SiteSplit
from fl.privacy.canaries import inject, make_canaries
from fl.privacy.dp import accounted_epsilon
from fl.privacy.reference import DPSGDRecipe, SiteTensors, train_federated_dp

#: Confidence of the lower bound (FPR's and FNR's upper limits each at (1 + LEVEL) / 2).
LEVEL = 0.95
VIOLATION, NO_VIOLATION, NOT_TESTABLE = "violation", "no violation", "not testable"


def upper_limit(errors: np.ndarray, trials: int, level: float = LEVEL) -> np.ndarray:
    """Return the upper end of the two-sided `level` Clopper-Pearson interval of errors / trials (vectorised)."""
    errors = np.asarray(errors)
    alpha = 1 - level
    with np.errstate(invalid="ignore"):
        upper = stats.beta.ppf(1 - alpha / 2, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, upper)


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """Return the smallest epsilon (>= 0) that (epsilon, delta)-DP allows for a test with these error rates."""
    fpr, fnr = np.asarray(fpr, float), np.asarray(fnr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1 - delta - fnr, 0) / fpr)
        two = np.log(np.maximum(1 - delta - fpr, 0) / fnr)
    return np.maximum(0.0, np.nan_to_num(np.maximum(one, two), nan=0.0, neginf=0.0, posinf=np.inf))


def bound_at_thresholds(scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray,
                        delta: float) -> np.ndarray:
    """Return the 95%-confidence lower bound on epsilon of the test "score >= t" for each threshold t."""
    scores_in, scores_out = np.sort(scores_in), np.sort(scores_out)
    false_negatives = np.searchsorted(scores_in, thresholds, side="left")  # members scored below t
    false_positives = scores_out.size - np.searchsorted(scores_out, thresholds, side="left")
    return epsilon_from_rates(upper_limit(false_positives, scores_out.size),
                              upper_limit(false_negatives, scores_in.size), delta)


def ceiling(trials_in: int, trials_out: int, delta: float) -> float:
    """Return the largest lower bound `trials_in` + `trials_out` trials can give (a test with no errors)."""
    return float(epsilon_from_rates(upper_limit(0, trials_out), upper_limit(0, trials_in), delta))


@dataclass(frozen=True)
class EpsilonLowerBound:
    """The audit's lower bound on epsilon and the test it comes from."""

    epsilon_lower: float
    ceiling: float  # the most these trials could show
    threshold: float
    false_positives: int
    false_negatives: int
    trials_in: int  # evaluation half: federations with the canary
    trials_out: int


def lower_bound(scores: np.ndarray, member: np.ndarray, delta: float) -> EpsilonLowerBound:
    """Return epsilon's lower bound from the canary's score in each federation (`member`: canary trained on).

    Federations with an even index choose the threshold (the one whose bound
    is largest there), those with an odd index give the bound.
    """
    scores, member = np.asarray(scores, float), np.asarray(member, bool)
    choose = np.arange(scores.size) % 2 == 0
    candidates = np.unique(scores[choose])
    chosen = bound_at_thresholds(scores[choose & member], scores[choose & ~member], candidates, delta)
    threshold = float(candidates[int(np.argmax(chosen))])
    test_in, test_out = scores[~choose & member], scores[~choose & ~member]
    bound = float(bound_at_thresholds(test_in, test_out, np.array([threshold]), delta)[0])
    return EpsilonLowerBound(bound, ceiling(test_in.size, test_out.size, delta), threshold,
                             int(np.sum(test_out >= threshold)), int(np.sum(test_in < threshold)),
                             int(test_in.size), int(test_out.size))


def verdict(accounted: float, bound: EpsilonLowerBound) -> str:
    """Return whether the audit refutes the accounted epsilon, finds nothing, or cannot test it."""
    if bound.epsilon_lower > accounted:
        return VIOLATION
    return NOT_TESTABLE if accounted >= bound.ceiling else NO_VIOLATION


@dataclass(frozen=True)
class AuditResult:
    """One audited DP-SGD configuration: the epsilon claimed, the lower bound measured, the verdict."""

    label: str
    noise_multiplier: float  # the noise the federations were trained with
    accounted_noise_multiplier: float  # the noise the accountant was told
    preprocessing: str
    score: str  # what the attacker scores the canary by
    sample_rate: float
    steps: int
    epsilon: float  # accounted, at delta
    delta: float
    bound: EpsilonLowerBound
    models: int

    @property
    def verdict(self) -> str:
        return verdict(self.epsilon, self.bound)

    def as_dict(self) -> dict:
        b = self.bound
        return {"audit": self.label, "noise_multiplier": self.noise_multiplier,
                "accounted_noise_multiplier": self.accounted_noise_multiplier, "preprocessing": self.preprocessing,
                "canary_score": self.score, "sample_rate": round(self.sample_rate, 6), "steps": self.steps,
                "epsilon": round(self.epsilon, 4), "delta": self.delta,
                "epsilon_lower_bound": round(b.epsilon_lower, 4), "audit_ceiling": round(b.ceiling, 4),
                "confidence": LEVEL, "verdict": self.verdict, "models": self.models,
                "trials_in": b.trials_in, "trials_out": b.trials_out, "false_positives": b.false_positives,
                "false_negatives": b.false_negatives}


#: What the attacker scores the canary by: the released model's log-odds of the canary's outcome, or
#: (round 0 in the clear) the released preprocessing's mean of the canary's first numeric feature.
MODEL_SCORE = "released model: log-odds of the canary's outcome"
STATISTICS_SCORE = "released preprocessing: shift of the mean towards the canary's value"


def audit(sites: dict[str, SiteSplit], site: str, recipe: DPSGDRecipe, models: int, delta: float, seed: int,
          preprocessing: PreprocessingSpec | None, accounted_noise: float | None = None,
          label: str | None = None) -> AuditResult:
    """Return the audit of `recipe` with a canary at `site` in a random half of `models` federations.

    `preprocessing` is the fixed spec the DP runs use (public scaling); None
    means each federation standardises with its own statistics (the round 0
    in the clear), and the attacker then reads the released statistics.
    `accounted_noise` (default: the recipe's) is the noise the accountant is
    told: set it above the recipe's to plant an accounting error.
    """
    if models < 8 or models % 2:
        raise ValueError(f"audit: need an even number of federations, at least 8, got {models}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    canary = make_canaries(sites[site], 1, rng)
    injected, _ = inject(sites, site, canary)
    member = np.zeros(models, bool)
    member[rng.permutation(models)[: models // 2]] = True
    tensors = {s: SiteTensors.of(d.features, d.labels, d.schema) for s, d in injected.items()}
    masks = {s: torch.ones(models, len(d), dtype=torch.bool) for s, d in injected.items()}
    masks[site][:, -1] = torch.as_tensor(member)  # the canary is the last row of its site
    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    trained = train_federated_dp(tensors, masks, recipe, generator, preprocessing)
    if preprocessing is None:
        # The statistics are exact functions of the data: the released mean moves towards the canary.
        numeric = next(i for i, kind in enumerate(sites[site].schema.kinds) if kind != "binary")
        released = trained.mean[:, numeric].double().numpy()
        centre = float(np.median(released))
        scores = (released - centre) * np.sign(float(tensors[site].values[-1, numeric]) - centre)
        score = STATISTICS_SCORE
    else:
        with torch.no_grad():
            logits = trained.logits(tensors[site])[-1].double().numpy()
        scores = np.where(canary.labels[0] == 1, logits, -logits)
        score = MODEL_SCORE
    steps = trained.dp_steps[site]
    total_steps = steps * recipe.local_epochs * recipe.rounds
    noise = recipe.noise_multiplier if accounted_noise is None else accounted_noise
    epsilon = accounted_epsilon(noise, 1 / steps, total_steps, delta) if noise > 0 else float("inf")
    return AuditResult(label or f"noise {recipe.noise_multiplier:g}", recipe.noise_multiplier, noise,
                       "public ranges" if preprocessing is not None else "federated statistics (round 0 in the clear)",
                       score, 1 / steps, total_steps, epsilon, delta, lower_bound(scores, member, delta), models)
