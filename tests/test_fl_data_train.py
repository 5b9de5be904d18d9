"""The data door, federated-ready preprocessing statistics, models and training loops."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_synth.cohort import CohortSpec, cohort_table, write_cohort
from data_synth.generator import generate_site
from data_synth.sites import site_profile
from fl.data import (FEATURE_NAMES, CohortError, FeatureStatistics, PreprocessingSpec, load_oracle_risk, load_site,
                     read_cohort)
from fl.models import build_model, get_weights, set_weights
from fl.train import TrainConfig, fit, predict_proba, validation_mask


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site") / "halland"
    generate_site(site_profile("halland", {"patients": 1200}), 4, folder, progress=False)
    write_cohort(folder / "omop", folder, CohortSpec(seed=4), "halland", progress=False)
    return folder


def test_load_site_splits_and_oracle_align(site):
    train, test, everything = (load_site(site, s) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(everything)
    assert list(test.features.columns) == list(FEATURE_NAMES)
    assert set(np.unique(test.labels)) == {0, 1}
    risk = load_oracle_risk(site, "test")
    assert risk.shape == test.labels.shape
    # Readmitted patients have higher true risk: rows line up with labels.
    assert risk[test.labels == 1].mean() > risk[test.labels == 0].mean()


def _corrupt(site, tmp_path, change) -> None:
    frame = pd.read_parquet(site / "cohort.parquet")
    frame = change(frame)
    (tmp_path / "bad").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "bad" / "cohort.parquet")


def test_cohort_missing_column_is_named(site, tmp_path):
    _corrupt(site, tmp_path, lambda f: f.drop(columns=["sodium"]))
    with pytest.raises(CohortError, match=r"missing column\(s\) \['sodium'\]"):
        load_site(tmp_path / "bad", "train")


def test_label_outside_zero_one_is_rejected(site, tmp_path):
    def relabel(frame):
        frame.loc[frame.index[:2], "readmitted_30d"] = 2
        return frame
    _corrupt(site, tmp_path, relabel)
    with pytest.raises(CohortError, match="must be 0 or 1; 2 row"):
        load_site(tmp_path / "bad", "test")


def test_missing_and_corrupted_cohort_files(site, tmp_path):
    with pytest.raises(CohortError, match="does not exist"):
        read_cohort(tmp_path / "nowhere" / "cohort.parquet")
    garbage = tmp_path / "cohort.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CohortError, match="not a readable Parquet file"):
        read_cohort(garbage)
    with pytest.raises(ValueError, match="split must be one of"):
        load_site(site, "validation")


def test_summed_site_statistics_equal_pooled_statistics(site):
    train, test = load_site(site, "train"), load_site(site, "test")
    pooled = FeatureStatistics.of(pd.concat([train.features, test.features], ignore_index=True))
    summed = FeatureStatistics.of(train.features) + FeatureStatistics.of(test.features)
    np.testing.assert_allclose(summed.count, pooled.count)
    np.testing.assert_allclose(summed.total, pooled.total, rtol=1e-12)
    np.testing.assert_allclose(summed.total_squares, pooled.total_squares, rtol=1e-12)
    assert summed.rows == pooled.rows
    of_sites = FeatureStatistics.of_sites([train.features, test.features])
    np.testing.assert_array_equal(of_sites.total_squares, summed.total_squares)
    round_trip = FeatureStatistics.from_arrays(summed.as_arrays())
    np.testing.assert_array_equal(round_trip.total, summed.total)


def test_preprocessing_standardises_with_given_statistics(site):
    train = load_site(site, "train")
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of(train.features))
    x = spec.transform(train.features)
    assert x.dtype == np.float32 and x.shape == (len(train), spec.n_outputs)
    observed = ~np.isnan(train.features["sodium"].to_numpy())
    column = x[:, FEATURE_NAMES.index("sodium")]
    # Independent check: pandas mean/std (population) of the observed values.
    expected = (train.features["sodium"] - train.features["sodium"].mean()) / train.features["sodium"].std(ddof=0)
    np.testing.assert_allclose(column[observed], expected[observed], atol=1e-5)
    assert np.all(column[~observed] == 0)  # mean imputation, after standardising
    indicator = x[:, spec.output_names.index("sodium_missing")]
    np.testing.assert_array_equal(indicator, (~observed).astype(np.float32))
    # NT-proBNP is modelled on the log scale.
    nt = train.features["nt_probnp"].to_numpy()
    present = ~np.isnan(nt)
    log_nt = np.log(nt[present])
    np.testing.assert_allclose(x[present, FEATURE_NAMES.index("nt_probnp")], (log_nt - log_nt.mean()) / log_nt.std(),
                               atol=1e-4)


def test_spec_refuses_a_feature_never_observed():
    frame = pd.DataFrame({name: [1.0, 2.0] for name in FEATURE_NAMES})
    frame["lvef"] = np.nan
    with pytest.raises(ValueError, match="lvef"):
        PreprocessingSpec.from_statistics(FeatureStatistics.of(frame))


def _toy(seed: int = 0, n: int = 400, d: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = np.arange(1, d + 1) / d
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w - 0.5)))).astype(np.int64)
    return x, y


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_same_seed_same_weights_and_other_seed_differs(kind):
    x, y = _toy()
    config = TrainConfig(epochs=30, batch_size=64, learning_rate=0.01)
    runs = []
    for seed in (1, 1, 2):
        model = build_model(kind, x.shape[1], seed=seed)
        fit(model, x, y, config, seed=seed)
        runs.append(get_weights(model))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_logistic_model_recovers_a_logistic_fit():
    from sklearn.linear_model import LogisticRegression as SkLogistic

    x, y = _toy(n=3000)
    model = build_model("logistic", x.shape[1], seed=0)
    fit(model, x, y, TrainConfig(epochs=600, learning_rate=0.05, weight_decay=0.0, patience=None), seed=0)
    reference = SkLogistic(C=np.inf, max_iter=2000).fit(x, y)
    weights = get_weights(model)
    np.testing.assert_allclose(weights[0].ravel(), reference.coef_.ravel(), atol=0.02)
    np.testing.assert_allclose(weights[1], reference.intercept_, atol=0.02)
    np.testing.assert_allclose(predict_proba(model, x), reference.predict_proba(x)[:, 1], atol=0.005)


def test_early_stopping_restores_the_best_epoch():
    x, y = _toy(n=300, d=40)  # many features, few rows: an MLP overfits
    held = validation_mask(y, 0.3, seed=0)
    model = build_model("mlp", x.shape[1], seed=0, hidden=(64,))
    history = fit(model, x[~held], y[~held], TrainConfig(epochs=400, learning_rate=0.01, weight_decay=0, patience=15),
                  seed=0, validation=(x[held], y[held]))
    assert len(history.train_loss) < 400  # stopped early
    assert history.best_epoch == int(np.argmin(history.validation_loss))
    with torch.no_grad():
        final = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.as_tensor(x[held])), torch.as_tensor(y[held], dtype=torch.float32))
    assert float(final) == pytest.approx(min(history.validation_loss), rel=1e-5)


def test_proximal_term_keeps_weights_near_the_reference():
    x, y = _toy()
    free, held = build_model("logistic", x.shape[1], seed=3), build_model("logistic", x.shape[1], seed=3)
    start = [w.copy() for w in get_weights(free)]
    fit(free, x, y, TrainConfig(epochs=50, patience=None), seed=0)
    fit(held, x, y, TrainConfig(epochs=50, patience=None, proximal_mu=5.0), seed=0)
    drift = lambda m: sum(np.sum((a - b) ** 2) for a, b in zip(get_weights(m), start))  # noqa: E731
    assert drift(held) < 0.5 * drift(free)


def test_set_weights_checks_shapes_and_round_trips():
    model = build_model("mlp", 6, seed=0, hidden=(4,))
    weights = get_weights(model)
    other = build_model("mlp", 6, seed=1, hidden=(4,))
    set_weights(other, weights)
    for a, b in zip(get_weights(other), weights):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected shape"):
        set_weights(other, [np.zeros((1, 1))] + weights[1:])
    with pytest.raises(ValueError, match="model kind"):
        build_model("forest", 6, seed=0)


def test_cohort_table_round_trips_dates(site):
    frame = pd.read_parquet(site / "cohort.parquet")
    table = cohort_table(frame.assign(index_admission_date=frame["index_admission_date"]))
    assert table.schema.field("index_admission_date").type == pa.date32()
