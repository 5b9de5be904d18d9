"""Privacy evaluation (stage 4): does the model or the training carry personal data?

- `reference`: many federated models trained at once (reference models for membership inference).
- `membership`: loss-threshold, LiRA (online, offline) and RMIA scores, registered once each in `ATTACKS`;
  AUC and TPR at low FPR.
- `experiment`: pooled leave-one-out membership experiments and their sanity controls.
- `reconstruction`: exact record recovery from a single-record gradient; the partner's update;
  gradient matching on batch gradients.
- `updates`: membership inference on each round's update (positions C and D).
- `attribute`: attribute inference (a diagnosis from the rest of the record) against a population baseline.
- `canaries`: injected outlier patients and their exposure (worst case).
- `dp`: patient-level DP-SGD with Opacus and its accountant.
- `client_dp`: client-level DP (Flower's server-side clipping wrapper) and its epsilon for one hospital.
- `secagg`: Flower's SecAgg+ measured: aggregate, what the server receives, the other hospital, the cost.
- `stage`: what the stage-4 notebook runs.

The attacks are written for a logistic-regression federation (closed-form
gradients, batched reference models, replayed logistic updates):
`require_logistic` checks a profile before any of them runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: the hospitals' client app imports fl.privacy.dp, not the params schema
    from compendium.params import Profile


def require_logistic(profile: Profile) -> None:
    """Raise unless the profile's model is the logistic regression the batched attacks support."""
    if profile.baselines.model != "logistic":
        raise ValueError(f"stage 4 attacks a logistic-regression federation; baselines.model is "
                         f"{profile.baselines.model!r} in params/{profile.profile}.yaml")
