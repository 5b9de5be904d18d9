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
