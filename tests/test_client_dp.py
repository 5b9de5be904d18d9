"""Client-level DP: Flower's server-side clipping wrapper in the pilot's ServerApp, and its accountant."""
from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fl.data import load_site, site_dir
from fl.federated import initial_weights, local_update, round_seed
from fl.flower.engine import run_direct
from fl.flower.server_app import ClientLevelDP, FederationError, local_train_config
from fl.privacy.client_dp import client_level_epsilon, client_level_frontier, replacement_epsilon

SITES = {"halland": 1500, "sahlgrenska": 2000}
SITES_SEED = 11
FEDERATED = {"rounds": 1, "local_epochs": 2}  # over the smoke profile's federated section
# `build`, `profile` and `site_dirs` come from conftest.py, built from the three names above.


def _clipped_mean_by_hand(build, profile, spec, clipping_norm):
    """Return start + the unweighted mean of each site's update clipped to `clipping_norm` (one round)."""
    start = initial_weights("logistic", spec.n_outputs, (), profile.seed)
    updates = []
    for site in sorted(SITES):
        data = load_site(site_dir(build, site), "train")
        result = local_update("logistic", (), start, spec.transform(data.features), data.labels,
                              local_train_config(profile), round_seed(profile.seed, site, 1))
        update = [w - s for w, s in zip(result.weights, start)]
        norm = np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update))
        updates.append([u * min(1.0, clipping_norm / norm) for u in update])
    return [s + np.mean([u[i] for u in updates], axis=0) for i, s in enumerate(start)]


def test_with_negligible_noise_the_global_model_is_the_mean_of_clipped_updates(build, profile, site_dirs, tmp_path):
    clipping = 0.05  # well below the updates' norms here, so clipping is active
    result = run_direct(profile, "fedavg", site_dirs, tmp_path / "dp", client_dp=ClientLevelDP(1e-9, clipping))
    expected = _clipped_mean_by_hand(build, profile, result.spec, clipping)
    for got, want in zip(result.weights, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_noise_has_the_advertised_scale_and_is_reproducible(build, profile, site_dirs, tmp_path):
    clipping, noise = 0.05, 2.0
    dp = ClientLevelDP(noise, clipping)
    first = run_direct(profile, "fedavg", site_dirs, tmp_path / "a", client_dp=dp)
    again = run_direct(profile, "fedavg", site_dirs, tmp_path / "b", client_dp=dp)
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(a, b)
    expected = _clipped_mean_by_hand(build, profile, first.spec, clipping)
    residual = np.concatenate([(g - w).ravel() for g, w in zip(first.weights, expected)])
    scale = noise * clipping / len(SITES)  # Flower's stdv: z * C / number of sampled clients
    assert 0.5 * scale < residual.std() < 1.6 * scale, (residual.std(), scale)


def test_client_level_dp_wraps_fedavg_only(profile, site_dirs, tmp_path):
    with pytest.raises(FederationError, match="wraps FedAvg only"):
        run_direct(profile, "fedprox", site_dirs, tmp_path / "x", client_dp=ClientLevelDP(1.0, 1.0))


@pytest.mark.parametrize("noise, rounds", [(0.5, 8), (1.0, 8), (4.0, 30)])
def test_epsilon_is_the_composed_gaussian_rdp(noise, rounds):
    """Independent check: T Gaussian mechanisms have RDP T*a/(2 z^2); the classic conversion bounds epsilon."""
    delta = 1e-5
    orders = np.array([a for a in RDPAccountant.DEFAULT_ALPHAS if a > 1])
    classic = float(np.min(rounds * orders / (2 * noise ** 2) + np.log(1 / delta) / (orders - 1)))
    epsilon = client_level_epsilon(noise, rounds, delta)
    assert 0.85 * classic <= epsilon <= classic
    assert client_level_epsilon(2 * noise, rounds, delta) < epsilon < client_level_epsilon(noise, 2 * rounds, delta)


def test_the_frontier_has_a_no_dp_reference_and_loses_utility_with_noise(profile, site_dirs, tmp_path):
    longer = profile.model_copy(update={"federated": profile.federated.model_copy(update={"rounds": 4})})
    frontier = client_level_frontier(longer, site_dirs, tmp_path, [0.5, 8.0], clipping_norm=0.5, delta=1e-5)
    assert list(frontier["noise_multiplier"]) == [0.0, 0.5, 8.0]
    assert np.isinf(frontier["epsilon"].iloc[0]) and frontier["epsilon"].iloc[1] > frontier["epsilon"].iloc[2]
    auroc = frontier[[f"auroc_{s}" for s in SITES]].mean(axis=1)
    assert auroc.iloc[0] > auroc.iloc[2] + 0.05  # heavy noise costs utility


def test_patient_level_dp_sgd_inside_the_clientapp_equals_the_plain_dp_loop(build, profile, site_dirs, tmp_path):
    """DP-SGD in each hospital's ClientApp, accountant kept in the node's state: same model and epsilon as dp_fedavg."""
    from fl.privacy.dp import DPConfig, dp_fedavg

    three = profile.model_copy(update={"federated": profile.federated.model_copy(update={"rounds": 3})})
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, learning_rate=0.5,
                      local_epochs=1)
    result = run_direct(three, "fedavg", site_dirs, tmp_path / "dp", patient_dp=config)
    data = {site: load_site(site_dir(build, site), "train") for site in SITES}
    arrays = {site: (result.spec.transform(d.features), d.labels) for site, d in data.items()}
    start = initial_weights("logistic", result.spec.n_outputs, (), three.seed)
    plain, epsilons = dp_fedavg(arrays, start, 3, config, three.seed)
    for got, want in zip(result.weights, plain):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    last = {row["site"]: row["epsilon"] for row in result.history if row["round"] == 3}
    assert last == pytest.approx(epsilons, rel=1e-12)
    first = {row["site"]: row["epsilon"] for row in result.history if row["round"] == 1}
    assert all(first[site] < last[site] for site in SITES)  # the accountant was not reset between rounds


def test_replacement_of_one_hospital_doubles_the_sensitivity():
    """Replacement moves the clipped sum by 2C: the add/remove epsilon at half the noise (issue 13: 15.9 vs 6.8)."""
    assert replacement_epsilon(4.0, 30, 1e-5) == pytest.approx(client_level_epsilon(2.0, 30, 1e-5), rel=1e-12)
    assert replacement_epsilon(4.0, 30, 1e-5) == pytest.approx(15.85, abs=0.01)
    assert client_level_epsilon(4.0, 30, 1e-5) == pytest.approx(6.81, abs=0.01)


def test_client_level_dp_with_public_scaling_sends_no_statistics(profile, site_dirs, tmp_path):
    """The DP runs' preprocessing is fixed: no statistics round, no counts or sums in any message."""
    import json

    from fl.flower.server_app import LEDGER_FILE
    from fl.privacy.public_scaling import public_spec

    spec = public_spec()
    result = run_direct(profile, "fedavg", site_dirs, tmp_path / "dp", client_dp=ClientLevelDP(1.0, 0.5),
                        preprocessing=spec)
    ledger = [json.loads(line) for line in (tmp_path / "dp" / LEDGER_FILE).read_text().splitlines()]
    assert ledger and not [m for m in ledger if "statistics" in m["message_type"] or m["round"] == 0]
    assert not [r for m in ledger for r in m["records"] if r["key"] == "statistics"]
    assert result.spec.key == spec.key
    frontier = client_level_frontier(profile, site_dirs, tmp_path / "frontier", [4.0], 0.5, 1e-5, spec)
    assert frontier["epsilon_replacement"].iloc[1] > frontier["epsilon"].iloc[1]
