"""Batched reference models re-run the federated pipeline exactly, many models at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.data import FeatureStatistics, PreprocessingSpec
from fl.federated import fedavg_plain, initial_weights, predict
from fl.privacy.reference import SiteTensors, member_statistics, membership_masks, train_federated
from fl.train import TrainConfig
from synthetic_sites import load_sites

ROUNDS, EPOCHS, LR, WD = 4, 3, 0.05, 1e-4


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return load_sites(tmp_path_factory.mktemp("build"), {"halland": 600, "sahlgrenska": 900}, seed=8)


def _plain_model(sites, members, optimizer="adam", lr=LR):
    """The target pipeline (fl.federated) on the given member rows of each site."""
    chosen = {s: (d.features.loc[members[s]], d.labels[members[s]]) for s, d in sites.items()}
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([f for f, _ in chosen.values()]))
    start = initial_weights("logistic", spec.n_outputs, (), seed=3)
    data = {s: (spec.transform(f), y) for s, (f, y) in chosen.items()}
    weights, _ = fedavg_plain("logistic", (), start, data, ROUNDS, TrainConfig(epochs=EPOCHS, learning_rate=lr,
                              weight_decay=WD, optimizer=optimizer, patience=None), seed=0)
    return spec, weights, start


@pytest.mark.parametrize("optimizer, lr", [("adam", LR), ("sgd", 1.0)])
def test_each_batched_model_equals_its_own_federated_run(sites, optimizer, lr):
    rng = np.random.default_rng(0)
    masks = membership_masks({s: len(d) for s, d in sites.items()}, 4, rng)
    tensors = {s: SiteTensors.of(d.features, d.labels) for s, d in sites.items()}
    _, _, start = _plain_model(sites, {s: masks[s][0].numpy() for s in sites})
    batched = train_federated(tensors, masks, ROUNDS, EPOCHS, lr, WD, (start[0], start[1]), optimizer)
    for m in range(4):
        spec, weights, _ = _plain_model(sites, {s: masks[s][m].numpy() for s in sites}, optimizer, lr)
        mean, std = member_statistics(tensors, {s: masks[s][m:m + 1] for s in sites})
        np.testing.assert_allclose(mean[0].numpy(), spec.mean, rtol=1e-10)
        for s, data in sites.items():
            expected = predict("logistic", (), weights, spec.transform(data.features))
            got = torch.sigmoid(batched.logits(tensors[s])[:, m]).detach().numpy()
            np.testing.assert_allclose(got, expected, atol=1e-4)


def test_masks_put_every_row_in_half_of_the_models():
    masks = membership_masks({"a": 50, "b": 70}, 8, np.random.default_rng(1))
    assert masks["a"].shape == (8, 50) and masks["b"].shape == (8, 70)
    for mask in masks.values():
        assert torch.all(mask.sum(dim=0) == 4)
    again = membership_masks({"a": 50, "b": 70}, 8, np.random.default_rng(1))
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_batched_dp_sgd_without_noise_equals_opacus_with_clipping(sites):
    """Full-batch DP-SGD with noise 0 and an active clipping norm: the batched models take Opacus's exact steps."""
    from fl.privacy.dp import DPConfig, dp_fedavg
    from fl.privacy.reference import DPSGDRecipe, train_federated_dp

    small = {s: d.take(np.arange(300)) for s, d in sites.items()}
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([d.features for d in small.values()]))
    start = initial_weights("logistic", spec.n_outputs, (), seed=1)
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0, delta=1e-5, learning_rate=0.5,
                      local_epochs=2)
    expected, _ = dp_fedavg({s: (spec.transform(d.features), d.labels) for s, d in small.items()}, start, 3,
                            config, seed=3)
    tensors = {s: SiteTensors.of(d.features, d.labels) for s, d in small.items()}
    masks = {s: torch.ones((2, len(d)), dtype=torch.bool) for s, d in small.items()}
    models = train_federated_dp(tensors, masks, DPSGDRecipe(3, 2, 0.0, 0.5, 1.0, 0.5, (start[0], start[1])),
                                torch.Generator().manual_seed(0))
    for m in range(2):
        got = torch.cat([models.weight[m], models.indicator_weight[m]]).numpy()
        np.testing.assert_allclose(got, expected[0].ravel(), atol=2e-5)
        assert float(models.bias[m]) == pytest.approx(float(expected[1][0]), abs=2e-5)
    # Without clipping the steps differ: the clipping above was active.
    unclipped = train_federated_dp(tensors, masks, DPSGDRecipe(3, 2, 0.0, 1e6, 1.0, 0.5, (start[0], start[1])),
                                   torch.Generator().manual_seed(0))
    assert float((unclipped.weight[0] - models.weight[0]).abs().max()) > 1e-2


def test_membership_attacks_on_dp_federations_respect_the_epsilon_bound(sites):
    from fl.privacy.dp import accounted_epsilon
    from fl.privacy.membership import fpr_label
    from fl.privacy.stage import against_bound
    from fl.privacy.experiment import run
    from fl.privacy.reference import DPSGDRecipe

    from fl.data import MODEL_INPUTS

    start = initial_weights("logistic", MODEL_INPUTS, (), seed=1)
    recipe = DPSGDRecipe(4, 1, 4.0, 1.0, 0.05, 0.5, (start[0], start[1]))
    experiment = run(sites, models=16, targets=4, recipe=recipe, seed=5, population_size=500)
    again = run(sites, models=16, targets=4, recipe=recipe, seed=5, population_size=500)
    np.testing.assert_array_equal(experiment.scores["lira_online"], again.scores["lira_online"])  # seeded noise
    epsilon = max(accounted_epsilon(4.0, 1 / steps, steps * 4, 1e-5) for steps in experiment.trained.dp_steps.values())
    assert 0.1 < epsilon < 2.0
    for attack, result in experiment.results.items():
        check = against_bound(result.tpr_at, epsilon, 1e-5, result.non_members, interval=True)
        for fpr in result.tpr_at:
            assert not check[f"violates_bound_at_{fpr_label(fpr)}"], (attack, fpr, check)
        assert abs(result.auc - 0.5) < 0.05, attack
