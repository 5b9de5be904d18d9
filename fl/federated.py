"""Federated learning maths, without Flower: local updates, aggregation, the plain FedAvg loop.

The Flower ClientApp calls `local_update` and the plain loop below calls the
same function with the same seeds in the same order, so the two must agree
to float precision (a test checks it); the plain loop is also the speed
floor the Flower run is benchmarked against.
"""
from __future__ import annotations

from dataclasses import dataclass

import zlib

import numpy as np

from fl.models import build_model, get_weights, set_weights
from fl.train import TrainConfig, fit

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedper")
#: How a site can personalise the final global model (`personalised`); `own-head` only after FedPer.
PERSONALISATION = ("finetune", "recalibrate", "own-head")


def head_arrays(kind: str) -> int:
    """Return how many of the model's last weight arrays form its head, which FedPer keeps at each site.

    The logistic model's head is its intercept (a site's own base rate on the shared log-odds scale);
    the MLP's is its output layer (weight and bias).
    """
    return 1 if kind == "logistic" else 2


def round_seed(seed: int, site: str, server_round: int) -> int:
    """Return the seed of one site's local training in one round (a site knows only its own name)."""
    return int(np.random.SeedSequence([seed, 7, zlib.crc32(site.encode()), server_round]).generate_state(1)[0])


@dataclass(frozen=True)
class LocalResult:
    """What a site sends back after a round: new weights, its example count, its training loss."""

    weights: list[np.ndarray]
    num_examples: int
    train_loss: float


def local_update(kind: str, hidden: tuple[int, ...], weights: list[np.ndarray], features: np.ndarray,
                 labels: np.ndarray, config: TrainConfig, seed: int) -> LocalResult:
    """Return the weights after `config.epochs` local epochs starting from the global `weights`."""
    model = build_model(kind, features.shape[1], seed=None, hidden=hidden)
    set_weights(model, weights)
    reference = [parameter.detach().clone() for parameter in model.parameters()] if config.proximal_mu > 0 else None
    history = fit(model, features, labels, config, seed=seed, reference=reference)
    return LocalResult(get_weights(model), int(len(labels)), float(history.train_loss[-1]))


def personalised(methods: list[str], kind: str, hidden: tuple[int, ...], weights: list[np.ndarray],
                 features: np.ndarray, labels: np.ndarray, held: np.ndarray, finetune: TrainConfig, seed: int,
                 own_head: list[np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Return a site's personalised versions of the global `weights`, as arrays to keep at the site.

    - `finetune`: training continues on the site's rows, stopped early on the held-out rows `held`
      (`finetune.patience` epochs without a lower validation loss; the best epoch's weights);
    - `recalibrate`: the global model plus an intercept and slope for its log-odds, fitted on all the
      site's training rows (ranking unchanged: only calibration moves);
    - `own-head`: after FedPer, the global body with the head the site kept (`weights` must already
      carry it, `own_head` is that head).
    Read them back with `personalised_predict`.
    """
    from fl.evaluate import recalibration

    unknown = sorted(set(methods) - set(PERSONALISATION))
    if unknown:
        raise ValueError(f"unknown personalisation {unknown}; choose from {list(PERSONALISATION)}")
    out = {}
    for method in methods:
        if method == "finetune":
            model = build_model(kind, features.shape[1], seed=None, hidden=hidden)
            set_weights(model, weights)
            fit(model, features[~held], labels[~held], finetune, seed=seed, validation=(features[held], labels[held]))
            arrays = get_weights(model)
            extra = {}
        elif method == "recalibrate":
            if labels.min() == labels.max():
                continue  # one outcome class: no slope to fit; the site keeps the global model
            arrays = weights
            intercept, slope = recalibration(labels, predict(kind, hidden, weights, features))
            extra = {"recalibration": np.array([intercept, slope])}
        else:
            if own_head is None:
                raise ValueError("own-head personalisation needs the head this site kept in FedPer training")
            arrays, extra = weights, {}
        out[method] = {**{f"weight_{i}": np.asarray(w) for i, w in enumerate(arrays)}, **extra}
    return out


def personalised_predict(kind: str, hidden: tuple[int, ...], saved, features: np.ndarray) -> np.ndarray:
    """Return the predicted probabilities of a personalised model saved by `personalised`."""
    weights = [np.asarray(saved[f"weight_{i}"]) for i in range(sum(k.startswith("weight_") for k in saved))]
    probabilities = predict(kind, hidden, weights, features)
    if "recalibration" in saved:
        from fl.evaluate import recalibrated

        intercept, slope = (float(v) for v in saved["recalibration"])
        probabilities = recalibrated(probabilities, intercept, slope)
    return probabilities


def drift(site_weights: list[np.ndarray], global_weights: list[np.ndarray]) -> float:
    """Return the L2 distance between a site's returned model and the new global model (all arrays)."""
    return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                             for a, b in zip(site_weights, global_weights))))


def weights_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Return the largest absolute difference between two models' weight arrays (compared in float64)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def weighted_average(results: list[LocalResult]) -> list[np.ndarray]:
    """Return the example-weighted average of the sites' weights (FedAvg aggregation).

    The arithmetic mirrors Flower's `aggregate_arrayrecords` (float32 arrays
    times Python-float factors n_i / n, summed in site order), so the plain
    loop and the Flower run agree to float32 rounding.
    """
    total = sum(r.num_examples for r in results)
    factors = [r.num_examples / total for r in results]
    averaged = [w * factors[0] for w in results[0].weights]
    for result, factor in zip(results[1:], factors[1:]):
        for layer, w in zip(averaged, result.weights):
            layer += w * factor
    return averaged


def fedavg_plain(kind: str, hidden: tuple[int, ...], initial: list[np.ndarray],
                 sites: dict[str, tuple[np.ndarray, np.ndarray]], rounds: int, config: TrainConfig,
                 seed: int, after_round=None) -> tuple[list[np.ndarray], list[float]]:
    """Return the final global weights and per-round mean local loss of an in-process FedAvg run.

    Sites are aggregated in name order, as the Flower server does.
    `after_round(round, weights)`, if given, runs after each aggregation.
    """
    weights = [w.copy() for w in initial]
    losses = []
    for server_round in range(1, rounds + 1):
        results = [
            local_update(kind, hidden, weights, x, y, config, round_seed(seed, site, server_round))
            for site, (x, y) in sorted(sites.items())
        ]
        weights = weighted_average(results)
        if after_round is not None:
            after_round(server_round, weights)
        total = sum(r.num_examples for r in results)
        losses.append(sum(r.train_loss * r.num_examples for r in results) / total)
    return weights, losses


def initial_weights(kind: str, n_features: int, hidden: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Return the global model's starting weights (the same for every strategy)."""
    return get_weights(build_model(kind, n_features, seed=seed, hidden=hidden))


def _loaded(kind: str, hidden: tuple[int, ...], weights: list[np.ndarray], n_features: int):
    model = build_model(kind, n_features, seed=None, hidden=hidden)
    set_weights(model, weights)
    return model.eval()


def predict(kind: str, hidden: tuple[int, ...], weights: list[np.ndarray], features: np.ndarray) -> np.ndarray:
    """Return predicted probabilities of a model given by its weights."""
    from fl.train import predict_proba

    return predict_proba(_loaded(kind, hidden, weights, features.shape[1]), features)


def predict_logits(kind: str, hidden: tuple[int, ...], weights: list[np.ndarray], features: np.ndarray) -> np.ndarray:
    """Return the log-odds of readmission of a model given by its weights (for losses and attacks)."""
    import torch

    with torch.no_grad():
        model = _loaded(kind, hidden, weights, features.shape[1])
        return model(torch.as_tensor(features, dtype=torch.float32)).double().numpy()


