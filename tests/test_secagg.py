"""Secure aggregation with Flower's SecAgg+: the aggregate, what the server receives, the other hospital, the cost."""
from __future__ import annotations

import numpy as np
import pytest

from compendium.params import PARAMS_DIR, ParamsError, load_params
from data_synth.cohort import CohortSpec, write_cohort
from data_synth.generator import generate_site
from data_synth.sites import site_profile
from fl.data import load_site, site_dir
from fl.federated import local_update, round_seed
from fl.flower import secagg as fsa
from fl.flower.engine import run_direct
from fl.flower.server_app import local_train_config
from fl.privacy import secagg
from synthetic_sites import build_sites

SITES = {"halland": 400, "sahlgrenska": 700}
ROUNDS = 2


def _profile(sites: dict[str, dict] | None = None):
    smoke = load_params(PARAMS_DIR / "smoke.yaml")
    update = {"federated": smoke.federated.model_copy(update={"rounds": ROUNDS, "local_epochs": 2}),
              "privacy": smoke.privacy.model_copy(update={"secagg_rounds": ROUNDS})}
    if sites is not None:
        update["synthetic"] = smoke.synthetic.model_validate({"sites": sites})
    return smoke.model_copy(update=update)


def _federate(root, profile):
    """Run stage 3's FedAvg (the source of the federated standardisation) into root, as the pipeline lays it out."""
    run_direct(profile, "fedavg", [site_dir(root, s) for s in profile.sites],
               root / "03_federated_training" / "fedavg")


@pytest.fixture(scope="module")
def profile():
    return _profile()


@pytest.fixture(scope="module")
def build(tmp_path_factory, profile):
    root = tmp_path_factory.mktemp("build")
    build_sites(root, SITES, seed=13)
    _federate(root, profile)
    return root


@pytest.fixture(scope="module")
def measured(build, profile):
    return secagg.measure(profile, build)


def _round_one_updates(build, profile, spec):
    """Return each site's round-1 local model and size, computed here from the pilot's training functions."""
    plan = fsa.federation_plan(profile, spec, {s: 1 for s in SITES}, 1)
    out = {}
    for site in SITES:
        data = load_site(site_dir(build, site), "train")
        result = local_update("logistic", (), plan.initial, spec.transform(data.features), data.labels,
                              local_train_config(profile), round_seed(profile.seed, site, 1))
        out[site] = ([w.astype(np.float64) for w in result.weights], result.num_examples)
    return out


def _spec(build, profile):
    from fl.baselines import shared_schema, site_splits
    from fl.flower.stage import load_result

    schema = shared_schema(site_splits(build, profile.sites, "train"))
    return load_result(build / "03_federated_training" / "fedavg", "fedavg", schema).spec


def test_secagg_aggregate_equals_fedavg_of_the_same_updates_within_quantisation(build, profile, measured):
    updates = _round_one_updates(build, profile, _spec(build, profile))
    total = sum(n for _, n in updates.values())
    by_hand = [sum(w[i] * n for w, n in updates.values()) / total for i in range(2)]
    step = measured.quantisation_step
    assert step == pytest.approx(2 * 8.0 / 2**22)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(measured.secure.aggregates[1], by_hand))
    # Each site's weighted weights are rounded (stochastically) to one step at most; two sites, two steps.
    assert 0 < difference <= len(SITES) * step
    assert all(0 < e <= len(SITES) * step for e in measured.aggregate_error.values())
    # The training moved the model by far more than the quantisation: the comparison is not trivial.
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(by_hand, measured.secure.sent[1]))
    assert moved > 1000 * step


def test_the_server_receives_masked_vectors_not_the_updates(build, profile, measured):
    settings = measured.settings
    updates = _round_one_updates(build, profile, _spec(build, profile))
    total = sum(n for _, n in updates.values())
    for site, (weights, rows) in updates.items():
        upload = measured.secure.uploads[1][site]
        assert all(a.dtype == np.int64 for a in upload)
        assert all(0 <= a.min() and a.max() < settings.modulus_range for a in upload)
        # Without masks the upload would be the quantised weighted weights, to within one level.
        levels = [(np.clip(w * rows / total, -settings.clipping_range, settings.clipping_range)
                   + settings.clipping_range) * settings.quantization_range / (2 * settings.clipping_range)
                  for w in weights]
        gaps = np.concatenate([np.abs(u - q).ravel() for u, q in zip(upload[1:], levels)])
        assert np.mean(gaps <= 1) == 0.0
        assert np.median(gaps) > settings.modulus_range / 10  # spread over the whole modulus, as masks are
        # The plain run's server receives each site's model itself.
        for plain, true in zip(measured.plain.uploads[1][site], weights):
            np.testing.assert_array_equal(plain, true)
    assert measured.plain_upload_error == 0.0
    assert measured.masked_uncorrelated()
    assert all(abs(r) < 0.5 for r in measured.masked_correlation.values())


def test_two_hospitals_recover_each_other_from_the_secagg_aggregate(build, profile, measured):
    updates = _round_one_updates(build, profile, _spec(build, profile))
    (a, (wa, na)), (b, (wb, nb)) = sorted(updates.items())
    aggregate = measured.secure.aggregates[1]
    recovered_b = [(g * (na + nb) - w * na) / nb for g, w in zip(aggregate, wa)]  # hospital a's subtraction
    error = max(float(np.max(np.abs(r - t))) for r, t in zip(recovered_b, wb))
    step = measured.quantisation_step
    assert error <= (na + nb) / nb * len(SITES) * step
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(wa, wb)) > 1000 * step  # the sites' models differ
    assert measured.partner_error <= (na + nb) / min(na, nb) * len(SITES) * step
    entry = measured.summary()["position_d"]
    assert entry["applicable"] is True
    assert entry["partner_recovery_max_abs_error"] == pytest.approx(measured.partner_error, rel=1e-2)


def test_summary_repeats_run_to_run_while_the_masks_do_not(build, profile, measured):
    again = secagg.measure(profile, build)
    assert again.summary() == measured.summary()
    for a, b in zip(again.secure.aggregates[ROUNDS], measured.secure.aggregates[ROUNDS]):
        np.testing.assert_array_equal(a, b)  # the masks cancel exactly; the rounding is seeded
    site = next(iter(SITES))
    assert not np.array_equal(again.secure.uploads[1][site][1], measured.secure.uploads[1][site][1])
    summary = measured.summary()
    assert summary["mechanism"] == "Flower SecAgg+ (SecAggPlusWorkflow + secaggplus_mod)"
    assert summary["num_shares"] == summary["reconstruction_threshold"] == len(SITES)
    cost = summary["cost"]
    assert cost["messages_per_round"] == {"plain": 2 * len(SITES), "secagg": 8 * len(SITES)}  # four stages
    assert cost["bytes_per_round"]["secagg"] > cost["bytes_per_round"]["plain"] and cost["bytes_ratio"] > 1
    assert summary["protects"] and summary["does_not_protect"]


def test_three_hospitals_subtracting_their_own_get_only_the_others_average(tmp_path):
    sites = {"halland": 300, "sahlgrenska": 400, "kronoberg": 350}
    templates = {"kronoberg": ("halland", {"site_code": 3})}
    for site, patients in sites.items():
        template, extra = templates.get(site, (None, {}))
        folder = site_dir(tmp_path, site)
        generate_site(site_profile(site, {"patients": patients, **extra}, template), 17, folder, progress=False)
        write_cohort(folder / "omop", folder, CohortSpec(seed=17), site, progress=False)
    profile = _profile({"halland": {"overrides": {"patients": 300}}, "sahlgrenska": {"overrides": {"patients": 400}},
                        "kronoberg": {"template": "halland", "overrides": {"patients": 350, "site_code": 3}}})
    assert profile.sites == tuple(sites)
    _federate(tmp_path, profile)
    measured = secagg.measure(profile, tmp_path, rounds=1)
    step = measured.quantisation_step
    assert measured.partner_error is None
    assert measured.others_average_error <= 3 * len(sites) * step  # the others' average, to quantisation
    assert measured.nearest_single_site > 100 * measured.others_average_error  # but no single hospital's model
    entry = measured.summary()["position_d"]
    assert entry["applicable"] is False and "sum of all the others" in entry["reason"]
    assert measured.summary()["num_shares"] == 3


def test_secagg_rounds_beyond_the_federation_are_rejected(tmp_path):
    import yaml

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["profile"] = "bad"  # a profile is named as its file
    data["privacy"]["secagg_rounds"] = data["federated"]["rounds"] + 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"bad\.yaml: privacy\.secagg_rounds: 9 is more than federated\.rounds") as error:
        load_params(path)
    assert str(error.value).count("\n") == 0  # that, and nothing else, is wrong
    # Left at its default, it is capped at a shorter federation's rounds instead.
    del data["privacy"]["secagg_rounds"]
    data["federated"]["rounds"] = 2
    path.write_text(yaml.safe_dump(data))
    assert load_params(path).privacy.secagg_rounds == 3


def test_weights_beyond_the_clipping_range_fail_clearly(build, profile):
    tight = profile.model_copy(update={"privacy": profile.privacy.model_copy(update={"secagg_clipping_range": 1e-3})})
    with pytest.raises(secagg.SecAggError, match="raise privacy.secagg_clipping_range"):
        secagg.measure(tight, build, rounds=1)


@pytest.mark.integration
def test_flowers_simulation_engine_runs_the_same_protocol_to_the_same_aggregate(build, profile, measured):
    """The same apps in flwr.simulation.run_simulation (Ray): the same unmasked aggregates, masked uploads."""
    on_ray = secagg.measure(profile, build, engine="ray")
    step = on_ray.quantisation_step
    for server_round in range(1, ROUNDS + 1):
        for a, b in zip(on_ray.secure.aggregates[server_round], measured.secure.aggregates[server_round]):
            np.testing.assert_allclose(a, b, rtol=0, atol=step)
    assert on_ray.masked_uncorrelated() and on_ray.summary()["num_shares"] == len(SITES)
    assert on_ray.partner_error <= 2 * measured.partner_error + step
    assert all(a.dtype == np.int64 for upload in on_ray.secure.uploads[1].values() for a in upload)
