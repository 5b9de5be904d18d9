"""Privacy attacks: metric definitions, sanity controls, the accountant, exact reconstruction."""
from __future__ import annotations

import numpy as np
import pytest

from fl.data import MODEL_INPUTS
from fl.federated import initial_weights, weighted_average, LocalResult
from fl.privacy import membership as mi
from fl.privacy.experiment import TrainingRecipe, null_control, run
from fl.privacy.reconstruction import partner_update, reconstruct_record, single_record_gradient
from synthetic_sites import load_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return load_sites(tmp_path_factory.mktemp("build"), {"halland": 700, "sahlgrenska": 1000}, seed=21)


def _start():
    weights = initial_weights("logistic", MODEL_INPUTS, (), seed=1)
    return weights[0], weights[1]


def test_tpr_at_fpr_and_intervals_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    members = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    # FPR 0 allowed: threshold at the top non-member (0.8): only 0.9 is above -> 1 of 4 members.
    assert mi.tpr_at_fpr(scores, members, 0.0) == (0.25, 1, 4)
    # FPR 1/6 allowed: threshold at the second non-member (0.5): 0.9, 0.7, 0.6 -> 3 of 4.
    assert mi.tpr_at_fpr(scores, members, 1 / 6) == (0.75, 3, 4)
    low, high = mi.clopper_pearson(3, 4)
    from scipy.stats import binomtest

    expected = binomtest(3, 4).proportion_ci(method="exact")
    assert (low, high) == pytest.approx((expected.low, expected.high))
    fpr, tpr = mi.roc_curve(scores, members)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_lira_scores_favour_records_the_target_fits_like_its_in_models():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, size=(3, 40))
    members = np.zeros((3, 40), dtype=bool)
    members[:, :20] = True
    reference[:, :20] += 3.0  # IN models are far more confident on each record
    labels = np.ones(3)
    target = np.array([3.0, 0.0, 1.5])  # record 0 looks IN, record 1 looks OUT
    online = mi.lira_scores(target, labels, reference, members, online=True)
    offline = mi.lira_scores(target, labels, reference, members, online=False)
    assert online[0] > online[2] > online[1]
    assert offline[0] > offline[2] > offline[1]


def test_non_members_against_non_members_give_chance(sites):
    experiment = run(sites, models=16, targets=4, recipe=TrainingRecipe(5, 3, 0.05, 1e-4, _start()), seed=2,
                     population_size=500)
    for attack in ("lira_online", "rmia", "loss"):
        result = null_control(experiment, attack, np.random.default_rng(3))
        assert abs(result.auc - 0.5) < 0.03, (attack, result.auc)
    # Pooled trials: every record is tested once per target.
    assert experiment.results["loss"].members + experiment.results["loss"].non_members == 4 * sum(
        len(d) for d in sites.values())


def test_an_overfit_model_is_attacked_successfully(sites):
    """Positive control: 40 patients per site, long training, no weight decay."""
    tiny = {s: d.take(np.arange(40)) for s, d in sites.items()}
    experiment = run(tiny, models=64, targets=32, recipe=TrainingRecipe(10, 100, 0.2, 0.0, _start()), seed=4,
                     population_size=80)
    lira = experiment.results["lira_online"]
    assert lira.auc > 0.7
    assert lira.tpr_at[0.01][1] > 0.03  # the lower CI bound is 3x what chance gives
    assert lira.tpr_at[0.01][0] > experiment.results["loss"].tpr_at[0.01][0]  # LiRA beats the loss baseline


def test_rdp_accountant_reproduces_the_published_reference():
    """Abadi et al. 2016 MNIST setting: n=60,000, batch 256, sigma 1.1, 60 epochs, delta 1e-5."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    sample_rate = 256 / 60_000
    accountant.history = [(1.1, sample_rate, int(60 / sample_rate))]
    epsilon = accountant.get_epsilon(delta=1e-5)
    assert 2.3 < epsilon < 3.2  # Opacus 1.6's RDP accountant gives 2.60 ("about 3" in the literature)


def test_a_single_record_gradient_gives_the_record_back_exactly():
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(1, MODEL_INPUTS)).astype(np.float32), np.array([0.1], dtype=np.float32)]
    record = rng.normal(size=MODEL_INPUTS).astype(np.float32)
    recovered = reconstruct_record(single_record_gradient(weights, record, label=1))
    np.testing.assert_allclose(recovered, record, rtol=1e-4, atol=1e-5)


def test_the_other_hospital_recovers_its_partners_model():
    rng = np.random.default_rng(6)
    own = [rng.normal(size=(1, 5)).astype(np.float32), rng.normal(size=1).astype(np.float32)]
    partner = [rng.normal(size=(1, 5)).astype(np.float32), rng.normal(size=1).astype(np.float32)]
    aggregate = weighted_average([LocalResult(own, 300, 0.0), LocalResult(partner, 700, 0.0)])
    recovered = partner_update(aggregate, own, own_rows=300, partner_rows=700)
    for got, expected in zip(recovered, partner):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dp_sgd_accountant_runs_across_rounds_and_is_deterministic(sites):
    from fl.data import FeatureStatistics, PreprocessingSpec
    from fl.privacy.dp import DPConfig, dp_fedavg, epsilon_bound

    train = {s: d.take(np.arange(300)) for s, d in sites.items()}
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([d.features for d in train.values()]))
    data = {s: (spec.transform(d.features), d.labels) for s, d in train.items()}
    start = initial_weights("logistic", MODEL_INPUTS, (), seed=1)
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, learning_rate=0.5,
                      local_epochs=1)
    one, eps_one = dp_fedavg(data, start, 1, config, seed=3)
    three, eps_three = dp_fedavg(data, start, 3, config, seed=3)
    again, _ = dp_fedavg(data, start, 3, config, seed=3)
    for a, b in zip(three, again):
        np.testing.assert_array_equal(a, b)  # seeded noise and sampling: reproducible
    # The accountant keeps every round's steps: epsilon grows with rounds, as a fresh accountant
    # given the same number of steps at once says.
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(1.0, 0.1, 3 * 10)]
    for site in data:
        assert eps_three[site] > eps_one[site]
        assert eps_three[site] == pytest.approx(reference.get_epsilon(1e-5), rel=0.05)
    assert epsilon_bound(1.0, 1e-5, 0.01) == pytest.approx(np.e * 0.01 + 1e-5)
