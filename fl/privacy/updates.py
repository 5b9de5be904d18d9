"""Attacks on per-round updates: what the server (C) and the other hospital (D) can learn.

The server sees each site's locally trained model every round. With two
sites, the other hospital can compute its partner's model from the
aggregate and its own (`reconstruction.partner_update`), so secure
aggregation does not hide it. Given a site's model before and after its
local training, a record whose loss dropped more is more likely one of that
site's training records: the score is the per-record loss change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fl.data import PreprocessingSpec, SiteSplit
from fl.evaluate import record_loss
from fl.federated import (LocalResult, local_update, predict_logits, round_seed, weighted_average,
                          weights_difference)
from fl.privacy.membership import AttackResult, evaluate_attack
from fl.privacy.reconstruction import partner_update
from fl.train import TrainConfig


def loss_drop_scores(before: list[np.ndarray], after: list[np.ndarray], features: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """Return each record's loss under `before` minus its loss under `after` (larger: more likely trained on)."""
    def losses(weights):
        return record_loss(predict_logits("logistic", (), weights, features), labels)

    return losses(before) - losses(after)


@dataclass
class UpdateAttack:
    """One round seen by the server and by the other hospital."""

    server_round: int
    victim: str
    partner_recovery_error: float | None  # max |recovered - true| of the partner's model (two sites only)
    server: AttackResult  # position C: the site's own update
    other_hospital: AttackResult | None  # position D: the update recovered from the aggregate (two sites only)


def replay_round(global_weights: list[np.ndarray], sites: dict[str, tuple[SiteSplit, SiteSplit]],
                 spec: PreprocessingSpec, config: TrainConfig, seed: int, server_round: int) -> dict[str, LocalResult]:
    """Return every site's update in one FedAvg round from `global_weights` (the site's own seeded training)."""
    return {name: local_update("logistic", (), global_weights, spec.transform(train.features), train.labels, config,
                               round_seed(seed, name, server_round))
            for name, (train, _) in sorted(sites.items())}


def attack_update(global_weights: list[np.ndarray], updates: dict[str, LocalResult],
                  sites: dict[str, tuple[SiteSplit, SiteSplit]], spec: PreprocessingSpec, server_round: int,
                  victim: str) -> UpdateAttack:
    """Return positions C and D attacks on `victim`'s update among one round's `updates`.

    `sites[name]` is (train split, test split); the victim's train rows are
    the members, its test rows the non-members.
    """
    train, test = sites[victim]
    features = spec.transform(pd.concat([train.features, test.features], ignore_index=True))
    labels = np.concatenate([train.labels, test.labels])
    members = np.r_[np.ones(len(train), bool), np.zeros(len(test), bool)]
    server = evaluate_attack(loss_drop_scores(global_weights, updates[victim].weights, features, labels), members)
    if len(sites) != 2:
        # With more sites, subtracting one's own update leaves the sum of all the others, not the victim's.
        return UpdateAttack(server_round, victim, None, server, None)
    aggregate = weighted_average([updates[name] for name in sorted(updates)])
    (partner_name,) = [name for name in sites if name != victim]
    own = updates[partner_name]
    recovered = partner_update(aggregate, own.weights, own.num_examples, updates[victim].num_examples)
    error = weights_difference(recovered, updates[victim].weights)
    recovered32 = [r.astype(np.float32) for r in recovered]
    other = evaluate_attack(loss_drop_scores(global_weights, recovered32, features, labels), members)
    return UpdateAttack(server_round, victim, error, server, other)
