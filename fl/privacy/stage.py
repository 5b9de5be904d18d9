"""Stage 4: run the privacy attacks of each attacker position and summarise them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from compendium.params import Profile
from fl.baselines import shared_schema, site_splits
from fl.data import site_dir
from fl.federated import initial_weights
from fl.flower.server_app import CHECKPOINTS, local_train_config, saved_weights
from fl.flower.stage import load_result
from fl.privacy import membership as mi
from fl.privacy import client_dp as cdp
from fl.privacy.experiment import MembershipExperiment, TrainingRecipe, null_control, run
from fl.privacy import attribute as ai
from fl.privacy import canaries as cn
from fl.privacy import reconstruction as rc
from fl.privacy.updates import UpdateAttack, attack_update, replay_round

FEDERATED = Path("03_federated_training")
ATTACK_LABELS = {"loss": "loss threshold", "lira_online": "LiRA (online)", "lira_offline": "LiRA (offline)",
                 "rmia": "RMIA"}


def require_logistic(profile: Profile) -> None:
    """Raise unless the profile's model is the logistic regression the batched attacks support."""
    if profile.baselines.model != "logistic":
        raise ValueError(f"stage 4 attacks a logistic-regression federation; baselines.model is "
                         f"{profile.baselines.model!r} in params/{profile.profile}.yaml")


def recipe(profile: Profile, n_inputs: int) -> TrainingRecipe:
    """Return the federated training every reference model repeats (the profile's FedAvg run)."""
    f = profile.federated
    weights = initial_weights("logistic", n_inputs, (), profile.seed)
    return TrainingRecipe(f.rounds, f.local_epochs, f.learning_rate, f.weight_decay, (weights[0], weights[1]))


def membership(profile: Profile, build_dir: Path) -> MembershipExperiment:
    """Return the pooled membership-inference experiment on the federated pipeline (positions A and B)."""
    require_logistic(profile)
    sites = site_splits(build_dir, profile.sites, "all")
    p = profile.privacy
    return run(sites, p.reference_models, p.target_models, recipe(profile, shared_schema(sites).n_inputs),
               profile.seed, p.population_size)


def positive_control(profile: Profile, build_dir: Path) -> MembershipExperiment:
    """Return the same experiment on a deliberately overfit federation (few patients, long training)."""
    p = profile.privacy
    everyone = site_splits(build_dir, profile.sites, "all")
    sites = {s: d.take(np.arange(min(p.positive_control_patients, len(d)))) for s, d in everyone.items()}
    base = recipe(profile, shared_schema(everyone).n_inputs)
    overfit = TrainingRecipe(10, p.positive_control_epochs, 0.2, 0.0, base.initial)
    models = max(p.reference_models, 32)
    return run(sites, models, models // 2, overfit, profile.seed, population_size=2 * p.positive_control_patients)


def update_attacks(profile: Profile, build_dir: Path) -> list[UpdateAttack]:
    """Return positions C and D attacks on every round's update of each site (replayed from the checkpoints).

    Position D (the other hospital subtracting its own update from the
    aggregate) recovers one partner's update only in a two-site federation;
    with more sites it is not attacked (`other_hospital` is None).
    """
    require_logistic(profile)
    folder = Path(build_dir) / FEDERATED / "fedavg"
    train = site_splits(build_dir, profile.sites, "train")
    spec = load_result(folder, "fedavg", shared_schema(train)).spec
    test = site_splits(build_dir, profile.sites, "test")
    sites = {s: (train[s], test[s]) for s in profile.sites}
    attacks = []
    for server_round in range(1, profile.federated.rounds + 1):
        weights = _global_model(folder, server_round)
        updates = replay_round(weights, sites, spec, local_train_config(profile), profile.seed, server_round)
        attacks.extend(attack_update(weights, updates, sites, spec, server_round, victim) for victim in profile.sites)
    return attacks


def _global_model(folder: Path, server_round: int) -> list[np.ndarray]:
    """Return the global model the sites start `server_round` from (the checkpoint of the round before)."""
    return saved_weights(np.load(folder / CHECKPOINTS / f"round_{server_round - 1:03d}.npz"))


def reported_rounds(profile: Profile) -> set[int]:
    """Return the rounds whose update attacks go into the tables: the first, the middle and the last."""
    return {1, max(1, profile.federated.rounds // 2), profile.federated.rounds}


def per_round_exposure(attacks: list[UpdateAttack]) -> pd.DataFrame:
    """Return per round and site the server's (C) and the other hospital's (D) AUC and TPR at 1% FPR."""
    return pd.DataFrame([{"round": a.server_round, "victim site": a.victim,
                          "C: AUC": round(a.server.auc, 4), "C: TPR@1%FPR": round(a.server.tpr_at[0.01][0], 4),
                          "D: AUC": round(a.other_hospital.auc, 4) if a.other_hospital else None,
                          "D: TPR@1%FPR": round(a.other_hospital.tpr_at[0.01][0], 4) if a.other_hospital else None}
                         for a in attacks])


#: Why attribute inference and canaries are not run on a provided dataset.
SYNTHETIC_ONLY = ("not run on provided data: the attack is built on the synthetic cohort's feature definitions "
                  "(its diagnosis columns, the canaries' value ranges)")


def attribute_inference(profile: Profile, build_dir: Path,
                        experiment: MembershipExperiment) -> ai.AttributeInference | None:
    """Return attribute inference of the profile's sensitive diagnosis against the membership experiment's targets.

    None on a provided dataset (`SYNTHETIC_ONLY` says why).
    """
    if profile.dataset is not None:
        return None
    sites = site_splits(build_dir, profile.sites, "all")
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 9]))
    return ai.run(experiment.trained, experiment.membership, sites, profile.privacy.sensitive_attribute,
                  experiment.targets, rng)


def canary_exposure(profile: Profile, build_dir: Path) -> cn.CanaryExposure | None:
    """Return the exposure of canaries injected into the first site, against every reference pipeline.

    None on a provided dataset (`SYNTHETIC_ONLY` says why).
    """
    require_logistic(profile)
    if profile.dataset is not None:
        return None
    sites = site_splits(build_dir, profile.sites, "all")
    p = profile.privacy
    return cn.run(sites, profile.sites[0], p.canaries, p.reference_models,
                  recipe(profile, shared_schema(sites).n_inputs), profile.seed)


def batch_reconstruction(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return gradient-matching reconstruction from FedSGD batch gradients, after one round and after all rounds.

    The models the gradients are taken at are the FedAvg run's global models
    of those rounds; the batches are drawn from all patients (model inputs
    standardised with the federated statistics).
    """
    require_logistic(profile)
    folder = Path(build_dir) / FEDERATED / "fedavg"
    sites = site_splits(build_dir, profile.sites, "all")
    spec = load_result(folder, "fedavg", shared_schema(sites)).spec
    inputs = np.concatenate([spec.transform(sites[s].features) for s in profile.sites]).astype(np.float64)
    labels = np.concatenate([sites[s].labels for s in profile.sites])
    models = [_global_model(folder, r) for r in range(1, profile.federated.rounds + 1)]
    weight = np.stack([m[0].reshape(-1) for m in models]).astype(np.float64)
    bias = np.array([float(m[1].ravel()[0]) for m in models])
    p = profile.privacy
    rows = []
    for rounds in sorted({1, profile.federated.rounds}):
        rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 10, rounds]))
        for row in rc.batch_reconstruction(inputs, labels, weight[:rounds], bias[:rounds], rc.feature_levels(spec),
                                           len(spec.schema.features), tuple(p.reconstruction_batch_sizes),
                                           p.reconstruction_batches, rng):
            rows.append({"rounds observed": rounds, **row})
    return pd.DataFrame(rows)


def dp_frontier(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return, per DP noise level: epsilon per hospital and overall, AUROC per site, and the loss attack
    on the DP model (members: training split, non-members: test split) against the bound epsilon implies."""
    from fl import evaluate as ev
    from fl.data import FeatureStatistics, PreprocessingSpec
    from fl.federated import predict, predict_logits
    from fl.privacy.dp import DPConfig, dp_fedavg

    require_logistic(profile)
    p, f = profile.privacy, profile.federated
    train = site_splits(build_dir, profile.sites, "train")
    test = site_splits(build_dir, profile.sites, "test")
    schema = shared_schema(train)
    spec = PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([t.features for t in train.values()], schema),
                                             schema)
    data = {s: (spec.transform(t.features), t.labels) for s, t in train.items()}
    start = initial_weights("logistic", schema.n_inputs, (), profile.seed)
    rows = []
    for noise in p.dp_noise_multipliers:
        config = DPConfig(noise, p.dp_max_grad_norm, p.dp_sample_rate, p.dp_delta, p.dp_learning_rate, 1)
        weights, epsilons = dp_fedavg(data, start, f.rounds, config, profile.seed)
        epsilon = max(epsilons.values())
        row = {"noise_multiplier": noise, "epsilon": round(epsilon, 3), "delta": p.dp_delta,
               **{f"epsilon_{s}": round(e, 3) for s, e in epsilons.items()}}
        scores, members = [], []
        for site in profile.sites:
            for split, is_member in ((train[site], True), (test[site], False)):
                scores.append(mi.loss_scores(predict_logits("logistic", (), weights, spec.transform(split.features)),
                                             split.labels))
                members.append(np.full(len(split), is_member))
            row[f"auroc_{site}"] = (round(ev.auroc(test[site].labels, predict(
                "logistic", (), weights, spec.transform(test[site].features))), 4)
                if ev.not_estimable_reason(test[site].labels) is None else None)
        attack = mi.evaluate_attack(np.concatenate(scores), np.concatenate(members))
        row |= against_bound(attack.tpr_at, epsilon, p.dp_delta, tpr_key="attack_tpr_at")
        row["attack_auc"] = round(attack.auc, 4)
        rows.append(row)
    return pd.DataFrame(rows)


def client_dp_frontier(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return the client-level DP frontier: per noise level (0 = no DP), epsilon for one hospital and each site's AUROC.

    Each point re-runs the FedAvg federation through the pilot's Flower apps
    with Flower's server-side clipping wrapper (fl.privacy.client_dp).
    """
    import tempfile

    p = profile.privacy
    with tempfile.TemporaryDirectory(prefix="client-dp-") as runs:
        return cdp.client_level_frontier(profile, [site_dir(build_dir, s) for s in profile.sites], Path(runs),
                                         list(p.client_dp_noise_multipliers), p.client_dp_clipping_norm, p.dp_delta)


def secure_aggregation(profile: Profile, build_dir: Path):
    """Return Flower's SecAgg+ measured on the first `privacy.secagg_rounds` FedAvg rounds (fl.privacy.secagg).

    The aggregate against plain FedAvg, what the server receives from each
    site, the other hospital's subtraction (position D) and the cost.
    """
    from fl.privacy.secagg import measure

    return measure(profile, build_dir)


def dp_membership(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return, per DP noise level and attack, the membership attacks against DP-SGD-trained federations
    (batched reference pipelines, as for the non-private model) and the bound their epsilon implies."""
    from fl.privacy.dp import accounted_epsilon
    from fl.privacy.reference import DPSGDRecipe

    require_logistic(profile)
    p, f = profile.privacy, profile.federated
    # A random subsample of each site keeps the many small DP steps affordable; the bound is unchanged,
    # since epsilon depends on the sampling rate and the number of steps, not on how many patients there are.
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 11]))
    sites = {s: d.take(np.sort(rng.choice(len(d), min(p.dp_attack_patients, len(d)), replace=False)))
             for s, d in site_splits(build_dir, profile.sites, "all").items()}
    start = recipe(profile, shared_schema(sites).n_inputs).initial
    rows = []
    for noise in p.dp_noise_multipliers:
        dp = DPSGDRecipe(f.rounds, 1, noise, p.dp_max_grad_norm, p.dp_sample_rate, p.dp_learning_rate, start)
        experiment = run(sites, p.dp_attack_reference_models, p.target_models, dp, profile.seed, p.population_size)
        # Each site's accountant: Poisson rate 1 / steps, steps per epoch times epochs times rounds.
        epsilon = max(accounted_epsilon(noise, 1 / steps, steps * dp.local_epochs * dp.rounds, p.dp_delta)
                      for steps in experiment.trained.dp_steps.values())
        for attack, result in experiment.results.items():
            row = {"noise_multiplier": noise, "epsilon": round(epsilon, 3), "delta": p.dp_delta,
                   "attack": ATTACK_LABELS[attack], "auc": round(result.auc, 4)}
            row |= against_bound(result.tpr_at, epsilon, p.dp_delta, interval=True)
            rows.append(row | {"members": result.members, "non_members": result.non_members,
                               "patients_per_site": {s: len(d) for s, d in sites.items()}})
    return pd.DataFrame(rows)


def against_bound(tpr_at: dict[float, tuple[float, float, float]], epsilon: float, delta: float,
                  tpr_key: str = "tpr_at", interval: bool = False) -> dict:
    """Return per FPR an attack's TPR (with its 95% interval if `interval`), the bound epsilon implies, and
    whether it is violated: a violation needs the whole confidence interval above the bound."""
    from fl.privacy.dp import epsilon_bound

    row = {}
    for fpr, (tpr, low, high) in tpr_at.items():
        bound, label = epsilon_bound(epsilon, delta, fpr), mi.fpr_label(fpr)
        row[f"{tpr_key}_{label}"] = round(tpr, 5)
        if interval:
            row |= {f"tpr_lower_at_{label}": round(low, 5), f"tpr_upper_at_{label}": round(high, 5)}
        row |= {f"bound_at_{label}": round(bound, 5), f"violates_bound_at_{label}": bool(low > bound)}
    return row


def dp_attack_table(dp_attacks: pd.DataFrame) -> pd.DataFrame:
    """Return per noise level and attack: epsilon, AUC, TPR at 1% FPR (95% CI) and the bound epsilon implies."""
    return pd.DataFrame({
        "noise multiplier": dp_attacks["noise_multiplier"], "epsilon": dp_attacks["epsilon"],
        "attack": dp_attacks["attack"], "AUC": dp_attacks["auc"],
        "TPR@1%FPR": [f"{v:.4f} ({lo:.4f}-{hi:.4f})" for v, lo, hi in dp_attacks[
            ["tpr_at_1pct_fpr", "tpr_lower_at_1pct_fpr", "tpr_upper_at_1pct_fpr"]].to_numpy()],
        "bound at 1% FPR": dp_attacks["bound_at_1pct_fpr"],
        "bound violated": dp_attacks["violates_bound_at_1pct_fpr"] | dp_attacks["violates_bound_at_0.1pct_fpr"]})


def results_table(experiment: MembershipExperiment, position: str) -> pd.DataFrame:
    """Return one row per attack: AUC, TPR at 0.1% and 1% FPR with 95% CIs, trials."""
    rows = []
    for attack, result in experiment.results.items():
        d = result.as_dict()
        rows.append({
            "position": position, "attack": ATTACK_LABELS[attack], "auc": d["auc"],
            "tpr@0.1%fpr": f"{d['tpr_at_0.1pct_fpr']['value']:.4f} ({d['tpr_at_0.1pct_fpr']['lower']:.4f}-"
                           f"{d['tpr_at_0.1pct_fpr']['upper']:.4f})",
            "tpr@1%fpr": f"{d['tpr_at_1pct_fpr']['value']:.4f} ({d['tpr_at_1pct_fpr']['lower']:.4f}-"
                         f"{d['tpr_at_1pct_fpr']['upper']:.4f})",
            "member trials": d["members"], "non-member trials": d["non_members"],
        })
    return pd.DataFrame(rows)


def exposure_quantiles(gap: pd.Series) -> pd.DataFrame:
    """Return quantiles of the per-patient exposure (no minimum or maximum: those are single patients)."""
    quantiles = [0.1, 0.5, 0.9, 0.99]
    table = pd.DataFrame({"quantile": quantiles, "score gap": np.quantile(gap.to_numpy(), quantiles).round(3)})
    table.attrs["patients"] = int(gap.size)
    return table


def roc_curves(experiment: MembershipExperiment) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return each attack's pooled ROC curve."""
    return {ATTACK_LABELS[a]: mi.roc_curve(s, experiment.members) for a, s in experiment.scores.items()}


def update_table(attacks: list[UpdateAttack], rounds: set[int]) -> pd.DataFrame:
    """Return for the given rounds, per victim site: partner-recovery error, and C/D membership AUC and TPR at 1% FPR."""
    chosen = [a for a in attacks if a.server_round in rounds]
    not_applicable = "not applicable (more than two sites)"
    table = per_round_exposure(chosen)
    table.insert(2, "D recovers the partner's model (max abs error)",
                 [f"{a.partner_recovery_error:.1e}" if a.other_hospital is not None else not_applicable for a in chosen])
    for column in ("D: AUC", "D: TPR@1%FPR"):
        table[column] = [value if a.other_hospital is not None else not_applicable
                         for a, value in zip(chosen, table[column])]
    return table


def summary(profile: Profile, experiment: MembershipExperiment, control: MembershipExperiment,
            null: dict[str, mi.AttackResult], attacks: list[UpdateAttack], frontier: pd.DataFrame,
            attribute: ai.AttributeInference, canary: cn.CanaryExposure, reconstruction: pd.DataFrame,
            dp_attacks: pd.DataFrame, client_dp: pd.DataFrame, secagg) -> dict:
    """Return stage 4's summary.json: one entry per (attack, position, target model), and the attacks whose
    metrics are not membership ROCs (attribute inference, canaries, reconstruction, per-round exposure), and the
    defences (DP-SGD, client-level DP, secure aggregation: `secagg` is a fl.privacy.secagg.SecAggMeasurement)."""
    entries = []
    for attack, result in experiment.results.items():
        entries.append({"attack": attack, "position": "A/B: released model (scores or weights)",
                        "target_model": "federated FedAvg, pooled over targets", **result.as_dict()})
    for attack, result in control.results.items():
        entries.append({"attack": attack, "position": "positive control", "target_model": "overfit federation",
                        **result.as_dict()})
    for attack, result in null.items():
        entries.append({"attack": attack, "position": "null control", "target_model": "non-members only",
                        **result.as_dict()})
    if canary is not None:
        canary_groups = canary.as_dict()["groups"]
        entries.append({"attack": "lira_online", "position": "canaries (worst case)",
                        "target_model": f"federated FedAvg with {canary.canaries} canaries at {canary.site}",
                        "auc": canary_groups["canaries"]["auc"],
                        **{k: v for k, v in canary_groups["canaries"].items() if k.startswith("tpr_at")},
                        "members": canary.trials["canaries"], "non_members": canary.threshold_trials})
    for a in (a for a in attacks if a.server_round in reported_rounds(profile)):
        for position, result in (("C: server, site update", a.server), ("D: other hospital, recovered update",
                                                                          a.other_hospital)):
            if result is None:
                continue
            entries.append({"attack": "loss_drop", "position": position,
                            "target_model": f"round {a.server_round} update of {a.victim}", **result.as_dict()})
    return {
        "stage": "04_privacy_evaluation",
        "profile": profile.profile,
        "seed": profile.seed,
        "reference_models": experiment.models,
        "target_models": experiment.targets,
        "attacks": entries,
        "partner_recovery_max_error": (max(a.partner_recovery_error for a in attacks)
                                       if all(a.other_hospital is not None for a in attacks) else None),
        "per_round_exposure": per_round_exposure(attacks).to_dict(orient="records"),
        "attribute_inference": {"position": "A/B: released model (scores or weights)",
                                "target_model": "federated FedAvg, pooled over targets", **attribute.as_dict()}
        if attribute is not None else {"not_run": SYNTHETIC_ONLY},
        "canaries": {"attack": "lira_online", "position": "A/B: released model (scores or weights)",
                     "target_model": "federated FedAvg with canaries, every reference pipeline in turn",
                     **canary.as_dict()} if canary is not None else {"not_run": SYNTHETIC_ONLY},
        "batch_reconstruction": {
            "attack": "gradient matching", "position": "C/D: one site's FedSGD batch gradients",
            "numeric_tolerance_sd": rc.NUMERIC_TOLERANCE, "results": reconstruction.to_dict(orient="records")},
        "client_level_dp": {
            "mechanism": "Flower DifferentialPrivacyServerSideFixedClipping around unweighted FedAvg",
            "unit_of_privacy": cdp.UNIT, "accountant": cdp.ACCOUNTANT,
            "clipping_norm": profile.privacy.client_dp_clipping_norm,
            "points": [{k: round(v, 4) if k.startswith("auroc_") else v for k, v in row.items()}
                       for row in client_dp.to_dict(orient="records")],  # epsilon without noise: null
        },
        "dp_frontier": {
            "accountant": "RDP (Opacus RDPAccountant), kept across rounds per hospital",
            "unit_of_privacy": "one patient",
            "points": frontier.to_dict(orient="records"),
            "any_bound_violation": bool(frontier.filter(like="violates_bound").to_numpy().any()),
            "attacks_on_dp_reference_pipelines": dp_attacks.to_dict(orient="records"),
            "any_attack_bound_violation": bool(dp_attacks.filter(like="violates_bound").to_numpy().any()),
        },
        "secure_aggregation": secagg.summary(),
        # Kept (empty) for the report, which lists what stage 4 does not cover yet.
        "not_yet_measured": [],
    }
