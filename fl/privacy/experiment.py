"""Membership-inference experiments on the federated model (attacker positions A and B).

K federated pipelines are trained at once on random halves of the patients
(every patient is a member of exactly half of them). Each of the first T
pipelines in turn plays the released model, the other K - 1 are the
attacker's reference models (leave-one-out, as in Carlini et al. 2022), and
the trials of all T targets are pooled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fl.data import PreprocessingSpec, SiteSplit
from fl.privacy.membership import ATTACKS, AttackerKnowledge, AttackResult, evaluate_attack
from fl.privacy.reference import (BatchedModels, DPSGDRecipe, SiteTensors, membership_masks, train_federated,
                                  train_federated_dp)


@dataclass(frozen=True)
class TrainingRecipe:
    """The federated training every reference model repeats."""

    rounds: int
    local_epochs: int
    learning_rate: float
    weight_decay: float
    initial: tuple[np.ndarray, np.ndarray]
    optimizer: str = "adam"  # the sites' local optimiser (fl.privacy.reference.OPTIMISERS)


@dataclass
class MembershipExperiment:
    """Pooled attack trials and their evaluation."""

    results: dict[str, AttackResult]  # attack name -> result, in `membership.ATTACKS` order
    scores: dict[str, np.ndarray]  # attack name -> (T * N,) pooled scores
    members: np.ndarray  # (T * N,) pooled membership
    per_record: pd.DataFrame  # per-record vulnerability (aggregated over targets)
    models: int
    targets: int
    trained: BatchedModels | None = None  # the K federated models (attribute inference queries them again)
    membership: np.ndarray | None = None  # (N, K) membership of every record (sites in name order) in every model


def train_population(sites: dict[str, SiteSplit], models: int, recipe: TrainingRecipe | DPSGDRecipe,
                     rng: np.random.Generator, preprocessing: PreprocessingSpec | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, BatchedModels]:
    """Return (logits (N, K), labels (N,), members (N, K), the models) of K federated models over all sites' records.

    A `DPSGDRecipe` trains every model with DP-SGD at each site (its noise
    drawn from a torch generator seeded from `rng`), standardised with a fixed
    `preprocessing` if given (DP runs' public scaling) instead of each model's
    own members' statistics.
    """
    tensors = {s: SiteTensors.of(d.features, d.labels, d.schema) for s, d in sites.items()}
    masks = membership_masks({s: len(d) for s, d in sites.items()}, models, rng)
    if isinstance(recipe, DPSGDRecipe):
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        trained = train_federated_dp(tensors, masks, recipe, generator, preprocessing)
    else:
        trained = train_federated(tensors, masks, recipe.rounds, recipe.local_epochs, recipe.learning_rate,
                                  recipe.weight_decay, recipe.initial, recipe.optimizer)
    with torch.no_grad():
        logits = np.concatenate([trained.logits(tensors[s]).double().numpy() for s in sorted(sites)])
    labels = np.concatenate([sites[s].labels for s in sorted(sites)])
    members = np.concatenate([masks[s].numpy().T for s in sorted(sites)])
    return logits, labels, members, trained


def attack_scores(logits: np.ndarray, labels: np.ndarray, members: np.ndarray, target: int,
                  population: np.ndarray) -> dict[str, np.ndarray]:
    """Return every registered attack's scores against model `target`, the others being references."""
    others = np.delete(np.arange(logits.shape[1]), target)
    known = AttackerKnowledge(logits[:, target], labels, logits[:, others], members[:, others], population)
    return {name: attack.scores(known) for name, attack in ATTACKS.items()}


def run(sites: dict[str, SiteSplit], models: int, targets: int, recipe: TrainingRecipe | DPSGDRecipe, seed: int,
        population_size: int = 2000, preprocessing: PreprocessingSpec | None = None) -> MembershipExperiment:
    """Train `models` federated pipelines and attack `targets` of them; return pooled results."""
    if not 2 <= targets < models:
        raise ValueError(f"need 2 <= targets < models, got targets={targets}, models={models}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    logits, labels, members, trained = train_population(sites, models, recipe, rng, preprocessing)
    population = rng.choice(len(labels), size=min(population_size, len(labels)), replace=False)
    pooled = {attack: [] for attack in ATTACKS}
    for target in range(targets):
        for attack, scores in attack_scores(logits, labels, members, target, population).items():
            pooled[attack].append(scores)
    scores = {attack: np.concatenate(parts) for attack, parts in pooled.items()}
    pooled_members = np.concatenate([members[:, t] for t in range(targets)])
    results = {attack: evaluate_attack(s, pooled_members) for attack, s in scores.items()}
    per_record = vulnerability(scores["lira_online"], pooled_members, len(labels), targets)
    return MembershipExperiment(results, scores, pooled_members, per_record, models, targets, trained, members)


def vulnerability(scores: np.ndarray, members: np.ndarray, records: int, targets: int) -> pd.DataFrame:
    """Return per record its mean attack score as a member minus as a non-member (larger: more exposed)."""
    score = scores.reshape(targets, records)
    member = members.reshape(targets, records)
    def mean_where(mask):
        count = mask.sum(axis=0)
        return np.where(count > 0, np.where(mask, score, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)

    # NaN where a record was never (or always) a member of the targets.
    return pd.DataFrame({"score_gap": mean_where(member) - mean_where(~member)})


def null_control(experiment: MembershipExperiment, attack: str, rng: np.random.Generator) -> AttackResult:
    """Return the attack evaluated on non-members only, half of them labelled 'member' at random (AUC ~0.5)."""
    non_members = ~experiment.members
    scores = experiment.scores[attack][non_members]
    fake = rng.random(scores.size) < 0.5
    return evaluate_attack(scores, fake)


def null_controls(experiment: MembershipExperiment, rng: np.random.Generator) -> dict[str, AttackResult]:
    """Return every attack's null control (`null_control`), drawing the fake labels from `rng` attack by attack."""
    return {attack: null_control(experiment, attack, rng) for attack in experiment.scores}
