"""Metrics for a risk model on one test set: discrimination, calibration, clinical usefulness.

Pure numpy functions, vectorised over bootstrap resamples: AUROC (rank based,
Mann-Whitney), AUPRC (average precision), Brier score, calibration slope and
intercept (logistic recalibration), expected calibration error, calibration
curves, decision curves (net benefit), subgroup results and the DeLong test
for two correlated AUROCs. Every count a reader sees goes through
`compendium.disclosure` (cells under 5 are suppressed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from compendium.disclosure import MIN_CELL

Z95 = 1.959963984540054


def _check(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.shape[-1] != s.shape[-1]:
        raise ValueError(f"labels and scores differ in length: {y.shape[-1]} vs {s.shape[-1]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(np.int8), s


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float | np.ndarray:
    """Return the area under the ROC curve (rows of 2-D input are separate resamples)."""
    y, s = _check(y_true, scores)
    n_pos = y.sum(axis=-1).astype(float)
    n_neg = y.shape[-1] - n_pos
    ranks = stats.rankdata(s, method="average", axis=-1)
    rank_sum = (ranks * y).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(value) if np.ndim(value) == 0 else value


def auprc(y_true: np.ndarray, scores: np.ndarray) -> float | np.ndarray:
    """Return average precision: sum over distinct thresholds of (recall step) x precision."""
    y, s = _check(y_true, scores)
    y = np.broadcast_to(y, s.shape)
    order = np.argsort(-s, axis=-1, kind="mergesort")
    y_sorted = np.take_along_axis(y, order, axis=-1).astype(float)
    s_sorted = np.take_along_axis(s, order, axis=-1)
    true_positives = np.cumsum(y_sorted, axis=-1)
    flagged = np.arange(1, s.shape[-1] + 1)
    # A threshold sits at the last position of each run of tied scores.
    threshold_end = np.ones(s.shape, dtype=bool)
    threshold_end[..., :-1] = s_sorted[..., 1:] != s_sorted[..., :-1]
    tp_at_end = np.where(threshold_end, true_positives, np.nan)
    step = np.where(threshold_end, true_positives - _ffill_previous(tp_at_end), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (step * true_positives / flagged).sum(axis=-1) / true_positives[..., -1]
    return float(value) if np.ndim(value) == 0 else value


def _ffill(values: np.ndarray) -> np.ndarray:
    """Forward-fill NaN along the last axis."""
    index = np.where(~np.isnan(values), np.arange(values.shape[-1]), 0)
    np.maximum.accumulate(index, axis=-1, out=index)
    return np.take_along_axis(values, index, axis=-1)


def _ffill_previous(values: np.ndarray) -> np.ndarray:
    """Return, at each position, the last non-NaN value strictly before it (0 if none)."""
    shifted = np.concatenate([np.zeros(values.shape[:-1] + (1,)), values[..., :-1]], axis=-1)
    shifted[..., 0] = 0.0
    return _ffill(shifted)


def true_label_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the logit-scaled confidence in the true label, log(p_y / (1 - p_y)), stable in logits."""
    labels = np.asarray(labels).reshape((-1,) + (1,) * (np.ndim(logits) - 1))
    return np.where(labels == 1, logits, -logits)


def record_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the binary cross-entropy of each record, computed from log-odds (no clipping needed)."""
    return np.logaddexp(0.0, -true_label_confidence(logits, labels))


def brier(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Return the Brier score (mean squared error of predicted probabilities)."""
    y, p = _check(y_true, probabilities)
    return float(np.mean((p - y) ** 2))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _fit_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray | None = None, iterations: int = 50) -> np.ndarray:
    """Return maximum-likelihood coefficients of logit P(y=1) = X b (+ offset), by Newton-Raphson."""
    beta = np.zeros(x.shape[1])
    offset = np.zeros(len(y)) if offset is None else offset
    for _ in range(iterations):
        eta = x @ beta + offset
        p = 1 / (1 + np.exp(-eta))
        w = p * (1 - p)
        gradient = x.T @ (y - p)
        hessian = x.T @ (x * w[:, None])
        step = np.linalg.solve(hessian + 1e-10 * np.eye(x.shape[1]), gradient)
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def calibration_slope_intercept(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Return (slope, intercept-in-the-large): slope from logit(y) ~ a + b logit(p); intercept with b fixed at 1."""
    y, p = _check(y_true, probabilities)
    lp = _logit(p)
    slope = _fit_logistic(np.column_stack([np.ones_like(lp), lp]), y)[1]
    intercept = _fit_logistic(np.ones((len(y), 1)), y, offset=lp)[0]
    return float(slope), float(intercept)


def recalibration(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Return the (intercept, slope) that recalibrate a model on one site: logit(y) ~ a + b logit(p), fitted
    on that site's own (training) records. Apply with `recalibrated`."""
    y, p = _check(y_true, probabilities)
    lp = _logit(p)
    intercept, slope = _fit_logistic(np.column_stack([np.ones_like(lp), lp]), y)
    return float(intercept), float(slope)


def recalibrated(probabilities: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """Return probabilities after a site's recalibration: sigmoid(a + b logit(p))."""
    return 1 / (1 + np.exp(-(intercept + slope * _logit(np.asarray(probabilities, float)))))


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Return the ECE over equal-width probability bins (weighted mean |observed - predicted|)."""
    y, p = _check(y_true, probabilities)
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    predicted = np.bincount(which, weights=p, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    used = count > 0
    return float(np.sum(np.abs(observed[used] - predicted[used])) / len(y))


def calibration_curve(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Return per-quantile-bin mean predicted and observed risk; bins under 5 patients or events are dropped."""
    y, p = _check(y_true, probabilities)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    frame = pd.DataFrame({"bin": which, "p": p, "y": y}).groupby("bin").agg(
        patients=("y", "size"), events=("y", "sum"), predicted=("p", "mean"), observed=("y", "mean"))
    small = (frame["patients"] < MIN_CELL) | (frame["events"].between(1, MIN_CELL - 1)) | (
        (frame["patients"] - frame["events"]).between(1, MIN_CELL - 1))
    return frame.loc[~small].reset_index(drop=True)


def net_benefit(y_true: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Return the decision curve: net benefit of the model, of treating all and of treating none."""
    y, p = _check(y_true, probabilities)
    n = len(y)
    t = np.asarray(thresholds, dtype=float)
    flagged = p[None, :] >= t[:, None]
    tp = (flagged & (y[None, :] == 1)).sum(axis=1)
    fp = (flagged & (y[None, :] == 0)).sum(axis=1)
    odds = t / (1 - t)
    prevalence = y.mean()
    return pd.DataFrame({
        "threshold": t,
        "model": tp / n - fp / n * odds,
        "treat_all": prevalence - (1 - prevalence) * odds,
        "treat_none": 0.0,
    })


def bootstrap_indices(n: int, resamples: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """Return (resamples, n) row indices drawn with replacement (within strata if given)."""
    if strata is None:
        return rng.integers(0, n, size=(resamples, n))
    out = np.empty((resamples, n), dtype=np.int64)
    position = 0
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        out[:, position:position + members.size] = members[rng.integers(0, members.size, size=(resamples, members.size))]
        position += members.size
    return out


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap 95% interval."""

    value: float
    lower: float
    upper: float

    def as_dict(self, digits: int = 4) -> dict:
        return {"value": round(self.value, digits), "lower": round(self.lower, digits), "upper": round(self.upper, digits)}

    def __str__(self) -> str:
        return f"{self.value:.3f} ({self.lower:.3f}-{self.upper:.3f})"


def bootstrap_metric(metric, y_true: np.ndarray, scores: np.ndarray, resamples: int, rng: np.random.Generator,
                     level: float = 0.95) -> Estimate:
    """Return metric with a stratified percentile bootstrap CI (metric must accept 2-D resample rows)."""
    y, s = _check(y_true, scores)
    index = bootstrap_indices(len(y), resamples, rng, strata=y)
    values = np.asarray(metric(y[index], s[index]), dtype=float)
    alpha = (1 - level) / 2
    lower, upper = np.nanquantile(values, [alpha, 1 - alpha])
    return Estimate(float(metric(y, s)), float(lower), float(upper))


#: The keys of `delong_test`'s result.
DELONG_COLUMNS = ("auroc_a", "auroc_b", "difference", "lower", "upper", "z", "p_value")


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """Return DeLong's test of two correlated AUROCs on the same patients: difference, its CI and p-value."""
    y, a = _check(y_true, scores_a)
    _, b = _check(y_true, scores_b)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two patients with and without the outcome")
    v10, v01, aucs = [], [], []
    for s in (a, b):
        # Structural components by mid-ranks (Sun and Xu 2014).
        r_all = stats.rankdata(s, method="average")
        r_pos = stats.rankdata(s[pos], method="average")
        r_neg = stats.rankdata(s[neg], method="average")
        v10.append((r_all[pos] - r_pos) / n)
        v01.append(1.0 - (r_all[neg] - r_neg) / m)
        aucs.append((r_all[pos].sum() - m * (m + 1) / 2) / (m * n))
    s10 = np.cov(np.vstack(v10))
    s01 = np.cov(np.vstack(v01))
    covariance = s10 / m + s01 / n
    difference = aucs[0] - aucs[1]
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    se = float(np.sqrt(max(variance, 0.0)))
    z = difference / se if se > 0 else 0.0
    return {
        "auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": float(difference),
        "lower": float(difference - Z95 * se), "upper": float(difference + Z95 * se),
        "z": float(z), "p_value": float(2 * stats.norm.sf(abs(z))),
    }


def not_estimable_reason(y_true: np.ndarray) -> str | None:
    """Return why discrimination cannot be estimated on these labels (one outcome class), or None."""
    y = np.asarray(y_true)
    if y.size == 0:
        return "no patients"
    if np.unique(y).size < 2:
        # No count in the reason: it is shown on pages, and a small test split's size is a small cell.
        return f"every patient here has the same outcome ({'readmitted' if y[0] else 'not readmitted'})"
    return None


def evaluate(y_true: np.ndarray, probabilities: np.ndarray, resamples: int, rng: np.random.Generator,
             is_probability: bool = True) -> dict:
    """Return the standard metric set for one model on one test set.

    Scores that are not probabilities (for example the LACE index) get
    discrimination metrics only. On a test set with one outcome class the
    metrics are not estimable: the result says so and why, with no numbers.
    """
    reason = not_estimable_reason(y_true)
    if reason is not None:
        return {"not_estimable": reason, "patients": int(np.asarray(y_true).size)}
    y, p = _check(y_true, probabilities)
    result = {
        "auroc": bootstrap_metric(auroc, y, p, resamples, rng).as_dict(),
        "auprc": bootstrap_metric(auprc, y, p, resamples, rng).as_dict(),
        "patients": int(len(y)),
        "events": int(y.sum()),
    }
    if is_probability:
        slope, intercept = calibration_slope_intercept(y, p)
        result.update({
            "brier": round(brier(y, p), 4),
            "calibration_slope": round(slope, 4),
            "calibration_intercept": round(intercept, 4),
            "ece": round(expected_calibration_error(y, p), 4),
        })
    return result


def subgroup_auroc(y_true: np.ndarray, scores: np.ndarray, groups: pd.Series) -> pd.DataFrame:
    """Return AUROC per subgroup; groups with fewer than 5 events or non-events are not estimated."""
    y, s = _check(y_true, scores)
    rows = []
    for name in sorted(pd.unique(groups)):
        mask = (groups == name).to_numpy()
        events = int(y[mask].sum())
        non_events = int(mask.sum()) - events
        small = events < MIN_CELL or non_events < MIN_CELL
        rows.append({"group": name, "patients": int(mask.sum()) if not small else np.nan,
                     "auroc": np.nan if small else auroc(y[mask], s[mask])})
    return pd.DataFrame(rows)
