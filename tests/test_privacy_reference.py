"""Batched reference models re-run the federated pipeline exactly, many models at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.data import FeatureStatistics, PreprocessingSpec, load_site
from fl.federated import fedavg_plain, initial_weights, predict
from fl.privacy.reference import SiteTensors, member_statistics, membership_masks, train_federated
from fl.train import TrainConfig
from synthetic_sites import build_sites

ROUNDS, EPOCHS, LR, WD = 4, 3, 0.05, 1e-4


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    folders = build_sites(tmp_path_factory.mktemp("build"), {"halland": 600, "sahlgrenska": 900}, seed=8)
    return {site: load_site(folder, "all") for site, folder in folders.items()}


def _plain_model(sites, members):
    """The target pipeline (fl.federated) on the given member rows of each site."""
    chosen = {s: (d.features.loc[members[s]], d.labels[members[s]]) for s, d in sites.items()}
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([f for f, _ in chosen.values()]))
    start = initial_weights("logistic", spec.n_outputs, (), seed=3)
    data = {s: (spec.transform(f), y) for s, (f, y) in chosen.items()}
    weights, _ = fedavg_plain("logistic", (), start, data, ROUNDS, TrainConfig(epochs=EPOCHS, learning_rate=LR,
                              weight_decay=WD, patience=None), seed=0)
    return spec, weights, start


def test_each_batched_model_equals_its_own_federated_run(sites):
    rng = np.random.default_rng(0)
    masks = membership_masks({s: len(d) for s, d in sites.items()}, 4, rng)
    tensors = {s: SiteTensors.of(d.features, d.labels) for s, d in sites.items()}
    _, _, start = _plain_model(sites, {s: masks[s][0].numpy() for s in sites})
    batched = train_federated(tensors, masks, ROUNDS, EPOCHS, LR, WD, (start[0], start[1]))
    for m in range(4):
        spec, weights, _ = _plain_model(sites, {s: masks[s][m].numpy() for s in sites})
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
