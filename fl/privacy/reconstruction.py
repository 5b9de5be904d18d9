"""Reconstruction of records from updates (attacker positions C and D).

For a logistic regression, the gradient of one record's loss is
(p - y) * [x, 1]: dividing the weight gradient by the bias gradient returns
the record exactly. A site that trains on one record at a time, or sends
per-record gradients, therefore hands out its records.
"""
from __future__ import annotations

import numpy as np
import torch

from fl.models import build_model, set_weights


def single_record_gradient(weights: list[np.ndarray], record: np.ndarray, label: int) -> list[np.ndarray]:
    """Return the logistic-regression loss gradient of one standardised record (what one update step reveals)."""
    model = build_model("logistic", record.shape[0], seed=None)
    set_weights(model, weights)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(torch.as_tensor(record[None, :], dtype=torch.float32)), torch.tensor([float(label)]))
    loss.backward()
    return [p.grad.detach().numpy().copy() for p in model.parameters()]


def reconstruct_record(gradient: list[np.ndarray]) -> np.ndarray:
    """Return the record behind a single-record logistic-regression gradient: dL/dw / dL/db."""
    weight_gradient, bias_gradient = gradient
    if abs(float(bias_gradient.ravel()[0])) < 1e-12:
        raise ValueError("the bias gradient is zero: the record was predicted perfectly and cannot be recovered")
    return weight_gradient.ravel() / float(bias_gradient.ravel()[0])


def partner_update(aggregate: list[np.ndarray], own: list[np.ndarray], own_rows: int, partner_rows: int) -> list[np.ndarray]:
    """Return the other hospital's model, from the FedAvg aggregate and one's own (two-site federation).

    With two sites, w = (n_a w_a + n_b w_b) / (n_a + n_b), so hospital a
    recovers w_b exactly once it knows the sizes (secure aggregation hides
    the summands, not this subtraction).
    """
    total = own_rows + partner_rows
    return [(g.astype(np.float64) * total - o.astype(np.float64) * own_rows) / partner_rows
            for g, o in zip(aggregate, own)]


# Optimisation-based reconstruction of a batch: what a server gets if a site sends, each round, the gradient
# of one small batch of patients (FedSGD). Records are in the model's input space (standardised features, then
# missing indicators); the attacker knows the global model of each round and how many of the batch were
# readmitted, and searches for records whose gradients match the ones it saw.

#: A reconstructed numeric value counts as recovered within this many standard deviations of the true value.
NUMERIC_TOLERANCE = 0.25


def batch_gradients(records: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Return (..., R, d + 1): the mean logistic-loss gradient of each batch under each round's model.

    `records` is (..., B, d), `labels` (..., B), `weight` (R, d), `bias` (R,).
    """
    residual = torch.sigmoid(records @ weight.T + bias) - labels[..., None]  # (..., B, R)
    gradient_weight = residual.transpose(-1, -2) @ records / records.shape[-2]  # (..., R, d)
    return torch.cat([gradient_weight, residual.mean(dim=-2)[..., None]], dim=-1)


def reconstruct_batches(observed: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                        population: np.ndarray, rng: np.random.Generator, restarts: int = 4,
                        steps: int = 1000, learning_rate: float = 0.05) -> np.ndarray:
    """Return (T, B, d) records whose gradients best match the observed ones (gradient matching).

    `observed` is (T, R, d + 1), the gradients of T batches under R rounds'
    models (`weight` (R, d), `bias` (R,)); `labels` (T, B) come from the known
    label counts. Every batch is searched from `restarts` starting points drawn
    from `population` (P, d) at once, by Adam on the squared mismatch (each
    round's gradient scaled to unit norm), and the start with the closest match is kept.
    The mismatch's gradient is written out (as in `reference`): no autograd graph.
    """
    trials, batch = labels.shape
    records = population[rng.integers(0, len(population), size=(trials, restarts, batch))].astype(np.float64)
    target = np.asarray(observed, dtype=np.float64)[:, None]  # (T, 1, R, d + 1)
    scale = np.maximum((target**2).sum(axis=-1, keepdims=True), 1e-24)
    y = np.asarray(labels, dtype=np.float64)[:, None, :, None]  # (T, 1, B, 1)
    first, second = np.zeros_like(records), np.zeros_like(records)

    def mismatch_and_gradient(x):
        probability = 1.0 / (1.0 + np.exp(-(x @ weight.T + bias)))  # (T, S, B, R)
        residual = probability - y
        gradient = np.concatenate([np.swapaxes(residual, -1, -2) @ x, residual.sum(axis=-2)[..., None]],
                                  axis=-1) / batch  # (T, S, R, d + 1)
        error = (gradient - target) / scale
        mismatch = ((gradient - target) * error).sum(axis=(-1, -2))  # (T, S)
        error_weight, error_bias = error[..., :-1], error[..., -1]  # (T, S, R, d), (T, S, R)
        # d mismatch / d x_i = 2 / B * sum_r [residual_ir e_r + sigma'_ir (x_i . e_r + e_bias_r) w_r]
        slope = probability * (1 - probability) * (x @ np.swapaxes(error_weight, -1, -2) + error_bias[..., None, :])
        return mismatch, 2.0 / batch * (residual @ error_weight + slope @ weight)

    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        _, gradient = mismatch_and_gradient(records)
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient**2
        records = records - learning_rate * (first / (1 - beta1**step)) / (np.sqrt(second / (1 - beta2**step)) + eps)
    mismatch, _ = mismatch_and_gradient(records)
    return records[np.arange(trials), mismatch.argmin(axis=1)]


def match_records(guess: np.ndarray, truth: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """Return (T, B, d) booleans: each feature of each true record recovered by its best-matched guess.

    Guesses are paired with true records one to one so as to recover the most
    features (a batch's order is not observable). Binary features must be
    exact (nearest of the two values), numeric ones within `NUMERIC_TOLERANCE`.
    `binary` is (d, 2): for binary features the two values on the model's
    scale, NaN for numeric features.
    """
    from scipy.optimize import linear_sum_assignment

    is_binary = ~np.isnan(binary[:, 0])

    def decoded(values):
        nearest = np.where(np.abs(values - binary[:, 0]) <= np.abs(values - binary[:, 1]), binary[:, 0], binary[:, 1])
        return np.where(is_binary, nearest, values)

    g, t = decoded(guess)[:, :, None, :], decoded(truth)[:, None, :, :]  # (T, B guesses, B truths, d)
    hit = np.where(is_binary, g == t, np.abs(g - t) <= NUMERIC_TOLERANCE)
    recovered = np.empty(truth.shape, dtype=bool)
    for trial in range(truth.shape[0]):  # one small assignment problem per batch, not per patient
        rows, cols = linear_sum_assignment(-hit[trial].sum(axis=-1))
        recovered[trial, cols] = hit[trial, rows, cols]
    return recovered


def feature_levels(spec) -> np.ndarray:
    """Return (d, 2): the two values each binary input takes on the model's scale (NaN for numeric inputs)."""
    from data_synth.features import FEATURES

    kinds = {f.name: f.kind for f in FEATURES}
    levels = np.full((spec.n_outputs, 2), np.nan)
    for j, name in enumerate(spec.output_names):
        if j >= len(spec.mean):
            levels[j] = (0.0, 1.0)  # a missing indicator
        elif kinds.get(name) == "binary":
            levels[j] = (-spec.mean[j] / spec.std[j], (1 - spec.mean[j]) / spec.std[j])
    return levels


def batch_reconstruction(inputs: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                         levels: np.ndarray, features: int, batch_sizes: tuple[int, ...], trials: int,
                         rng: np.random.Generator) -> list[dict]:
    """Return, per batch size, per-feature and whole-record recovery by gradient matching and by the marginals.

    Batches of distinct patients are drawn from `inputs` (N, d); their
    FedSGD gradients under each round's model are what the attacker sees.
    The attacker's starting points and the marginal baseline come from the
    other patients (its population sample). Only the first `features`
    columns (the record's features, not the missing indicators) are scored.
    """
    order = rng.permutation(len(labels))
    population = inputs[order[len(order) // 2:]]
    is_binary = ~np.isnan(levels[:, 0])
    # The marginal guess: each binary input's commoner value, each numeric input's median.
    share_high = (np.abs(population - levels[:, 1]) < np.abs(population - levels[:, 0])).mean(axis=0)
    marginal = np.where(is_binary, np.where(share_high > 0.5, levels[:, 1], levels[:, 0]),
                        np.median(population, axis=0))
    candidates = order[: len(order) // 2]
    rows = []
    for size in batch_sizes:
        chosen = candidates[np.argsort(rng.random((trials, len(candidates))), axis=1)[:, :size]]  # (T, B) distinct
        truth, truth_labels = inputs[chosen].astype(np.float64), labels[chosen].astype(np.float64)
        observed = batch_gradients(torch.as_tensor(truth), torch.as_tensor(truth_labels),
                                   torch.as_tensor(weight, dtype=torch.float64),
                                   torch.as_tensor(bias, dtype=torch.float64)).numpy()
        guess = reconstruct_batches(observed, truth_labels, weight, bias, population, rng)
        for attacker, attempt in (("gradient matching", guess), ("population marginals",
                                                                  np.broadcast_to(marginal, truth.shape))):
            recovered = match_records(attempt, truth, levels)[..., :features]
            binary = is_binary[:features]
            rows.append({"batch_size": size, "attacker": attacker, "batches": trials,
                         "records": trials * size,
                         "binary_feature_accuracy": round(float(recovered[..., binary].mean()), 4),
                         "numeric_feature_accuracy": round(float(recovered[..., ~binary].mean()), 4),
                         "whole_record_matches": round(float(recovered.all(axis=-1).mean()), 4)})
    return rows
