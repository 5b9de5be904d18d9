"""Many federated logistic-regression models trained at once, as one tensor program.

Reference models for membership inference must re-run the whole federated
pipeline (federated statistics, then FedAvg rounds of local training at each
site) on resampled member sets. Here M such pipelines run together: weights
are (M, d) tensors, each model's members are a 0/1 mask over each site's
rows, and one matrix product scores every row under every model. Adam acts
elementwise, so one optimiser over the stacked weights is M independent
optimisers; models never mix.

Each model standardises with its own members' statistics, as its own
federated-statistics round would. Standardisation is folded into the
weights (z = (x - mean) / std on observed values, 0 where missing), so no
(M, n, d) tensor is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fl.data import SYNTHETIC_SCHEMA, FeatureSchema, PreprocessingSpec, transformed_features


@dataclass(frozen=True)
class SiteTensors:
    """One site's rows in the form batched training needs."""

    values: torch.Tensor  # (n, f) transformed features, 0 where missing (float64, for statistics)
    observed: torch.Tensor  # (n, f) 1 where observed (float64)
    indicators: torch.Tensor  # (n, k) missing indicators (as the spec appends them)
    labels: torch.Tensor  # (n,)
    design: torch.Tensor  # (n, 2f + k) float32: [values, -observed, indicators], one matmul per step

    @classmethod
    def of(cls, features: pd.DataFrame, labels: np.ndarray, schema: FeatureSchema = SYNTHETIC_SCHEMA) -> "SiteTensors":
        raw = transformed_features(features, schema).to_numpy()
        observed = ~np.isnan(raw)
        indicator_columns = [schema.features.index(name) for name in schema.indicator_features]
        values = np.where(observed, raw, 0.0)
        indicators = (~observed[:, indicator_columns]).astype(float)
        return cls(
            values=torch.as_tensor(values, dtype=torch.float64),
            observed=torch.as_tensor(observed, dtype=torch.float64),
            indicators=torch.as_tensor(indicators, dtype=torch.float32),
            labels=torch.as_tensor(labels, dtype=torch.float32),
            design=torch.as_tensor(np.hstack([values, -observed.astype(float), indicators]), dtype=torch.float32),
        )

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class BatchedModels:
    """M logistic-regression models with their own preprocessing statistics."""

    weight: torch.Tensor  # (M, f) on standardised features
    indicator_weight: torch.Tensor  # (M, k)
    bias: torch.Tensor  # (M,)
    mean: torch.Tensor  # (M, f)
    std: torch.Tensor  # (M, f)
    dp_steps: dict[str, int] | None = None  # DP-SGD steps of one local epoch at each site (its sampling rate is 1 / steps)

    def logits(self, site: SiteTensors) -> torch.Tensor:
        """Return (n, M) log-odds of every row under every model."""
        return _logits(site, self.weight, self.indicator_weight, self.bias, self.mean, self.std)

    @property
    def count(self) -> int:
        return self.weight.shape[0]


def _logits(site: SiteTensors, weight, indicator_weight, bias, mean, std) -> torch.Tensor:
    scaled = weight / std.float()  # (M, f)
    # sum_j observed_ij * (x_ij - mean_mj) * w_mj / std_mj + indicators . v_m, as one matrix product
    # of [x, -observed, indicators] with [w / std, mean * w / std, v].
    stacked = torch.cat([scaled, mean.float() * scaled, indicator_weight], dim=1)  # (M, 2f + k)
    return torch.addmm(bias, site.design, stacked.T)


class _AdamState:
    """torch.optim.Adam's update (default betas, L2 weight decay added to the gradient), elementwise.

    Written out because the gradients are computed in closed form: no
    autograd graph is built for M models at once.
    """

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, moments):
        self.moments = moments
        self.t = 0

    @classmethod
    def like(cls, *params):
        return cls([(torch.zeros_like(p), torch.zeros_like(p)) for p in params])

    def step(self, params, grads, lr, weight_decay):
        self.t += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if weight_decay:
                g = g + weight_decay * p
            m, v = self.moments[i]
            m = self.beta1 * m + (1 - self.beta1) * g
            v = self.beta2 * v + (1 - self.beta2) * g * g
            self.moments[i] = (m, v)
            m_hat = m / (1 - self.beta1**self.t)
            denominator = (v / (1 - self.beta2**self.t)).sqrt() + self.eps
            out.append(p - lr * m_hat / denominator)
        return out


class _SGDState:
    """torch.optim.SGD's update (no momentum, L2 weight decay added to the gradient), elementwise."""

    @classmethod
    def like(cls, *params):
        return cls()

    def step(self, params, grads, lr, weight_decay):
        return [p - lr * (g + weight_decay * p if weight_decay else g) for p, g in zip(params, grads)]


#: The local optimisers the batched reference reproduces (created afresh each round, as at the sites).
OPTIMISERS = {"adam": _AdamState, "sgd": _SGDState}


def member_statistics(sites: dict[str, SiteTensors], masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each model's (mean, std) from its members' counts, sums and sums of squares over all sites."""
    count = total = squares = 0.0
    for name, site in sites.items():
        mask = masks[name].double()  # (M, n)
        count = count + mask @ site.observed
        total = total + mask @ site.values
        squares = squares + mask @ site.values**2
    mean = total / count
    std = torch.sqrt(torch.clamp(squares / count - mean**2, min=0.0))
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _starting_models(initial: tuple[np.ndarray, np.ndarray], models: int,
                     features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weight (M, f), indicator weight (M, k), bias (M,)) of `models` models all at `initial`."""
    weight = torch.as_tensor(initial[0], dtype=torch.float32).reshape(-1)
    bias = torch.as_tensor(initial[1], dtype=torch.float32).reshape(-1)
    return (weight[:features].expand(models, features).clone(),
            weight[features:].expand(models, weight.shape[0] - features).clone(), bias.expand(models).clone())


def _average(sites: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Return FedAvg of each site's (weight, indicator weight, bias, share of members), model by model."""
    return (sum(w * share[:, None] for w, _, _, share in sites), sum(v * share[:, None] for _, v, _, share in sites),
            sum(b * share for _, _, b, share in sites))


def train_federated(sites: dict[str, SiteTensors], masks: dict[str, torch.Tensor], rounds: int, local_epochs: int,
                    learning_rate: float, weight_decay: float, initial: tuple[np.ndarray, np.ndarray],
                    optimizer: str = "adam") -> BatchedModels:
    """Return M models, each trained by FedAvg over the sites on its own members (full-batch Adam or SGD locally).

    `masks[site]` is an (M, n_site) 0/1 tensor of members; `initial` is the
    (weight, bias) every model starts from, as in the target pipeline.
    Sites are visited in name order and averaged by member counts, as the
    Flower server does.
    """
    names = sorted(sites)
    m = next(iter(masks.values())).shape[0]
    mean, std = member_statistics(sites, masks)
    f = next(iter(sites.values())).values.shape[1]
    global_weight, global_indicator, global_bias = _starting_models(initial, m, f)
    counts = {name: masks[name].float().sum(dim=1) for name in names}  # (M,)
    total = sum(counts.values())
    scale = (1.0 / std).float()  # (M, f)
    shift = (mean / std).float()  # (M, f)
    # Per site, once: each member's loss weight (n, M), the labels times it, and the design with a ones
    # column, so that one matmul gives the logits with the bias and one the gradients with the bias's.
    loss_weight = {name: (masks[name].float() / counts[name][:, None]).T.contiguous() for name in names}
    target = {name: sites[name].labels[:, None] * loss_weight[name] for name in names}
    design = {name: torch.cat([sites[name].design, torch.ones(len(sites[name]), 1)], dim=1) for name in names}
    for _ in range(rounds):
        new = []
        for name in names:
            weight, indicator, bias = global_weight.clone(), global_indicator.clone(), global_bias.clone()
            state = OPTIMISERS[optimizer].like(weight, indicator, bias)
            for _ in range(local_epochs):
                stacked = torch.cat([weight * scale, weight * shift, indicator, bias[:, None]], dim=1)
                residual = design[name] @ stacked.T  # (n, M) logits
                # d(mean BCE)/d(logit) = (sigmoid - y) / members, zero for non-members; in place, no new (n, M) tensors.
                residual.sigmoid_().mul_(loss_weight[name]).sub_(target[name])
                grad_stacked = residual.T @ design[name]  # (M, 2f + k + 1)
                grad_weight = grad_stacked[:, :f] * scale + grad_stacked[:, f:2 * f] * shift
                grads = (grad_weight, grad_stacked[:, 2 * f:-1], grad_stacked[:, -1])
                weight, indicator, bias = state.step((weight, indicator, bias), grads, learning_rate, weight_decay)
            new.append((weight, indicator, bias, counts[name] / total))
        global_weight, global_indicator, global_bias = _average(new)
    return BatchedModels(global_weight, global_indicator, global_bias, mean, std)


def membership_masks(sizes: dict[str, int], models: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Return, per site, an (M, n) mask putting each row in exactly half of the models (LiRA's design)."""
    masks = {}
    for name, n in sorted(sizes.items()):
        # For each row, a random half of the models include it.
        order = np.argsort(rng.random((n, models)), axis=1)
        member = np.zeros((n, models), dtype=bool)
        np.put_along_axis(member, order[:, : models // 2], True, axis=1)
        masks[name] = torch.as_tensor(member.T.copy())
    return masks


@dataclass(frozen=True)
class DPSGDRecipe:
    """Patient-level DP-SGD at each site, as `fl.privacy.dp` runs it with Opacus (plain SGD, Poisson sampling)."""

    rounds: int
    local_epochs: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    learning_rate: float
    initial: tuple[np.ndarray, np.ndarray]

    def steps_per_epoch(self, rows: int) -> int:
        """Return the DP-SGD steps of one local epoch over `rows` patients (Opacus: batches of the data loader)."""
        from fl.privacy.dp import steps_per_epoch

        return steps_per_epoch(self.sample_rate, rows)


def train_federated_dp(sites: dict[str, SiteTensors], masks: dict[str, torch.Tensor], recipe: DPSGDRecipe,
                       generator: torch.Generator, preprocessing: PreprocessingSpec | None = None) -> BatchedModels:
    """Return M models, each trained by FedAvg with DP-SGD at every site on its own members.

    Each model standardises with its own members' statistics (the federated
    statistics round, outside the DP guarantee), or, given a fixed
    `preprocessing` (public scaling, `fl.privacy.public_scaling`), every model
    uses that spec and nothing but DP-SGD depends on the members.

    Opacus's DP-SGD written out for M logistic regressions at once: each step
    samples every member with probability 1 / steps (Poisson), clips each
    patient's gradient to `max_grad_norm`, adds Gaussian noise of standard
    deviation noise_multiplier * max_grad_norm to the sum, divides by the
    expected batch size and takes a plain SGD step. Per-patient gradient norms
    come in closed form, ||residual * [z, indicators, 1]||, from three matrix products.
    """
    names = sorted(sites)
    m = next(iter(masks.values())).shape[0]
    if preprocessing is None:
        mean, std = member_statistics(sites, masks)
    else:
        mean, std = (torch.as_tensor(np.asarray(a, dtype=np.float64)).expand(m, -1).clone()
                     for a in (preprocessing.mean, preprocessing.std))
    f = next(iter(sites.values())).values.shape[1]
    global_weight, global_indicator, global_bias = _starting_models(recipe.initial, m, f)
    counts = {name: masks[name].float().sum(dim=1) for name in names}
    total = sum(counts.values())
    scale, shift = (1.0 / std).float(), (mean / std).float()
    # ||z_i||^2 under each model's standardisation, (n, M): sum_j observed (x - mean)^2 / std^2.
    inverse_variance = (1.0 / std**2)
    squared_norm = {}
    for name in names:
        site = sites[name]
        z2 = (site.values**2 @ inverse_variance.T - 2 * site.values @ (mean * inverse_variance).T
              + site.observed @ (mean**2 * inverse_variance).T)
        squared_norm[name] = (z2 + site.indicators.double().pow(2).sum(dim=1, keepdim=True) + 1.0).float()
    noise_sd = recipe.noise_multiplier * recipe.max_grad_norm
    # Every model takes the same number of steps, from its site's mean member count.
    site_steps = {name: recipe.steps_per_epoch(int(round(float(counts[name].mean())))) for name in names}
    for _ in range(recipe.rounds):
        new = []
        for name in names:
            site, member = sites[name], masks[name].float().T  # (n, M)
            steps = site_steps[name]
            expected = torch.floor(counts[name] / steps).clamp_min(1.0)  # (M,) Opacus: int(n * sample_rate)
            norm = squared_norm[name].sqrt()
            weight, indicator, bias = global_weight.clone(), global_indicator.clone(), global_bias.clone()
            for _ in range(recipe.local_epochs * steps):
                sampled = member * (torch.rand(member.shape, generator=generator) < 1.0 / steps)
                stacked = torch.cat([weight * scale, weight * shift, indicator], dim=1)
                residual = torch.sigmoid(torch.addmm(bias, site.design, stacked.T)) - site.labels[:, None]
                clip = torch.clamp(recipe.max_grad_norm / (residual.abs() * norm + 1e-6), max=1.0)
                weighted = residual * clip * sampled  # (n, M): each sampled patient's clipped share
                grad_stacked = weighted.T @ site.design
                grads = (grad_stacked[:, :f] * scale + grad_stacked[:, f:2 * f] * shift, grad_stacked[:, 2 * f:],
                         weighted.sum(dim=0))
                noisy = [g + noise_sd * torch.randn(g.shape, generator=generator) for g in grads]
                weight, indicator, bias = (p - recipe.learning_rate * g / (expected[:, None] if g.dim() == 2
                                                                           else expected)
                                           for p, g in zip((weight, indicator, bias), noisy))
            new.append((weight, indicator, bias, counts[name] / total))
        global_weight, global_indicator, global_bias = _average(new)
    return BatchedModels(global_weight, global_indicator, global_bias, mean, std, site_steps)
