"""Secure aggregation measured: what Flower's SecAgg+ hides, from whom, and what it costs.

The pilot's FedAvg rounds are re-run twice through Flower, with SecAgg+
(`fl.flower.secagg`) and without, and every site's update of every
SecAgg+ round is replayed from the global model the server sent
(`updates.replay_round`, the site's own seeded training). Against those
true updates we measure:

1. the SecAgg+ aggregate against plain FedAvg of the same updates (the
   difference is quantisation: each site's weighted weights are rounded to
   a grid of step `2 * clipping_range / quantization_range`);
2. what the server received from each site (intercepted at the grid): in
   plain FedAvg the site's model weights; under SecAgg+ an integer vector
   masked with pseudo-random values modulo `modulus_range`, whose
   correlation with the site's weights is that of noise;
3. position D: with two hospitals each subtracts its own weighted update
   from the aggregate and is left with the other's, to quantisation error;
   with three or more it is left with the sum of all the others;
4. the cost: bytes and wall time per round, SecAgg+ against plain, in the
   same process on the same engine.

Secure aggregation hides the individual updates from the server (position
C), not from the other hospital when there are only two (position D), and
not from anyone holding the aggregate or the released model (A, B).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from compendium.params import Profile
from fl.baselines import shared_schema, site_splits
from fl.data import site_dir
from fl.federated import LocalResult, weighted_average, weights_difference
from fl.flower import secagg as flower_secagg
from fl.flower.server_app import local_train_config
from fl.flower.stage import load_result
from fl.privacy import require_logistic
from fl.privacy.reconstruction import partner_update
from fl.privacy.updates import replay_round

FEDERATED = Path("03_federated_training")
PROTECTS = ("The aggregation server sees only masked vectors from each hospital, statistically unrelated to its "
            "model, and learns nothing but the sum of the hospitals' weighted models.")
DOES_NOT_PROTECT = ("It does not hide a hospital's model from the other hospital when there are two (subtracting its "
                    "own weighted model from the aggregate leaves the partner's), nor anything the aggregate, the "
                    "released model or the hospitals' sizes reveal.")
#: A masked upload "correlates" with a site's weights if |r| * sqrt(values) reaches this (5 standard errors).
CORRELATION_Z = 5.0


class SecAggError(RuntimeError):
    """Secure aggregation cannot represent this federation's updates (settings to change are named)."""


@dataclass
class SecAggMeasurement:
    """One SecAgg+ run and its plain FedAvg twin, measured against the sites' replayed updates."""

    settings: flower_secagg.SecAggSettings
    engine: str
    sites: tuple[str, ...]
    rounds: int
    secure: flower_secagg.RunRecord
    plain: flower_secagg.RunRecord
    aggregate_error: dict[int, float]  # per round: max |SecAgg+ aggregate - FedAvg of the same updates|
    masked_correlation: dict[str, float]  # per site: Pearson r of masked upload and true weights, pooled over rounds
    masked_values: int  # values per site the correlation pools
    plain_upload_error: float  # round 1: max |plain upload - replayed update| (the server sees the update itself)
    partner_error: float | None  # two sites: max |recovered partner model - true|, over rounds and victims
    others_average_error: float | None  # three or more: max |(N g - n_a w_a) / (N - n_a) - others' average|
    nearest_single_site: float | None  # three or more: min over others of max |others' average - that site's model|
    largest_weighted_weight: float  # max |n_i / N * w_i|: must stay below the clipping range

    @property
    def quantisation_step(self) -> float:
        return self.settings.quantisation_step

    def cost(self) -> pd.DataFrame:
        """Return per run (plain, SecAgg+): seconds per round, bytes per round each way, messages per round.

        Seconds are the fastest round's: on a shared machine other work only
        ever adds time, and the first round also pays one-off start-up costs.
        """
        rows = []
        for name, record in (("plain FedAvg", self.plain), ("SecAgg+", self.secure)):
            per_round = record.bytes_per_round()
            rows.append({"run": name, "seconds per round (fastest)": min(record.seconds_per_round().values()),
                "bytes per round, server to sites": _mean([r["server->site"] for r in per_round.values()]),
                "bytes per round, sites to server": _mean([r["site->server"] for r in per_round.values()]),
                "messages per round": len(record.messages) / self.rounds})
        return pd.DataFrame(rows).set_index("run")

    def table(self) -> pd.DataFrame:
        """Return the measurements as a small table for the notebook (quantities in model-weight units)."""
        cost = self.cost()
        steps = lambda value: f"{value:.2e} ({value / self.quantisation_step:.2f} steps)"  # noqa: E731
        rows = [
            ("quantisation step (2 x clipping range / quantisation range)", f"{self.quantisation_step:.2e}"),
            ("SecAgg+ aggregate vs FedAvg of the same updates (max abs difference)",
             steps(max(self.aggregate_error.values()))),
            ("server, plain FedAvg: upload vs the site's update (max abs difference, round 1)",
             f"{self.plain_upload_error:.1e}"),
            *((f"server, SecAgg+: masked upload vs {site}'s weights (Pearson r, {self.masked_values} values)",
               f"{r:+.3f}") for site, r in self.masked_correlation.items()),
        ]
        if self.partner_error is not None:
            rows.append(("D, two hospitals: partner's model recovered from the SecAgg+ aggregate (max abs error)",
                         steps(self.partner_error)))
        else:
            rows.append(("D, three or more: the others' average recovered (max abs error)",
                         steps(self.others_average_error)))
            rows.append(("D, three or more: the others' average vs the closest single hospital (max abs difference)",
                         f"{self.nearest_single_site:.3f}"))
        rows.append(("cost: wall time per round, SecAgg+ / plain",
                     f"{cost.iloc[1, 0] / cost.iloc[0, 0]:.1f}x"))
        rows.append(("cost: bytes per round (both ways), SecAgg+ / plain", f"{self.bytes_ratio():.1f}x"))
        return pd.DataFrame(rows, columns=["measurement", "value"]).set_index("measurement")

    def bytes_ratio(self) -> float:
        """Return bytes per round (both directions, all sites) with SecAgg+ over without."""
        def total(record):
            return sum(m["bytes"] for m in record.messages)
        return total(self.secure) / total(self.plain)

    def summary(self) -> dict:
        """Return the `secure_aggregation` entry of stage 4's summary.json (only numbers that every run repeats).

        The masked uploads (fresh keys and masks every run) and wall times
        vary from run to run: the entry gives the correlation's verdict, not
        its value, and no times (both are in the rendered notebook).
        """
        two = len(self.sites) == 2
        cost = self.cost()
        step = self.quantisation_step
        position_d = ({
            "applicable": True,
            "what": "the other hospital subtracts its own weighted model from the SecAgg+ aggregate",
            "partner_recovery_max_abs_error": _sig(self.partner_error),
            "partner_recovery_max_error_in_quantisation_steps": round(self.partner_error / step, 2),
        } if two else {
            "applicable": False,
            "reason": (f"with {len(self.sites)} hospitals, subtracting one's own weighted model from the aggregate "
                       "leaves the weighted sum of all the others, not any single hospital's model"),
            "others_average_max_abs_error": _sig(self.others_average_error),
            "others_average_vs_closest_single_site_max_abs_difference": _sig(self.nearest_single_site),
        })
        return {
            "mechanism": flower_secagg.MECHANISM,
            "engine": self.engine,
            "rounds": self.rounds,
            "sites": list(self.sites),
            "num_shares": self.secure.protocol["num_shares"],
            "reconstruction_threshold": self.secure.protocol["reconstruction_threshold"],
            "quantisation": {
                "clipping_range": self.settings.clipping_range,
                "quantization_range": self.settings.quantization_range,
                "modulus_range": self.settings.modulus_range,
                "max_weight": self.secure.protocol["max_weight"],
                "step": _sig(step),
                "largest_weighted_weight": _sig(self.largest_weighted_weight),
            },
            "aggregate_vs_fedavg": {
                "max_abs_difference": _sig(max(self.aggregate_error.values())),
                "in_quantisation_steps": round(max(self.aggregate_error.values()) / step, 2),
                "per_round": [_sig(self.aggregate_error[r]) for r in sorted(self.aggregate_error)],
            },
            "server_view": {
                "how_measured": ("a Grid wrapper between the server's workflow and the engine records every reply "
                                 "as received; each site's upload is compared with its update replayed from the "
                                 "global model the server sent"),
                "plain_upload_vs_update_max_abs_difference": _sig(self.plain_upload_error),
                "secagg_upload": f"integers in [0, {self.settings.modulus_range}) (quantised weights plus masks)",
                "values_per_site": self.masked_values,
                "masked_upload_uncorrelated_with_update": self.masked_uncorrelated(),
                "criterion": f"|Pearson r| x sqrt(values) < {CORRELATION_Z:g} at every site",
                "varies_run_to_run": "the masked values and their correlation (shown in the rendered notebook)",
            },
            "position_d": position_d,
            "cost": {
                "bytes_per_round": {"plain": int(sum(cost.iloc[0, 1:3])), "secagg": int(sum(cost.iloc[1, 1:3]))},
                "bytes_ratio": round(self.bytes_ratio(), 2),
                "messages_per_round": {"plain": int(cost.iloc[0, 3]), "secagg": int(cost.iloc[1, 3])},
                "wall_time": "per round, SecAgg+ against plain, in the rendered notebook (it varies run to run)",
            },
            "protects": PROTECTS,
            "does_not_protect": DOES_NOT_PROTECT,
        }

    def masked_uncorrelated(self) -> bool:
        """Return whether every site's masked upload is uncorrelated with its weights (within CORRELATION_Z s.e.)."""
        return all(abs(r) * np.sqrt(self.masked_values) < CORRELATION_Z for r in self.masked_correlation.values())


def measure(profile: Profile, build_dir: Path, rounds: int | None = None, engine: str | None = None,
            settings: flower_secagg.SecAggSettings | None = None) -> SecAggMeasurement:
    """Return SecAgg+ measured on the first `rounds` rounds (default `privacy.secagg_rounds`) of stage 3's FedAvg.

    Both runs use stage 3's federated standardisation and the profile's
    local training, in this process on the profile's engine.
    """
    require_logistic(profile)
    rounds = rounds or min(profile.privacy.secagg_rounds, profile.federated.rounds)
    engine = engine or profile.federated.engine
    settings = settings or flower_secagg.SecAggSettings(clipping_range=profile.privacy.secagg_clipping_range)
    train = site_splits(build_dir, profile.sites, "train")
    spec = load_result(Path(build_dir) / FEDERATED / "fedavg", "fedavg", shared_schema(train)).spec
    plan = flower_secagg.federation_plan(profile, spec, {s: len(d) for s, d in train.items()}, rounds)
    dirs = [site_dir(build_dir, s) for s in profile.sites]
    plain = flower_secagg.run(plan, dirs, None, engine)
    secure = flower_secagg.run(plan, dirs, settings, engine)

    sites = {s: (train[s], None) for s in profile.sites}
    config = local_train_config(profile)
    total = plan.total_rows
    aggregate_error, pairs = {}, {s: ([], []) for s in profile.sites}
    partner, others, nearest, largest = [], [], [], 0.0
    for server_round in range(1, rounds + 1):
        updates = replay_round(secure.sent[server_round], sites, spec, config, profile.seed, server_round)
        largest = max(largest, *(_max_abs([w * (u.num_examples / total) for w in u.weights]) for u in updates.values()))
        if largest >= settings.clipping_range:
            raise SecAggError(f"a hospital's weighted model weight reaches {largest:.3g}, beyond the SecAgg+ clipping "
                              f"range {settings.clipping_range:g}: it would be clipped and the aggregate biased; "
                              f"raise privacy.secagg_clipping_range in params/{profile.profile}.yaml")
        aggregate = secure.aggregates[server_round]
        aggregate_error[server_round] = weights_difference(aggregate, weighted_average(
            [updates[s] for s in sorted(updates)]))
        for site, upload in secure.uploads[server_round].items():
            masked, true = pairs[site]
            masked.append(np.concatenate([a.ravel() for a in upload[1:]]).astype(np.float64))  # [0]: masked weight
            true.append(np.concatenate([w.ravel() for w in updates[site].weights]).astype(np.float64))
        if len(updates) == 2:
            for victim, own in ((a, b) for a in updates for b in updates if a != b):
                recovered = partner_update(aggregate, updates[own].weights, updates[own].num_examples,
                                           updates[victim].num_examples)
                partner.append(weights_difference(recovered, updates[victim].weights))
        else:
            error, closest = _others(aggregate, updates, total)
            others.append(error)
            nearest.append(closest)

    round_one = replay_round(plain.sent[1], sites, spec, config, profile.seed, 1)
    plain_error = max(weights_difference(plain.uploads[1][s], round_one[s].weights) for s in round_one)
    correlation = {s: float(np.corrcoef(np.concatenate(m), np.concatenate(t))[0, 1]) for s, (m, t) in pairs.items()}
    return SecAggMeasurement(settings, engine, tuple(profile.sites), rounds, secure, plain, aggregate_error,
                             correlation, int(sum(len(m) for m in pairs[profile.sites[0]][0])), plain_error,
                             max(partner) if partner else None, max(others) if others else None,
                             min(nearest) if nearest else None, largest)


def _others(aggregate: list[np.ndarray], updates: dict[str, LocalResult], total: int) -> tuple[float, float]:
    """Return (max error of the others' average each site recovers, min distance of it from any single other site)."""
    errors, distances = [], []
    for own, mine in updates.items():
        rest = {s: u for s, u in updates.items() if s != own}
        rest_rows = total - mine.num_examples
        recovered = partner_update(aggregate, mine.weights, mine.num_examples, rest_rows)
        errors.append(weights_difference(recovered, weighted_average([rest[s] for s in sorted(rest)])))
        distances.append(min(weights_difference(recovered, u.weights) for u in rest.values()))
    return max(errors), min(distances)


def _max_abs(arrays: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(a))) for a in arrays)


def _mean(values: list[int]) -> float:
    return float(np.mean(values))


def _sig(value: float, digits: int = 3) -> float:
    """Return `value` to `digits` significant digits (summary numbers, stable against the last float bits)."""
    return float(f"{value:.{digits}g}")
