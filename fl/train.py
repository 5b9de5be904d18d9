"""Seeded, deterministic training loops shared by local, pooled and federated training.

`fit` trains a model on one data set (full batch or minibatches), with
optional early stopping on a validation set and an optional proximal term
(FedProx) pulling the weights toward reference weights. The same function
runs inside a hospital in federated training; no Flower code here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from data_synth.cohort import assign_split


@dataclass(frozen=True)
class TrainConfig:
    """How to train: epochs, batch size (None: full batch), optimiser and regularisation."""

    epochs: int = 200
    batch_size: int | None = None
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    patience: int | None = 20
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive or None, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class History:
    """Per-epoch training (and validation) loss; the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


def fit(model: nn.Module, features: np.ndarray, labels: np.ndarray, config: TrainConfig, seed: int,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        reference: list[torch.Tensor] | None = None) -> History:
    """Train `model` in place and return its loss history.

    With `validation`, training stops after `config.patience` epochs without
    a lower validation loss and the best weights are restored. With
    `config.proximal_mu > 0`, the loss adds mu/2 * ||w - reference||^2.
    """
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"features and labels differ in rows: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("no training rows")
    if config.proximal_mu > 0 and reference is None:
        reference = [parameter.detach().clone() for parameter in model.parameters()]
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, config)
    history = History()
    x_val = y_val = None
    if validation is not None:
        x_val = torch.as_tensor(validation[0], dtype=torch.float32)
        y_val = torch.as_tensor(validation[1], dtype=torch.float32)
    best_loss, best_state, since_best = np.inf, None, 0
    batch = config.batch_size or x.shape[0]
    for epoch in range(config.epochs):
        model.train()
        full_batch = batch >= x.shape[0]
        order = None if full_batch else torch.randperm(x.shape[0], generator=generator)
        epoch_loss = 0.0
        for start in range(0, x.shape[0], batch):
            if full_batch:
                xb, yb = x, y  # no copy of the whole data set each epoch
            else:
                rows = order[start:start + batch]
                xb, yb = x[rows], y[rows]
            optimizer.zero_grad()
            loss = _loss(model, xb, yb)
            if config.proximal_mu > 0:
                loss = loss + config.proximal_mu / 2 * sum(
                    ((parameter - start) ** 2).sum() for parameter, start in zip(model.parameters(), reference))
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach()) * xb.shape[0]
        history.train_loss.append(epoch_loss / x.shape[0])
        if x_val is not None:
            model.eval()
            with torch.no_grad():
                val_loss = float(_loss(model, x_val, y_val))
            history.validation_loss.append(val_loss)
            if val_loss < best_loss - 1e-6:
                best_loss, best_state, since_best = val_loss, copy.deepcopy(model.state_dict()), 0
                history.best_epoch = epoch
            else:
                since_best += 1
                if config.patience is not None and since_best >= config.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        history.best_epoch = len(history.train_loss) - 1
    return history


def predict_proba(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """Return the model's predicted probability of readmission for each row."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(features, dtype=torch.float32))
    return torch.sigmoid(logits).double().numpy()


def validation_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Return a stratified, seeded boolean mask of rows held out for early stopping."""
    return assign_split(np.asarray(labels), fraction, np.random.default_rng(seed)) == "test"
