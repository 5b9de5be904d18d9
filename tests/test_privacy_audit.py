"""The empirical DP audit, public scaling for DP runs, bound checks that say when they cannot fail, DP-SGD's steps."""
from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy import stats

from fl.data import SYNTHETIC_SCHEMA, FeatureSchema, FeatureStatistics, PreprocessingSpec
from fl.federated import initial_weights
from fl.privacy import audit
from fl.privacy.dp import DPConfig, dp_local_update
from fl.privacy.public_scaling import PUBLIC_RANGES, public_spec
from fl.privacy.reference import DPSGDRecipe, SiteTensors, train_federated_dp
from fl.privacy.stage import against_bound
from synthetic_sites import load_sites

DELTA = 1e-5
ROUNDS = 4


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    everyone = load_sites(tmp_path_factory.mktemp("build"), {"halland": 500, "sahlgrenska": 500}, seed=13)
    return {s: d.take(np.arange(100)) for s, d in everyone.items()}  # the audit's subsample size


def _recipe(noise: float) -> DPSGDRecipe:
    start = initial_weights("logistic", SYNTHETIC_SCHEMA.n_inputs, (), 3)
    return DPSGDRecipe(ROUNDS, 1, noise, 1.0, 0.05, 0.5, (start[0], start[1]))


# ---------------------------------------------------------------- the lower bound
def test_the_lower_bound_is_the_hypothesis_test_bound_at_clopper_pearson_upper_limits():
    """By hand: FP = 2 of 50, FN = 5 of 50, each rate at its two-sided 95% (one-sided 97.5%) upper limit."""
    fpr_hi = stats.beta.ppf(0.975, 3, 48)
    fnr_hi = stats.beta.ppf(0.975, 6, 45)
    want = max(np.log((1 - DELTA - fnr_hi) / fpr_hi), np.log((1 - DELTA - fpr_hi) / fnr_hi))
    scores_in = np.r_[np.full(5, -1.0), np.full(45, 2.0)]
    scores_out = np.r_[np.full(48, 0.0), np.full(2, 3.0)]
    got = audit.bound_at_thresholds(scores_in, scores_out, np.array([1.0]), DELTA)[0]
    assert got == pytest.approx(want, rel=1e-9)
    # No errors: the ceiling, the most 50 + 50 trials can show.
    assert audit.ceiling(50, 50, DELTA) == pytest.approx(np.log((1 - DELTA - (1 - 0.025 ** (1 / 50)))
                                                                / (1 - 0.025 ** (1 / 50))), rel=1e-9)
    # A test no better than chance shows nothing.
    assert audit.bound_at_thresholds(np.zeros(50), np.zeros(50), np.array([0.0]), DELTA)[0] == 0.0


def test_the_threshold_is_chosen_on_other_federations_than_the_bound_is_computed_on():
    rng = np.random.default_rng(0)
    member = rng.random(400) < 0.5
    scores = rng.normal(size=400) + 3.0 * member
    bound = audit.lower_bound(scores, member, DELTA)
    assert bound.trials_in + bound.trials_out == 200  # the odd half only
    evaluation = np.arange(400) % 2 == 1
    fp = int(np.sum(scores[evaluation & ~member] >= bound.threshold))
    assert (bound.false_positives, bound.trials_out) == (fp, int(np.sum(evaluation & ~member)))
    assert 0 < bound.epsilon_lower < bound.ceiling


@pytest.mark.parametrize("accounted, lower, ceiling, want", [
    (1.0, 2.0, 3.0, audit.VIOLATION), (1.0, 0.2, 3.0, audit.NO_VIOLATION), (9.0, 0.2, 3.0, audit.NOT_TESTABLE),
    (3.0, 0.0, 3.0, audit.NOT_TESTABLE)])
def test_verdicts_say_when_the_audit_cannot_test_an_epsilon(accounted, lower, ceiling, want):
    bound = audit.EpsilonLowerBound(lower, ceiling, 0.0, 0, 0, 10, 10)
    assert audit.verdict(accounted, bound) == want


def test_membership_bound_checks_whose_bound_is_one_are_not_testable():
    # epsilon 9: e^9 * FPR >= 1 at 1% FPR, so no TPR can exceed the bound; epsilon 1: it can.
    tpr_at = {0.01: (0.02, 0.015, 0.025)}
    assert against_bound(tpr_at, 9.0, DELTA, 10_000)["bound_check_at_1pct_fpr"] == audit.NOT_TESTABLE
    assert against_bound(tpr_at, 1.0, DELTA, 10_000)["bound_check_at_1pct_fpr"] == audit.NO_VIOLATION
    leaky = {0.01: (0.9, 0.85, 0.95)}
    assert against_bound(leaky, 1.0, DELTA, 10_000)["bound_check_at_1pct_fpr"] == audit.VIOLATION
    assert against_bound(leaky, float("inf"), DELTA, 10_000)["bound_check_at_1pct_fpr"] == audit.NOT_TESTABLE


# ---------------------------------------------------------------- the audit in DP federations
def test_the_audit_catches_an_accountant_told_more_noise_than_was_added(sites):
    """Planted fault: trained without noise, accounted at noise 4. The honest run at noise 4 is not flagged."""
    spec = public_spec()
    planted = audit.audit(sites, "halland", _recipe(0.0), 128, DELTA, 5, spec, accounted_noise=4.0)
    assert planted.epsilon < planted.bound.ceiling  # the claim is testable ...
    assert planted.verdict == audit.VIOLATION  # ... and refuted
    honest = audit.audit(sites, "halland", _recipe(4.0), 128, DELTA, 5, spec)
    assert honest.epsilon == pytest.approx(planted.epsilon)
    assert honest.verdict == audit.NO_VIOLATION and honest.bound.epsilon_lower < honest.epsilon


def test_round_zero_in_the_clear_is_caught_by_the_audit(sites):
    """With the statistics round, the released means move exactly with the canary: the guarantee does not hold."""
    result = audit.audit(sites, "halland", _recipe(4.0), 64, DELTA, 5, preprocessing=None)
    assert result.score == audit.STATISTICS_SCORE
    assert result.bound.false_positives == result.bound.false_negatives == 0
    assert result.verdict == audit.VIOLATION


def test_the_audit_is_reproducible(sites):
    one = audit.audit(sites, "halland", _recipe(1.0), 32, DELTA, 5, public_spec()).as_dict()
    assert one == audit.audit(sites, "halland", _recipe(1.0), 32, DELTA, 5, public_spec()).as_dict()
    with pytest.raises(ValueError, match="even number"):
        audit.audit(sites, "halland", _recipe(1.0), 33, DELTA, 5, public_spec())


# ---------------------------------------------------------------- public scaling
def test_public_scaling_depends_on_no_data(sites):
    spec = public_spec()
    half = {s: d.take(np.arange(50)) for s, d in sites.items()}
    assert spec.key == public_spec(half["halland"].schema).key  # nothing learned from any site
    federated = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([d.features for d in sites.values()]))
    assert spec.key != federated.key
    age = SYNTHETIC_SCHEMA.features.index("age")
    assert (spec.mean[age], spec.std[age]) == ((PUBLIC_RANGES["age"].low + PUBLIC_RANGES["age"].high) / 2,
                                               (PUBLIC_RANGES["age"].high - PUBLIC_RANGES["age"].low) / 2)
    female = SYNTHETIC_SCHEMA.features.index("female")
    assert (spec.mean[female], spec.std[female]) == (0.5, 0.5)  # {0, 1} -> {-1, 1}
    z = spec.transform(sites["halland"].features)
    assert np.isfinite(z).all()


def test_a_feature_without_a_public_range_is_a_clear_error():
    schema = FeatureSchema(("age", "troponin"), ("numeric", "numeric"))
    with pytest.raises(ValueError, match=r"\['troponin'\].*PUBLIC_RANGES.*dp_preprocessing"):
        public_spec(schema)


def test_batched_dp_federations_use_the_fixed_spec(sites):
    tensors = {s: SiteTensors.of(d.features, d.labels) for s, d in sites.items()}
    import torch

    masks = {s: torch.ones(3, len(d), dtype=torch.bool) for s, d in sites.items()}
    spec = public_spec()
    trained = train_federated_dp(tensors, masks, _recipe(1.0), torch.Generator().manual_seed(0), spec)
    np.testing.assert_array_equal(trained.mean.numpy(), np.broadcast_to(spec.mean, (3, spec.mean.size)))
    np.testing.assert_array_equal(trained.std.numpy(), np.broadcast_to(spec.std, (3, spec.std.size)))


# ---------------------------------------------------------------- DP-SGD: empty batches, noise source
def _tiny():
    features = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    return [np.zeros((1, 3), np.float32), np.zeros(1, np.float32)], features, np.array([0, 1, 0, 1.0])


def test_empty_poisson_batches_take_a_noise_only_step_that_the_accountant_counts():
    """4 patients, batches of 1: rate 1/4, so about a third of the 12 steps draw nobody; all 12 count."""
    weights, features, labels = _tiny()
    accountant = RDPAccountant()
    config = DPConfig(1.0, 1.0, 0.01, DELTA, 0.5, 3)
    dp_local_update(weights, features, labels, config, accountant, seed=3)
    assert accountant.history == [(1.0, 0.25, 12)]


def test_the_noise_source_is_a_setting_seeded_reproduces_os_does_not():
    weights, features, labels = _tiny()
    def run(source):
        config = DPConfig(1.0, 1.0, 0.5, DELTA, 0.5, 1, source)
        return dp_local_update(weights, features, labels, config, RDPAccountant(), seed=3).weights[0]
    np.testing.assert_array_equal(run("seeded"), run("seeded"))
    assert not np.array_equal(run("os"), run("os"))
    with pytest.raises(ValueError, match="noise_source"):
        DPConfig(1.0, 1.0, 0.5, DELTA, 0.5, 1, "urandom")


def test_profiles_reject_unknown_dp_settings(tmp_path):
    import yaml

    from compendium.params import PARAMS_DIR, load_params

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    for key, bad in (("dp_noise_source", "urandom"), ("dp_preprocessing", "minmax"), ("audit_models", 33)):
        path = tmp_path / "smoke.yaml"
        path.write_text(yaml.safe_dump({**data, "privacy": {**data["privacy"], key: bad}}))
        with pytest.raises(Exception, match=key):
            load_params(path)
