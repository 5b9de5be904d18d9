"""Metrics in fl.evaluate, checked against hand calculations, scikit-learn, scipy and simulation.

Every expected value here is either worked out by hand (in a comment) or
computed by an independent implementation (scikit-learn, scipy, or a
brute-force O(m*n) pairwise formula written in this file); none is copied
from the function under test.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from compendium.disclosure import MIN_CELL
from fl.evaluate import (
    Estimate,
    auprc,
    auroc,
    bootstrap_indices,
    bootstrap_metric,
    brier,
    calibration_curve,
    calibration_slope_intercept,
    delong_test,
    evaluate,
    expected_calibration_error,
    net_benefit,
    subgroup_auroc,
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _random_case(seed: int, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes present and scores (coarsely rounded when ties are wanted)."""
    rng = np.random.default_rng(seed)
    while True:
        y = rng.integers(0, 2, n)
        if 0 < y.sum() < n:
            break
    scores = rng.normal(size=n) + 0.8 * y
    if ties:
        scores = np.round(scores, 0)  # a handful of distinct values -> many ties
    return y, scores


def roc_auc_score_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC per row from scipy's mid-ranks (Mann-Whitney U), independent of fl.evaluate."""
    ranks = stats.rankdata(s, axis=-1)
    m = y.sum(axis=-1)
    n = y.shape[-1] - m
    return ((ranks * y).sum(axis=-1) - m * (m + 1) / 2) / (m * n)


# --------------------------------------------------------------------------- AUROC / AUPRC vs scikit-learn

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 30, 257])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_auprc_match_sklearn(seed, n, ties):
    y, s = _random_case(seed * 1000 + n, n, ties)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auroc_auprc_match_sklearn_with_integer_scores_and_heavy_ties():
    # LACE-like integer scores: only 4 distinct values among 200 patients.
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 4, 200) + y * rng.integers(0, 2, 200)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_auprc_rows_are_separate_resamples(ties):
    y, s = _random_case(7, 40, ties)
    rng = np.random.default_rng(8)
    index = rng.integers(0, len(y), size=(25, len(y)))
    got_roc, got_pr = auroc(y[index], s[index]), auprc(y[index], s[index])
    assert got_roc.shape == got_pr.shape == (25,)
    checked = 0
    for row in range(index.shape[0]):
        yr, sr = y[index[row]], s[index[row]]
        if 0 < yr.sum() < len(yr):
            assert got_roc[row] == pytest.approx(roc_auc_score(yr, sr), abs=1e-12), f"row {row}"
            assert got_pr[row] == pytest.approx(average_precision_score(yr, sr), abs=1e-12), f"row {row}"
            checked += 1
    assert checked >= 20


def test_auroc_auprc_one_label_vector_against_many_score_rows():
    # 1-D labels broadcast against 2-D scores: each row is a different model on the same patients.
    y, _ = _random_case(3, 50, False)
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=(6, 50)) + y, 1)
    got_roc, got_pr = auroc(y, scores), auprc(y, scores)
    for row in range(6):
        assert got_roc[row] == pytest.approx(roc_auc_score(y, scores[row]), abs=1e-12)
        assert got_pr[row] == pytest.approx(average_precision_score(y, scores[row]), abs=1e-12)


def test_resample_with_one_class_gives_nan_not_an_error():
    # A bootstrap row without events has no AUROC; it must be NaN (ignored by nanquantile), not a crash.
    y = np.array([[0, 0, 0, 0], [0, 1, 0, 1]])
    s = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.9, 0.2, 0.8]])
    roc, pr = auroc(y, s), auprc(y, s)
    assert np.isnan(roc[0]) and roc[1] == 1.0
    assert np.isnan(pr[0]) and pr[1] == 1.0


# --------------------------------------------------------------------------- hand-computed AUROC / AUPRC

def test_perfect_ranking():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])
    assert auroc(y, s) == 1.0
    assert auprc(y, s) == 1.0


def test_inverted_ranking():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = -np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])
    assert auroc(y, s) == 0.0


def test_all_equal_scores():
    y = np.array([0, 1, 0, 1, 1, 0, 0])
    s = np.full(7, 0.3)
    assert auroc(y, s) == 0.5
    # One threshold flags everybody: recall 1, precision = prevalence 3/7.
    assert auprc(y, s) == pytest.approx(3 / 7)


def test_small_example_with_a_tie_by_hand():
    # positives: 0.8, 0.4, 0.35      negatives: 0.35, 0.2, 0.1
    # AUROC = P(pos > neg) + 0.5 P(tie) over the 3 x 3 = 9 pairs:
    #   0.8 beats all 3 -> 3; 0.4 beats all 3 -> 3; 0.35 beats 0.2, 0.1, ties 0.35 -> 2.5
    #   (3 + 3 + 2.5) / 9 = 17/18
    # AUPRC, thresholds at distinct scores in decreasing order:
    #   >= 0.8 : TP 1 of 1 flagged, recall 1/3, precision 1
    #   >= 0.4 : TP 2 of 2 flagged, recall 2/3, precision 1
    #   >= 0.35: TP 3 of 4 flagged (the tie flags a positive and a negative together), recall 1, precision 3/4
    #   AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.35, 0.2])
    assert auroc(y, s) == pytest.approx(17 / 18, abs=1e-12)
    assert auprc(y, s) == pytest.approx(11 / 12, abs=1e-12)


def test_small_example_without_ties_by_hand():
    # positives 0.9, 0.3; negatives 0.8, 0.2, 0.1
    # AUROC: 0.9 beats 3, 0.3 beats 2 (not 0.8) -> 5/6
    # AUPRC: >=0.9 recall 1/2 precision 1; >=0.8 no recall step; >=0.3 recall 1 precision 2/3
    #        AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    assert auroc(y, s) == pytest.approx(5 / 6, abs=1e-12)
    assert auprc(y, s) == pytest.approx(5 / 6, abs=1e-12)


# --------------------------------------------------------------------------- input checks

CHECKED = [auroc, auprc, brier, calibration_slope_intercept, expected_calibration_error, calibration_curve,
           lambda y, p: net_benefit(y, p, [0.1, 0.2]),
           lambda y, p: evaluate(y, p, 10, np.random.default_rng(0))]


@pytest.mark.parametrize("metric", CHECKED)
@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 0], [0, 1, -1, 0, 1, 0], [0, 1, 0.5, 0, 1, 0]])
def test_labels_outside_0_1_raise(metric, labels):
    with pytest.raises(ValueError, match="0 or 1"):
        metric(np.array(labels), np.array([0.1, 0.6, 0.3, 0.2, 0.9, 0.4]))


@pytest.mark.parametrize("metric", CHECKED)
def test_nan_scores_raise(metric):
    with pytest.raises(ValueError, match="NaN"):
        metric(np.array([0, 1, 1, 0, 1, 0]), np.array([0.1, np.nan, 0.3, 0.2, 0.9, 0.4]))


@pytest.mark.parametrize("metric", CHECKED)
def test_length_mismatch_raises(metric):
    with pytest.raises(ValueError, match="length"):
        metric(np.array([0, 1, 1, 0, 1, 0]), np.array([0.1, 0.6, 0.3, 0.2, 0.9]))


def test_delong_and_subgroup_check_inputs():
    y = np.array([0, 1, 1, 0, 1, 0])
    good = np.array([0.1, 0.6, 0.3, 0.2, 0.9, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        delong_test(y, good, np.array([0.1, np.nan, 0.3, 0.2, 0.9, 0.4]))
    with pytest.raises(ValueError, match="length"):
        delong_test(y, good, good[:5])
    with pytest.raises(ValueError, match="0 or 1"):
        subgroup_auroc(np.array([0, 1, 2, 0, 1, 0]), good, pd.Series(list("aaabbb")))


# --------------------------------------------------------------------------- Brier and calibration

def test_brier_by_hand():
    # (0.8-1)^2 + (0.3-0)^2 + (0.5-1)^2 + (0-0)^2 = 0.04 + 0.09 + 0.25 + 0 = 0.38; / 4 = 0.095
    assert brier(np.array([1, 0, 1, 0]), np.array([0.8, 0.3, 0.5, 0.0])) == pytest.approx(0.095, abs=1e-12)


N_CALIBRATION = 100_000


@pytest.fixture(scope="module")
def true_logits_and_labels():
    """Linear predictors ~ N(-1, 1) and outcomes drawn from sigmoid(lp)."""
    rng = np.random.default_rng(2024)
    lp = rng.normal(-1.0, 1.0, N_CALIBRATION)
    y = (rng.random(N_CALIBRATION) < _sigmoid(lp)).astype(int)
    return lp, y


# Tolerance: with n = 100,000, lp ~ N(-1, 1) and mean p(1-p) ~ 0.15, the standard error of the
# slope is about 1 / sqrt(n * Var(lp) * E[p(1-p)]) ~ 0.008 and that of the intercept about
# 1 / sqrt(n * E[p(1-p)]) ~ 0.008. A tolerance of 0.04 is 5 standard errors: a correct
# implementation essentially never fails, a wrong sign or a missing offset always does.
TOL = 0.04


def test_calibration_of_well_calibrated_predictions(true_logits_and_labels):
    lp, y = true_logits_and_labels
    slope, intercept = calibration_slope_intercept(y, _sigmoid(lp))
    assert slope == pytest.approx(1.0, abs=TOL)
    assert intercept == pytest.approx(0.0, abs=TOL)


def test_overconfident_predictions_have_slope_below_one(true_logits_and_labels):
    # Predicted logit = 2 x true logit, so the true logit is 0.5 x predicted: slope ~ 0.5.
    lp, y = true_logits_and_labels
    slope, _ = calibration_slope_intercept(y, _sigmoid(2 * lp))
    assert slope < 1
    assert slope == pytest.approx(0.5, abs=TOL / 2)


def test_underestimated_risk_has_positive_intercept(true_logits_and_labels):
    # Predicted logit = true logit - 1, so with the slope fixed at 1 the intercept is +1.
    lp, y = true_logits_and_labels
    slope, intercept = calibration_slope_intercept(y, _sigmoid(lp - 1.0))
    assert intercept > 0
    assert intercept == pytest.approx(1.0, abs=TOL)
    assert slope == pytest.approx(1.0, abs=TOL)  # a pure shift leaves the slope alone


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_calibration_slope_and_intercept_match_independent_fits(seed):
    # fl.evaluate fits by Newton-Raphson; here the same maximum-likelihood problems are solved by other
    # algorithms, so agreement to 1e-8 pins the fit itself, not only its neighbourhood.
    rng = np.random.default_rng(seed)
    lp = rng.normal(0.3, 3.0, 3000)  # wide: some p below 1e-4 or above 1 - 1e-4 (none below the 1e-7 clip)
    y = (rng.random(3000) < _sigmoid(0.7 * lp + 0.2)).astype(int)
    p = _sigmoid(lp)
    x = np.log(p / (1 - p))
    slope, intercept = calibration_slope_intercept(y, p)

    # Slope: minimise the logistic negative log-likelihood of y ~ a + b logit(p) by quasi-Newton (BFGS).
    def negative_log_likelihood(beta):
        eta = beta[0] + beta[1] * x
        return np.sum(np.logaddexp(0, eta) - y * eta)

    def gradient(beta):
        residual = _sigmoid(beta[0] + beta[1] * x) - y
        return np.array([residual.sum(), (residual * x).sum()])

    fit = optimize.minimize(negative_log_likelihood, [0.0, 1.0], jac=gradient, method="BFGS",
                            options={"gtol": 1e-10})
    assert slope == pytest.approx(fit.x[1], abs=1e-8)
    # ... and by scikit-learn's unpenalised logistic regression (C=inf is penalty=None in scikit-learn >= 1.8).
    model = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x[:, None], y)
    assert slope == pytest.approx(model.coef_[0, 0], abs=1e-7)
    # Intercept-in-the-large: the root of the score equation sum(y - sigmoid(a + logit(p))) = 0 (Brent).
    root = optimize.root_scalar(lambda a: np.sum(y - _sigmoid(a + x)), bracket=(-5, 5), xtol=1e-15, rtol=1e-15)
    assert intercept == pytest.approx(root.root, abs=1e-10)


def test_calibration_with_predictions_of_exactly_0_and_1_stays_finite():
    # logit(0) and logit(1) are infinite; the fit must still return finite numbers.
    rng = np.random.default_rng(6)
    p = rng.uniform(0.05, 0.95, 500)
    y = (rng.random(500) < p).astype(int)
    slope_before, _ = calibration_slope_intercept(y, p)
    p[np.flatnonzero(y == 0)[:3]] = 0.0
    p[np.flatnonzero(y == 1)[:3]] = 1.0
    slope, intercept = calibration_slope_intercept(y, p)
    assert np.isfinite(slope) and np.isfinite(intercept)
    # Six correctly classified extreme predictions barely move the fit.
    assert slope == pytest.approx(slope_before, abs=0.05)


def test_expected_calibration_error_by_hand():
    # 10 equal-width bins.
    #   bin 0 (p < 0.1):  p 0.05, 0.05  y 0, 1  -> |observed 1 - predicted 0.10| = 0.90
    #   bin 1:            p 0.12, 0.18  y 0, 0  -> |0 - 0.30| = 0.30
    #   bin 9 (p >= 0.9): p 0.95, 1.0   y 1, 1  -> |2 - 1.95| = 0.05   (p = 1 belongs to the last bin)
    #   ECE = (0.90 + 0.30 + 0.05) / 6 patients = 1.25 / 6
    y = np.array([0, 1, 0, 0, 1, 1])
    p = np.array([0.05, 0.05, 0.12, 0.18, 0.95, 1.0])
    assert expected_calibration_error(y, p) == pytest.approx(1.25 / 6, abs=1e-12)
    # With 2 bins: [0, 0.5): p sum 0.40, y sum 1 -> 0.60; [0.5, 1]: 1.95 vs 2 -> 0.05; (0.60 + 0.05) / 6
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(0.65 / 6, abs=1e-12)
    # Bins holding a single patient count too: |1 - 0.3| and |0 - 0.6| -> (0.7 + 0.6) / 2
    assert expected_calibration_error(np.array([1, 0]), np.array([0.3, 0.6])) == pytest.approx(0.65, abs=1e-12)


def test_expected_calibration_error_is_zero_when_bins_are_calibrated():
    # Each bin's mean prediction equals its event rate: 0.25 with 1 of 4, 0.75 with 3 of 4.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_calibration_curve_drops_small_bins():
    # 40 distinct probabilities in 4 quantile bins of 10 patients each (sorted order).
    #   bin 0: 0 events              -> kept (a zero count is not disclosive, cf. disclosure.is_small)
    #   bin 1: 3 events              -> dropped (fewer than 5 events)
    #   bin 2: 5 events, 5 non-events -> kept
    #   bin 3: 8 events, 2 non-events -> dropped (fewer than 5 non-events)
    p = (np.arange(40) + 0.5) / 40
    y = np.zeros(40, dtype=int)
    y[10:13] = 1
    y[20:25] = 1
    y[30:38] = 1
    curve = calibration_curve(y, p, bins=4)
    assert list(curve["patients"]) == [10, 10]
    assert list(curve["events"]) == [0, 5]
    # Bin 2 holds p = (20.5 ... 29.5) / 40, mean 25 / 40; observed 5 / 10.
    assert curve["predicted"].tolist() == pytest.approx([5 / 40, 25 / 40])
    assert curve["observed"].tolist() == pytest.approx([0.0, 0.5])


def test_calibration_curve_drops_bins_with_fewer_than_5_patients():
    # 24 patients in 6 quantile bins -> 4 per bin: all under MIN_CELL, nothing may be shown.
    p = (np.arange(24) + 0.5) / 24
    y = np.tile([0, 1], 12)
    assert calibration_curve(y, p, bins=6).empty
    # Same data in 3 bins of 8 patients with 4 events each: also all dropped (4 events < 5).
    assert calibration_curve(y, p, bins=3).empty
    # 2 bins of 12 with 6 events and 6 non-events each: both shown.
    curve = calibration_curve(y, p, bins=2)
    assert list(curve["patients"]) == [12, 12] and list(curve["events"]) == [6, 6]
    assert (curve[["patients", "events"]] >= MIN_CELL).all().all()


def test_calibration_curve_boundaries_at_min_cell():
    # Exactly MIN_CELL (5) patients, events or non-events is shown; 4 is not.
    # 4 quantile bins of 5 patients each (20 distinct probabilities, sorted):
    #   bin 0: 0 events            -> kept (5 patients, 0 events, 5 non-events)
    #   bin 1: 5 events            -> kept (0 non-events)
    #   bin 2: 4 events, 1 non-ev. -> dropped
    #   bin 3: 5 events            -> kept
    p = (np.arange(20) + 0.5) / 20
    y = np.r_[np.zeros(5), np.ones(5), [1, 1, 1, 1, 0], np.ones(5)].astype(int)
    curve = calibration_curve(y, p, bins=4)
    assert list(curve["patients"]) == [5, 5, 5]
    assert list(curve["events"]) == [0, 5, 5]
    # 8 bins of 10: events 4 (dropped) vs 5 (kept), non-events 4 (dropped) vs 5 (kept).
    p = (np.arange(40) + 0.5) / 40
    y = np.zeros(40, dtype=int)
    y[0:4] = 1     # bin 0: 4 events, 6 non-events -> dropped
    y[10:15] = 1   # bin 1: 5 events, 5 non-events -> kept
    y[20:26] = 1   # bin 2: 6 events, 4 non-events -> dropped
    curve = calibration_curve(y, p, bins=4)
    assert list(curve["events"]) == [5, 0]


# --------------------------------------------------------------------------- decision curve

def test_net_benefit_by_hand():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.05, 0.1, 0.15, 0.6, 0.4])
    curve = net_benefit(y, p, np.array([0.2, 0.5]))
    # t = 0.2, odds 0.25: flagged (p >= t) are patients 0, 2, 3, 4, 8, 9 -> TP 3 (0, 4, 9), FP 3.
    #   model     = 3/10 - 3/10 * 0.25 = 0.225
    #   treat all = prevalence 0.4 - 0.6 * 0.25 = 0.25
    # t = 0.5, odds 1: flagged 0, 2, 8 -> TP 1, FP 2: model = 0.1 - 0.2 = -0.1; treat all = 0.4 - 0.6 = -0.2
    assert curve["threshold"].tolist() == [0.2, 0.5]
    assert curve["model"].tolist() == pytest.approx([0.225, -0.1], abs=1e-12)
    assert curve["treat_all"].tolist() == pytest.approx([0.25, -0.2], abs=1e-12)
    assert (curve["treat_none"] == 0).all()


def test_treat_all_formula_and_model_flagging_everybody():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 300)
    prevalence = y.mean()
    t = np.linspace(0.05, 0.6, 12)
    curve = net_benefit(y, np.full(300, 0.99), t)
    expected = prevalence - (1 - prevalence) * t / (1 - t)
    assert curve["treat_all"].to_numpy() == pytest.approx(expected, abs=1e-12)
    # A model that flags everybody *is* treat-all.
    assert curve["model"].to_numpy() == pytest.approx(expected, abs=1e-12)
    # A model that flags nobody is treat-none.
    assert net_benefit(y, np.full(300, 0.01), t)["model"].to_numpy() == pytest.approx(0.0, abs=1e-12)
    assert (curve["treat_none"] == 0).all()


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_indices_plain_shape_and_range():
    index = bootstrap_indices(50, 200, np.random.default_rng(0))
    assert index.shape == (200, 50)
    assert index.min() >= 0 and index.max() < 50
    assert len(np.unique(index)) == 50  # 10,000 draws cover every row


def test_stratified_bootstrap_keeps_class_counts():
    rng = np.random.default_rng(1)
    y = (rng.random(137) < 0.23).astype(int)
    index = bootstrap_indices(len(y), 500, np.random.default_rng(2), strata=y)
    assert index.shape == (500, 137)
    assert (y[index].sum(axis=1) == y.sum()).all()
    # It is still a resample: rows differ and draw repeats.
    assert len({tuple(row) for row in index}) == 500
    # Every patient of each class can be drawn, and only into its own class.
    assert set(index.ravel()) == set(range(len(y)))
    assert all(len(np.unique(row)) < len(y) for row in index[:20])


def test_stratified_bootstrap_with_three_strata():
    strata = np.repeat(np.array(["a", "b", "c"]), [7, 20, 5])[np.random.default_rng(3).permutation(32)]
    index = bootstrap_indices(32, 100, np.random.default_rng(4), strata=strata)
    for value, count in zip(*np.unique(strata, return_counts=True)):
        assert ((strata[index] == value).sum(axis=1) == count).all()


def test_bootstrap_metric_is_reproducible_and_brackets_the_estimate():
    y, s = _random_case(12, 200, False)
    a = bootstrap_metric(auroc, y, s, 200, np.random.default_rng(5))
    b = bootstrap_metric(auroc, y, s, 200, np.random.default_rng(5))
    assert a == b
    assert isinstance(a, Estimate)
    assert a.value == pytest.approx(roc_auc_score(y, s))
    assert a.lower < a.value < a.upper
    assert a.as_dict(3) == {"value": round(a.value, 3), "lower": round(a.lower, 3), "upper": round(a.upper, 3)}


def test_bootstrap_metric_resamples_within_classes():
    y, s = _random_case(13, 90, False)
    seen = []

    def metric(labels, scores):
        seen.append(np.asarray(labels).sum(axis=-1))
        return auroc(labels, scores)

    bootstrap_metric(metric, y, s, 300, np.random.default_rng(6))
    rows = seen[0]
    assert rows.shape == (300,)
    assert (rows == y.sum()).all(), "bootstrap_metric must resample within outcome classes (stratified)"


def test_bootstrap_metric_is_the_percentile_interval():
    # Rebuild the resamples from the same seed with bootstrap_indices and take the 2.5th and
    # 97.5th percentiles of AUROC computed by scipy's ranks; a 90% or basic interval would differ.
    y, s = _random_case(14, 300, True)
    got = bootstrap_metric(auroc, y, s, 1000, np.random.default_rng(7))
    index = bootstrap_indices(len(y), 1000, np.random.default_rng(7), strata=y)
    replicates = roc_auc_score_rows(y[index], s[index])
    assert [got.lower, got.upper] == pytest.approx(np.quantile(replicates, [0.025, 0.975]), abs=1e-12)
    got90 = bootstrap_metric(auroc, y, s, 1000, np.random.default_rng(7), level=0.90)
    assert [got90.lower, got90.upper] == pytest.approx(np.quantile(replicates, [0.05, 0.95]), abs=1e-12)


def test_bootstrap_ci_of_auroc_covers_the_truth_about_95_percent():
    # Binormal model: positives ~ N(d, 1), negatives ~ N(0, 1): true AUC = Phi(d / sqrt 2).
    # 200 data sets with 100 events and 200 non-events, 300 stratified resamples each.
    # If the coverage were exactly 0.95, the count of covering intervals is Binomial(200, 0.95):
    # sd = sqrt(200 * 0.95 * 0.05) = 3.1, so 176-198 (0.88-0.99) is about -4.5 to +2.6 sd;
    # the percentile bootstrap also runs a little narrow at this n, hence the wider lower side.
    d = 1.0
    true_auc = stats.norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(20240501)
    y = np.r_[np.ones(100, dtype=int), np.zeros(200, dtype=int)]
    covered = 0
    for _ in range(200):
        s = np.r_[rng.normal(d, 1, 100), rng.normal(0, 1, 200)]
        ci = bootstrap_metric(auroc, y, s, 300, rng)
        covered += ci.lower <= true_auc <= ci.upper
    assert 0.88 <= covered / 200 <= 0.99, f"coverage {covered / 200:.3f}"


# --------------------------------------------------------------------------- DeLong

def _delong_brute_force(y, a, b):
    """DeLong, DeLong and Clarke-Pearson (1988) from the pairwise kernel psi, O(m n)."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    cov = np.cov(np.vstack(v10)) / m + np.cov(np.vstack(v01)) / n
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (aucs[0] - aucs[1]) / se
    return aucs, se, z, 2 * stats.norm.sf(abs(z))


def test_delong_identical_scores():
    y, s = _random_case(21, 120, True)
    result = delong_test(y, s, s.copy())
    assert result["difference"] == 0.0
    assert result["p_value"] == 1.0
    assert result["z"] == 0.0
    assert result["lower"] == result["upper"] == 0.0
    assert result["auroc_a"] == result["auroc_b"] == pytest.approx(roc_auc_score(y, s))


def test_delong_monotone_transform_is_no_difference():
    # A strictly increasing transform preserves all ranks, hence both AUROCs and every component.
    y, s = _random_case(22, 150, False)
    result = delong_test(y, s, np.exp(2 * s) + 3)
    assert result["difference"] == pytest.approx(0.0, abs=1e-12)
    assert result["p_value"] == pytest.approx(1.0)


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_sklearn_and_brute_force(ties):
    rng = np.random.default_rng(31 + ties)
    y = rng.integers(0, 2, 180)
    a = rng.normal(size=180) + 1.0 * y
    b = 0.6 * a + rng.normal(size=180) + 0.3 * y  # correlated with a
    if ties:
        a, b = np.round(a, 0), np.round(b, 0)
    result = delong_test(y, a, b)
    assert result["auroc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result["auroc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result["difference"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    _, se, z, p = _delong_brute_force(y, a, b)
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert result["p_value"] == pytest.approx(p, rel=1e-9)
    assert (result["upper"] - result["lower"]) / 2 == pytest.approx(stats.norm.ppf(0.975) * se, rel=1e-9)


def test_delong_se_agrees_with_paired_bootstrap():
    rng = np.random.default_rng(41)
    n = 800
    y = (rng.random(n) < 0.3).astype(int)
    a = rng.normal(size=n) + 1.2 * y
    b = 0.5 * a + rng.normal(size=n) + 0.4 * y
    result = delong_test(y, a, b)
    se = (result["upper"] - result["lower"]) / (2 * stats.norm.ppf(0.975))
    # Paired stratified bootstrap: the same resampled patients score both models.
    index = bootstrap_indices(n, 2000, np.random.default_rng(42), strata=y)
    yb = y[index]
    difference = roc_auc_score_rows(yb, a[index]) - roc_auc_score_rows(yb, b[index])
    # (spot-check the helper against scikit-learn on one row)
    assert roc_auc_score_rows(yb[:1], a[index][:1])[0] == pytest.approx(roc_auc_score(yb[0], a[index][0]))
    assert se == pytest.approx(np.std(difference, ddof=1), rel=0.20)


def test_delong_detects_a_clearly_better_model():
    rng = np.random.default_rng(51)
    n = 2000
    y = (rng.random(n) < 0.25).astype(int)
    good = rng.normal(size=n) + 1.5 * y
    weak = 0.3 * good + rng.normal(size=n)  # shares some signal, AUROC ~ 0.6
    result = delong_test(y, good, weak)
    assert result["difference"] > 0.1
    assert result["p_value"] < 0.01
    assert result["lower"] > 0
    # and symmetric when the order is swapped
    swapped = delong_test(y, weak, good)
    assert swapped["difference"] == pytest.approx(-result["difference"])
    assert swapped["p_value"] == pytest.approx(result["p_value"])


def test_delong_under_the_null_is_not_significant_too_often():
    # Two exchangeable models of equal AUROC: about 5% of p-values below 0.05.
    # 100 data sets: Binomial(100, 0.05) has sd 2.2, so at most 13 rejections is > +3.5 sd.
    rng = np.random.default_rng(61)
    rejections = 0
    for _ in range(100):
        y = (rng.random(200) < 0.4).astype(int)
        shared = rng.normal(size=200) + 0.8 * y
        a, b = shared + rng.normal(size=200), shared + rng.normal(size=200)
        rejections += delong_test(y, a, b)["p_value"] < 0.05
    assert rejections <= 13


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="at least two"):
        delong_test(np.array([1, 0, 0, 0, 0]), np.arange(5.0), np.arange(5.0)[::-1])


# --------------------------------------------------------------------------- evaluate()

CALIBRATION_KEYS = {"brier", "calibration_slope", "calibration_intercept", "ece"}


def test_evaluate_probabilities():
    rng = np.random.default_rng(71)
    lp = rng.normal(-1, 1, 400)
    y = (rng.random(400) < _sigmoid(lp)).astype(int)
    p = _sigmoid(lp)
    result = evaluate(y, p, 200, np.random.default_rng(72))
    assert set(result) == {"auroc", "auprc", "patients", "events"} | CALIBRATION_KEYS
    assert result["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=5e-5)  # rounded to 4 digits
    assert result["auprc"]["value"] == pytest.approx(average_precision_score(y, p), abs=5e-5)
    for key in ("auroc", "auprc"):
        assert result[key]["lower"] <= result[key]["value"] <= result[key]["upper"]
    assert result["patients"] == 400 and result["events"] == int(y.sum())
    assert result["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=5e-5)


def test_evaluate_non_probability_scores_omit_calibration():
    rng = np.random.default_rng(73)
    y = rng.integers(0, 2, 300)
    lace = rng.integers(0, 19, 300) + 3 * y  # an integer index, not a probability
    result = evaluate(y, lace, 100, np.random.default_rng(74), is_probability=False)
    assert set(result) == {"auroc", "auprc", "patients", "events"}
    assert not CALIBRATION_KEYS & set(result)
    assert result["auroc"]["value"] == pytest.approx(roc_auc_score(y, lace), abs=5e-5)


# --------------------------------------------------------------------------- subgroups

def test_subgroup_auroc():
    rng = np.random.default_rng(81)
    sizes = {"young": 120, "old": 150, "rare": 60, "all_sick": 40}
    groups = np.repeat(list(sizes), list(sizes.values()))
    y = (rng.random(groups.size) < 0.4).astype(int)
    y[groups == "rare"] = 0
    y[np.flatnonzero(groups == "rare")[:3]] = 1          # 3 events < 5: not estimated
    y[groups == "all_sick"] = 1
    y[np.flatnonzero(groups == "all_sick")[:4]] = 0      # 4 non-events < 5: not estimated
    s = rng.normal(size=groups.size) + y
    order = rng.permutation(groups.size)                  # shuffle rows; give the Series a foreign index
    y, s, groups = y[order], s[order], groups[order]
    series = pd.Series(groups, index=np.arange(groups.size)[::-1] + 1000)
    table = subgroup_auroc(y, s, series).set_index("group")
    assert sorted(table.index) == sorted(sizes)
    for name in ("rare", "all_sick"):
        assert np.isnan(table.loc[name, "auroc"]), name
        assert np.isnan(table.loc[name, "patients"]), name
    for name in ("young", "old"):
        mask = groups == name
        assert table.loc[name, "auroc"] == pytest.approx(roc_auc_score(y[mask], s[mask]), abs=1e-12)
        assert table.loc[name, "patients"] == sizes[name]


def test_recalibration_recovers_a_planted_miscalibration_and_keeps_the_ranking():
    from fl.evaluate import calibration_slope_intercept, recalibrated, recalibration

    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.4, 1.0, 20_000)
    labels = rng.random(true_logit.size) < 1 / (1 + np.exp(-true_logit))
    # A model that is too confident (logit x2) and too pessimistic (+1): planted miscalibration.
    model = 1 / (1 + np.exp(-(2 * true_logit + 1)))
    intercept, slope = recalibration(labels[:10_000], model[:10_000])
    assert slope == pytest.approx(0.5, abs=0.05) and intercept == pytest.approx(-0.5, abs=0.1)
    fixed = recalibrated(model[10_000:], intercept, slope)
    slope_after, intercept_after = calibration_slope_intercept(labels[10_000:], fixed)
    assert slope_after == pytest.approx(1.0, abs=0.06) and abs(intercept_after) < 0.06
    slope_before, _ = calibration_slope_intercept(labels[10_000:], model[10_000:])
    assert slope_before < 0.6
    assert np.array_equal(np.argsort(fixed, kind="stable"), np.argsort(model[10_000:], kind="stable"))
