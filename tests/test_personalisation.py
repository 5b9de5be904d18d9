"""Personalisation and federated model selection as Flower apps: what stays at a site, what the selection sees."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fl.data import load_site, site_dir
from fl.evaluate import auroc, record_loss
from fl.federated import initial_weights, personalised, personalised_predict, predict_logits
from fl.flower import engine, selection
from fl.flower.client_app import validation_rows
from fl.flower.engine import run_direct
from fl.flower.server_app import Personalisation
from fl.train import TrainConfig

SITES = {"halland": 700, "sahlgrenska": 1000}
SITES_SEED = 11
FEDERATED = {"rounds": 4, "local_epochs": 2}
PERSONALISE = Personalisation(("finetune", "recalibrate"), finetune_epochs=30, patience=5, validation_fraction=0.2)


def _ledger(folder):
    return [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]


def test_fedper_and_personalisation_keep_every_personal_model_at_its_site(build, profile, site_dirs, tmp_path):
    folder = tmp_path / "fedper"
    result = run_direct(profile, "fedper", site_dirs, folder, personalisation=PERSONALISE)
    counts = {len(load_site(d, split)) for d in site_dirs for split in ("train", "test", "all")}
    lines = _ledger(folder)
    personalise = [line for line in lines if line["message_type"] == "query.personalise"]
    assert len(personalise) == 2 * len(SITES)
    for line in personalise:
        kinds = sorted(r["key"] for r in line["records"])
        # The site sends back counts and its name only: no model, no parameter, no value per patient.
        assert kinds == (["arrays", "config"] if line["direction"] == "server->site" else ["metrics", "site"])
    for line in lines:
        for record in line["records"]:
            if record["kind"] == "arrays":
                assert all(not set(e["shape"]) & counts for e in record["entries"]), line
    # FedPer's head (the intercept) never leaves a site: the server's model still has the initial one.
    start = initial_weights("logistic", result.spec.n_outputs, (), profile.seed)
    np.testing.assert_array_equal(result.weights[-1], start[-1])
    assert not np.allclose(result.weights[0], start[0])  # while the body was trained
    heads = {}
    for directory in site_dirs:
        kept = engine.site_output_dir(folder, directory) / "fedper"
        assert sorted(p.name for p in kept.glob("*.npz")) == ["finetune.npz", "own-head.npz", "recalibrate.npz"]
        own = np.load(kept / "own-head.npz")
        np.testing.assert_array_equal(own["weight_0"], result.weights[0])  # the shared body ...
        heads[directory.name] = float(own["weight_1"][0])  # ... with the site's own intercept
    assert heads["halland"] != heads["sahlgrenska"]  # each site trained its own
    assert all(abs(h - float(start[-1][0])) > 0.05 for h in heads.values())


def test_recalibration_repairs_a_planted_base_rate_error_and_finetuning_lowers_validation_loss(build):
    data = load_site(site_dir(build, "sahlgrenska"), "train")
    from fl.data import FeatureStatistics, PreprocessingSpec

    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of(data.features))
    x, y = spec.transform(data.features), data.labels
    weights = [np.zeros((1, x.shape[1]), np.float32), np.array([2.0], np.float32)]  # predicts 88% for everyone
    weights[0][0, :3] = 0.3
    held = validation_rows(y, 3, "sahlgrenska", 0.2)
    config = TrainConfig(epochs=50, learning_rate=0.05, patience=5)
    models = personalised(["finetune", "recalibrate"], "logistic", (), weights, x, y, held, config, seed=1)
    before = 1 / (1 + np.exp(-predict_logits("logistic", (), weights, x)))
    after = personalised_predict("logistic", (), models["recalibrate"], x)
    assert abs(before.mean() - y.mean()) > 0.5 and abs(after.mean() - y.mean()) < 0.01
    assert auroc(y, after) == pytest.approx(auroc(y, before), abs=1e-9)  # the ranking is untouched
    tuned = [models["finetune"][f"weight_{i}"] for i in range(2)]
    loss = lambda w: float(np.mean(record_loss(predict_logits("logistic", (), w, x[held]), y[held])))  # noqa: E731
    assert loss(tuned) < loss(weights) - 0.5


def _skewed(build, tmp_path, keep_positive: dict[str, float]) -> list:
    """Copy each site with a share of its readmitted patients (train and test alike) dropped: base rates apart."""
    rng = np.random.default_rng(0)
    folders = []
    for site, share in keep_positive.items():
        frame = pd.read_parquet(site_dir(build, site) / "cohort.parquet")
        label = frame["readmitted_30d"].to_numpy().astype(bool)
        keep = ~label | (rng.random(len(frame)) < share)
        if share > 1:  # drop non-readmitted instead, raising the base rate
            keep = label | (rng.random(len(frame)) < 1 / share)
        target = tmp_path / "sites" / site
        target.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(frame.loc[keep], preserve_index=False), target / "cohort.parquet")
        folders.append(target)
    return folders


def test_selection_sees_only_training_rows_and_avoids_a_drifting_optimiser_where_base_rates_differ(
        build, profile, tmp_path):
    folders = _skewed(build, tmp_path, {"halland": 0.2, "sahlgrenska": 5.0})
    rates = [load_site(f, "train").labels.mean() for f in folders]
    assert rates[0] < 0.08 and rates[1] > 0.45
    grid = profile.federated.selection.model_copy(update={"learning_rates": {"adam": [0.05], "sgd": [1.5]},
                                                          "local_epochs": [5]})
    skewed = profile.model_copy(update={"federated": profile.federated.model_copy(
        update={"rounds": 25, "selection": grid})})
    chosen = selection.select(skewed, folders, tmp_path / "selection")
    table = chosen.table
    assert chosen.chosen.optimizer == "sgd", table
    adam, sgd = table.loc["adam_lr0.05_e5_wd0.0001"], table.loc["sgd_lr1.5_e5_wd0.0001"]
    # Both sites pull their local models apart (their base rates differ), with either optimiser ...
    assert adam["final_drift"] > 0.3 and sgd["final_drift"] > 0.3
    # ... but Adam's fixed-size steps, restarted every round, leave the average away from the optimum.
    assert adam["final_validation_loss"] > sgd["final_validation_loss"] + 0.01
    # Every round's evaluation was on the held-out share of each site's training rows, never its test split.
    history = json.loads((tmp_path / "selection" / "sgd_lr1.5_e5_wd0.0001" / "history.json").read_text())
    for folder in folders:
        train = load_site(folder, "train")
        held = int(validation_rows(train.labels, skewed.seed, train.site, grid.validation_fraction).sum())
        assert {row["examples"] for row in history if row["site"] == train.site} == {held}
        assert 0 < held < len(train) and held != len(load_site(folder, "test"))
