"""Patient-level differential privacy: DP-SGD with Opacus inside each hospital's local training.

Each hospital keeps one RDP accountant for the whole federation: every
round's DP-SGD steps are added to the same accountant, never reset, so the
epsilon reported after the last round covers all rounds. The unit of privacy
is one patient (one row of the cohort); epsilon is reported at a stated
delta per hospital, and the federation's epsilon is the maximum over
hospitals (each hospital's patients are protected by its own training).
Adjacency: add/remove of one patient, with all of that patient's rows (the
cohort has one index admission per patient), the adjacency Opacus's RDP
accountant for Poisson sampling assumes.

Every step the accountant counts is a step taken: a Poisson batch that
comes out empty still takes a noise-only step (the clipped sum is zero,
the Gaussian noise is not), so the released weights are the mechanism the
accountant describes even for a small site.

Noise source (`DPConfig.noise_source`): "seeded" draws Poisson sampling and
noise from torch generators seeded from (seed, site, round), reproducible
and so not private against anyone who knows the seed; "os" seeds them from
the operating system's cryptographic source (`secrets`) at every call, so no
one can re-draw the noise, though the draws themselves come from torch's
generator, not from a cryptographic one (Opacus's secure_mode needs
torchcsprng, which the lock does not include).
"""
from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from fl.federated import LocalResult, round_seed, weighted_average
from fl.models import build_model, get_weights, set_weights

ACCOUNTANT = "RDP (Opacus RDPAccountant)"
UNIT = "one patient (all of that patient's rows; one index admission per patient)"
ADJACENCY = "add/remove of one patient (Poisson-subsampled Gaussian, Opacus RDP)"
#: Where a DP run's noise comes from: reproducible from the profile's seed, or from the OS's entropy.
NOISE_SOURCES = {
    "seeded": "seeded torch generators (reproducible; not private against anyone who knows the seed)",
    "os": "torch generators seeded from the OS's cryptographic source (secrets) at every call; not reproducible "
          "(torch's generator itself is not a CSPRNG: Opacus secure_mode needs torchcsprng)",
}


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings: noise, clipping, Poisson sampling rate, and the delta epsilon is stated at."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    learning_rate: float
    local_epochs: int
    noise_source: str = "seeded"  # a key of NOISE_SOURCES

    def __post_init__(self) -> None:
        if self.noise_source not in NOISE_SOURCES:
            raise ValueError(f"DP noise_source must be one of {sorted(NOISE_SOURCES)}, got {self.noise_source!r}")


def batch_size(sample_rate: float, rows: int) -> int:
    """Return the data loader's batch size: Opacus's Poisson rate is then 1 / ceil(rows / batch)."""
    return max(1, int(round(sample_rate * rows)))


def steps_per_epoch(sample_rate: float, rows: int) -> int:
    """Return the DP-SGD steps of one epoch over `rows` patients (the loader's batches; the rate is 1 / steps)."""
    return -(-rows // batch_size(sample_rate, rows))


def noise_seed(config: DPConfig, seed: int) -> int:
    """Return the seed of a DP step's generators: `seed` if seeded, fresh OS entropy otherwise."""
    return seed if config.noise_source == "seeded" else secrets.randbits(63)


def dp_local_update(weights: list[np.ndarray], features: np.ndarray, labels: np.ndarray, config: DPConfig,
                    accountant: RDPAccountant, seed: int) -> LocalResult:
    """Return the weights after DP-SGD local epochs; the steps are added to `accountant`."""
    model = build_model("logistic", features.shape[1], seed=None)
    set_weights(model, weights)
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(features, dtype=torch.float32),
                                             torch.as_tensor(labels, dtype=torch.float32))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size(config.sample_rate, len(dataset)))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # Opacus warns that its cryptographically secure RNG is off (seeded noise is what makes runs
        # reproducible), and torch that Opacus's per-sample hooks fire on inputs needing no gradient.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = accountant  # the hospital's accountant lives across rounds
        seed = noise_seed(config, seed)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm, poisson_sampling=True, noise_generator=generator)
        losses = []
        for _ in range(config.local_epochs):
            for x, y in private_loader:
                # An empty Poisson batch still takes its step: Opacus clips an empty set of per-sample
                # gradients to a zero sum and adds the noise; the accountant counts the step either way.
                private_optimizer.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(private_model(x), y, reduction="sum")
                (loss / max(len(y), 1)).backward()
                private_optimizer.step()
                if len(y):
                    losses.append(float(loss.detach()) / len(y))
    trained = [p.detach().numpy().copy() for p in private_model._module.parameters()] if hasattr(
        private_model, "_module") else get_weights(private_model)
    return LocalResult(trained, int(len(labels)), float(np.mean(losses)) if losses else float("nan"))


def dp_fedavg(sites: dict[str, tuple[np.ndarray, np.ndarray]], initial: list[np.ndarray], rounds: int,
              config: DPConfig, seed: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """Return FedAvg's final weights with DP-SGD at every hospital, and each hospital's epsilon at delta."""
    accountants = {site: RDPAccountant() for site in sites}
    weights = [w.copy() for w in initial]
    for server_round in range(1, rounds + 1):
        results = [dp_local_update(weights, x, y, config, accountants[site], round_seed(seed, site, server_round))
                   for site, (x, y) in sorted(sites.items())]
        weights = weighted_average(results)
    epsilons = {site: float(accountant.get_epsilon(config.delta)) for site, accountant in accountants.items()}
    return weights, epsilons


def epsilon_bound(epsilon: float, delta: float, fpr: float) -> float:
    """Return the highest TPR any membership attack can reach at `fpr` against an (epsilon, delta)-DP model."""
    return min(1.0, float(np.exp(epsilon)) * fpr + delta)


def accounted_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Return epsilon at `delta` after `steps` DP-SGD steps at one noise and sampling rate (Opacus's RDP accountant)."""
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))
