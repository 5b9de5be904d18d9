"""The Flower app: equivalence with a plain FedAvg loop, determinism, the ledger, bad sites."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compendium.params import PARAMS_DIR
from fl.data import FEATURE_NAMES, load_site, site_dir
from fl.federated import fedavg_plain, initial_weights
from fl.flower.engine import run_direct
from fl.flower.server_app import FederationError, local_train_config

SITES = {"halland": 500, "sahlgrenska": 800}
SITES_SEED = 5
FEDERATED = {"rounds": 4, "local_epochs": 2}  # over the smoke profile's federated section
# `build`, `profile` and `site_dirs` come from conftest.py, built from the three names above.


def test_flower_fedavg_equals_the_plain_loop(build, profile, site_dirs, tmp_path):
    result = run_direct(profile, "fedavg", site_dirs, tmp_path / "fedavg")
    data = {site: load_site(site_dir(build, site), "train") for site in SITES}
    arrays = {site: (result.spec.transform(d.features), d.labels) for site, d in data.items()}
    kind, hidden = profile.baselines.model, tuple(profile.baselines.mlp_hidden)
    start = initial_weights(kind, result.spec.n_outputs, hidden, profile.seed)
    plain, _ = fedavg_plain(kind, hidden, start, arrays, profile.federated.rounds, local_train_config(profile),
                            profile.seed)
    assert len(plain) == len(result.weights)
    for mine, flower in zip(plain, result.weights):
        np.testing.assert_allclose(mine, flower, rtol=0, atol=1e-6)
    assert not np.allclose(start[0], result.weights[0])  # training moved the weights


def test_federated_statistics_equal_pooled_statistics(build, profile, site_dirs, tmp_path):
    result = run_direct(profile, "fedavg", site_dirs, tmp_path / "fedavg")
    pooled = pd.concat([load_site(site_dir(build, s), "train").features for s in SITES], ignore_index=True)
    from fl.data import FeatureStatistics, PreprocessingSpec

    direct = PreprocessingSpec.from_statistics(FeatureStatistics.of(pooled))
    np.testing.assert_allclose(result.spec.mean, direct.mean, rtol=1e-12)
    np.testing.assert_allclose(result.spec.std, direct.std, rtol=1e-12)
    assert result.site_rows == {s: len(load_site(site_dir(build, s), "train")) for s in SITES}


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_same_seed_same_final_weights(profile, site_dirs, tmp_path, strategy):
    first = run_direct(profile, strategy, site_dirs, tmp_path / "a")
    second = run_direct(profile, strategy, site_dirs, tmp_path / "b")
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a" / "ledger.jsonl").read_text() == (tmp_path / "b" / "ledger.jsonl").read_text()
    rounds = profile.federated.rounds
    assert [row["round"] for row in first.history] == [r for r in range(1, rounds + 1) for _ in SITES]
    assert sorted((tmp_path / "a" / "checkpoints").glob("round_*.npz"))[-1].name == f"round_{rounds:03d}.npz"


def test_strategies_differ(profile, site_dirs, tmp_path):
    weights = {s: run_direct(profile, s, site_dirs, tmp_path / s).weights[0] for s in ("fedavg", "fedprox", "fedadam")}
    assert not np.allclose(weights["fedavg"], weights["fedadam"])
    assert not np.allclose(weights["fedavg"], weights["fedprox"])


def test_no_message_carries_patient_level_values(build, profile, site_dirs, tmp_path):
    run_direct(profile, "fedprox", site_dirs, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    counts = set()
    for site in SITES:
        data = {split: len(load_site(site_dir(build, site), split)) for split in ("train", "test", "all")}
        counts |= set(data.values())
    allowed_strings = set(SITES) | set(FEATURE_NAMES) | {"logistic", "mlp", "adam", "sgd", "feature-statistics"}
    rounds = profile.federated.rounds
    assert {(line["round"], line["direction"], line["site"]) for line in lines} == {
        (r, d, s) for r in range(0, rounds + 1) for d in ("server->site", "site->server") for s in SITES}
    for line in lines:
        assert line["bytes"] > 0 and line["error"] is None
        for record in line["records"]:
            for entry in record["entries"]:
                if record["kind"] == "arrays":
                    assert not set(entry["shape"]) & counts, f"array shaped like a patient count: {line}"
                    assert max(entry["shape"]) <= len(FEATURE_NAMES) + 16
                if isinstance(entry.get("value"), str):
                    assert entry["value"] in allowed_strings, entry
                if isinstance(entry.get("value"), list) and entry["value"] and isinstance(entry["value"][0], str):
                    assert set(entry["value"]) <= allowed_strings
                assert entry.get("length", 0) <= len(FEATURE_NAMES)  # config lists: features or statistics
    # Record kinds per direction are exactly the protocol's.
    kinds = {(l["message_type"], l["direction"]): sorted(r["key"] for r in l["records"]) for l in lines}
    assert kinds[("train", "server->site")] == ["arrays", "config"]
    assert kinds[("train", "site->server")] == ["arrays", "metrics", "site"]
    assert kinds[("evaluate", "site->server")] == ["metrics", "site"]
    assert kinds[("query.statistics", "site->server")] == ["metrics", "site", "statistics"]


def _copy_site(build, site, tmp_path, change):
    target = tmp_path / "sites" / site
    target.mkdir(parents=True)
    frame = pd.read_parquet(site_dir(build, site) / "cohort.parquet")
    pq.write_table(pa.Table.from_pandas(change(frame), preserve_index=False), target / "cohort.parquet")
    return target


def test_a_site_without_training_data_stops_the_run_naming_it(build, profile, tmp_path):
    empty = _copy_site(build, "halland", tmp_path, lambda f: f.assign(split="test"))
    with pytest.raises(FederationError, match="halland.*no train rows"):
        run_direct(profile, "fedavg", [empty, site_dir(build, "sahlgrenska")], tmp_path / "out")
    assert not (tmp_path / "out" / "final_model.npz").exists()


def test_a_site_with_other_columns_stops_the_run_naming_it(build, profile, tmp_path):
    odd = _copy_site(build, "sahlgrenska", tmp_path, lambda f: f.drop(columns=["lvef"]))
    with pytest.raises(FederationError, match=r"sahlgrenska.*missing column\(s\) \['lvef'\]"):
        run_direct(profile, "fedavg", [site_dir(build, "halland"), odd], tmp_path / "out")


def test_a_missing_site_folder_stops_the_run(build, profile, tmp_path):
    with pytest.raises(FederationError, match="does not exist"):
        run_direct(profile, "fedavg", [site_dir(build, "halland"), tmp_path / "nowhere"], tmp_path / "out")


@pytest.mark.integration
def test_flowers_ray_simulation_gives_the_same_model(profile, site_dirs, tmp_path):
    """The same ServerApp and ClientApp in Flower's own (Ray) simulation engine: identical weights."""
    import yaml

    from fl.flower.engine import run_ray
    from fl.flower.stage import load_result

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["federated"].update(rounds=profile.federated.rounds, local_epochs=profile.federated.local_epochs)
    params_file = tmp_path / "smoke.yaml"
    params_file.write_text(yaml.safe_dump(data))
    run_ray(params_file, "fedavg", site_dirs, tmp_path / "ray")
    direct = run_direct(profile, "fedavg", site_dirs, tmp_path / "direct")
    ray = load_result(tmp_path / "ray", "fedavg")
    for a, b in zip(ray.weights, direct.weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    ledger = lambda name: [json.loads(l) for l in (tmp_path / name / "ledger.jsonl").read_text().splitlines()]  # noqa: E731,E741
    strip = lambda lines: [{k: v for k, v in l.items() if k != "bytes"} for l in lines]  # noqa: E731,E741
    assert strip(ledger("ray")) == strip(ledger("direct"))


class _ServerCrash(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_after_a_crash_reaches_the_uninterrupted_model(profile, site_dirs, tmp_path, strategy):
    from fl.flower.engine import DirectGrid, direct_contexts

    class CrashingGrid(DirectGrid):
        """The aggregation server dies when it starts round 3."""

        def push_messages(self, messages):
            messages = list(messages)
            if any(m.content["config"].get("server-round") == 3 for m in messages if "config" in m.content):
                raise _ServerCrash("server process killed")
            return super().push_messages(messages)

    uninterrupted = run_direct(profile, strategy, site_dirs, tmp_path / "whole")
    with pytest.raises(_ServerCrash):
        run_direct(profile, strategy, site_dirs, tmp_path / "crashed", grid=CrashingGrid(direct_contexts(site_dirs)))
    assert not (tmp_path / "crashed" / "final_model.npz").exists()
    assert (tmp_path / "crashed" / "checkpoints" / "round_002.npz").is_file()
    resumed = run_direct(profile, strategy, site_dirs, tmp_path / "crashed", resume=True)
    for a, b in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert resumed.history == uninterrupted.history  # rounds 1-2 kept from before the crash


def test_resume_without_checkpoint_starts_from_scratch(profile, site_dirs, tmp_path):
    fresh = run_direct(profile, "fedavg", site_dirs, tmp_path / "a")
    resumed = run_direct(profile, "fedavg", site_dirs, tmp_path / "b", resume=True)
    for a, b in zip(fresh.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)


def test_a_site_silent_in_a_round_stops_the_run_instead_of_averaging_the_rest(profile, site_dirs, tmp_path):
    """FedAvg over whoever answered would be a different model: the run stops naming the round."""
    from fl.flower.engine import DirectGrid, direct_contexts

    class SilentSite(DirectGrid):
        """One site's round-2 training reply never arrives."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if any(m.metadata.message_type == "train" and m.content["config"].get("server-round") == 2
                   for m in messages):
                return replies[:1]
            return replies

    grid = SilentSite(direct_contexts(site_dirs))
    with pytest.raises(FederationError, match=r"round 2 training: 1 of 2 sites replied; round 1 is checkpointed"):
        run_direct(profile, "fedavg", site_dirs, tmp_path / "silent", grid=grid)
    assert not (tmp_path / "silent" / "final_model.npz").exists()


def test_a_node_gone_before_a_round_stops_the_run_after_the_timeout(profile, site_dirs, tmp_path):
    from fl.flower.engine import DirectGrid, direct_contexts

    class LosesANode(DirectGrid):
        """After round 2's evaluation one node disconnects for good."""

        def get_node_ids(self):
            done = sorted((tmp_path / "gone" / "checkpoints").glob("round_*.npz"))
            return list(self.contexts)[:1] if len(done) >= 3 else list(self.contexts)

    quick = profile.model_copy(update={"federated": profile.federated.model_copy(update={"round_timeout_s": 1.0})})
    with pytest.raises(FederationError, match=r"round 3: only 1 of 2 sites connected within 1 s; round 2 is "
                                              r"checkpointed: start every site and run again with resume"):
        run_direct(quick, "fedavg", site_dirs, tmp_path / "gone", grid=LosesANode(direct_contexts(site_dirs)))
