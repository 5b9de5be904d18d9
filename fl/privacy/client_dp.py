"""Client-level differential privacy with two hospitals: Flower's DP wrapper, its epsilon and its cost.

Client-level DP protects a whole hospital's contribution, not one patient:
each round the aggregator clips every hospital's model update to a norm
`C`, averages the clipped updates unweighted and adds Gaussian noise of
standard deviation `noise_multiplier * C / n_sites` (Flower's
`DifferentialPrivacyServerSideFixedClipping`, run through the pilot's own
ServerApp, `fl.flower.server_app.SeededClientLevelDP`). With every hospital
in every round there is no sampling to amplify privacy, so the RDP
accountant composes `rounds` full Gaussian mechanisms. Epsilon is stated at
a delta for the unit "one hospital".

What it does not do: the aggregator adds the noise after it has seen each
hospital's clipped update, so client-level DP protects the released model
(and each round's global model) against everyone else, not the updates
against the aggregator (position C). With two hospitals, either one can
subtract its own clipped update from the global model and is left with the
other's update plus noise of standard deviation `noise_multiplier * C` per
weight: that noise, and nothing else, is what protects the partner
(position D). Secure aggregation hides the individual updates from the
aggregator but, with two hospitals, not from each other.

Adjacency: the epsilon the frontier states is for adding or removing one
hospital's whole contribution (the sum of clipped updates changes by at
most C). With two hospitals that always take part, the natural neighbour
is one hospital's data *replaced* by any other: the sum then changes by up
to 2C, which is the add/remove mechanism at half the noise multiplier
(`replacement_epsilon`). Both are reported.

Round 0: the frontier's runs use fixed public scaling
(`fl.privacy.public_scaling`) in place of the federated statistics round,
so no site sends counts or sums and the epsilon covers every message the
hospitals send and the released model with its preprocessing.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from compendium.params import Profile
from fl.data import PreprocessingSpec
from fl.flower.engine import run_direct
from fl.flower.server_app import ClientLevelDP
from fl.privacy.dp import accounted_epsilon

UNIT = "one hospital (client-level): all of one hospital's patients"
ADJACENCY = ("add/remove of one hospital's whole contribution (sensitivity C); under replacement of one hospital's "
             "data (sensitivity 2C) see epsilon_replacement")
ACCOUNTANT = "RDP (Opacus RDPAccountant), no subsampling (every hospital in every round)"


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Return epsilon at `delta` after `rounds` Gaussian releases with sensitivity C/n and noise z*C/n.

    Every hospital takes part in every round: the sampling rate is 1.
    """
    return accounted_epsilon(noise_multiplier, 1.0, rounds, delta)


def replacement_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Return epsilon at `delta` when the neighbour replaces one hospital's data (sensitivity 2C, not C).

    The Gaussian mechanism with noise z * C and sensitivity 2C is the one
    with sensitivity C and noise (z / 2) * C.
    """
    return client_level_epsilon(noise_multiplier / 2, rounds, delta)


def client_level_frontier(profile: Profile, site_dirs: list[Path], output_dir: Path,
                          noise_multipliers: list[float], clipping_norm: float, delta: float,
                          preprocessing: PreprocessingSpec | None = None, noise_source: str = "seeded") -> pd.DataFrame:
    """Return one row per noise level (0 = no DP): epsilon at delta (add/remove and replacement of one hospital)
    and the final model's AUROC at each site.

    AUROC is each site's own evaluation of the final global model on its
    test split (the last round of the run's history), as in stage 3. With a
    fixed `preprocessing` (public scaling) no statistics round is run; the
    noise-0 row uses the same preprocessing, so its AUROC is the DP runs' reference.
    """
    rows = []
    for noise in [0.0, *noise_multipliers]:
        settings = ClientLevelDP(noise, clipping_norm, noise_source) if noise > 0 else None
        result = run_direct(profile, "fedavg", site_dirs, Path(output_dir) / f"noise_{noise:g}", client_dp=settings,
                            preprocessing=preprocessing)
        last = max(row["round"] for row in result.history)
        auroc = {row["site"]: float(row["auroc"]) for row in result.history if row["round"] == last}
        rounds = profile.federated.rounds
        rows.append({"noise_multiplier": noise, "clipping_norm": clipping_norm if noise > 0 else None,
                     "epsilon": client_level_epsilon(noise, rounds, delta) if noise > 0 else float("inf"),
                     "epsilon_replacement": replacement_epsilon(noise, rounds, delta) if noise > 0 else float("inf"),
                     "delta": delta, "noise_source": noise_source if noise > 0 else None,
                     **{f"auroc_{site}": value for site, value in sorted(auroc.items())}})
    return pd.DataFrame(rows)
