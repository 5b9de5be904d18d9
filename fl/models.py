"""The model classes every stage trains: logistic regression and a small MLP.

Local, pooled and federated training all build their models here, so their
comparisons are fair. Initial weights come from a seed, never from global
random state.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODEL_KINDS = ("logistic", "mlp")


class LogisticRegression(nn.Module):
    """Log-odds of readmission as a linear function of the features."""

    def __init__(self, n_features: int):
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """Log-odds of readmission from a small multilayer perceptron (ReLU hidden layers)."""

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32,)):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build_model(kind: str, n_features: int, seed: int | None, hidden: tuple[int, ...] = (32,)) -> nn.Module:
    """Return a freshly initialised model of `kind` with weights drawn from `seed`.

    `seed=None` is for a model whose weights are loaded right after: it skips
    seeding, and its initial weights must not be used.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if n_features < 1:
        raise ValueError(f"n_features must be positive, got {n_features}")
    def make() -> nn.Module:
        return LogisticRegression(n_features) if kind == "logistic" else MLP(n_features, tuple(hidden))

    if seed is None:
        return make().to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.to(torch.float32)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return the model's parameters as numpy arrays, in state-dict order."""
    return [tensor.detach().cpu().numpy().copy() for tensor in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load parameters given as numpy arrays (state-dict order) into the model."""
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    state = {}
    for key, value in zip(keys, weights):
        expected = tuple(model.state_dict()[key].shape)
        if tuple(np.shape(value)) != expected:
            raise ValueError(f"{key}: expected shape {expected}, got {tuple(np.shape(value))}")
        state[key] = torch.as_tensor(np.asarray(value), dtype=torch.float32)
    model.load_state_dict(state)
