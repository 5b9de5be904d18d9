"""Stage 4: run the privacy attacks of each attacker position and summarise them."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from compendium.params import Profile
from fl.baselines import shared_schema, site_splits
from fl.data import FeatureStatistics, PreprocessingSpec, site_dir
from fl.evaluate import auroc, not_estimable_reason
from fl.federated import initial_weights, predict, predict_logits
from fl.flower.server_app import CHECKPOINTS, local_train_config, saved_weights
from fl.flower.stage import load_result
from fl.privacy import attribute, audit, canaries, client_dp, dp, reconstruction, require_logistic
from fl.privacy.dp import DPConfig, accounted_epsilon, dp_fedavg, epsilon_bound
from fl.privacy.public_scaling import FEDERATED_STATISTICS_CHOICE, public_spec
from fl.privacy.experiment import MembershipExperiment, TrainingRecipe, run
from fl.privacy.membership import ATTACKS, AttackResult, clopper_pearson, evaluate_attack, fpr_label, loss_scores
from fl.privacy.reference import DPSGDRecipe
from fl.privacy.secagg import SecAggMeasurement, measure
from fl.privacy.updates import UpdateAttack, attack_update, replay_round

FEDERATED = Path("03_federated_training")


def recipe(profile: Profile, n_inputs: int) -> TrainingRecipe:
    """Return the federated training every reference model repeats (the profile's FedAvg run)."""
    federated = profile.federated
    weights = initial_weights("logistic", n_inputs, (), profile.seed)
    return TrainingRecipe(federated.rounds, federated.local_epochs, federated.learning_rate, federated.weight_decay,
                          (weights[0], weights[1]), federated.optimizer)


def membership(profile: Profile, build_dir: Path) -> MembershipExperiment:
    """Return the pooled membership-inference experiment on the federated pipeline (positions A and B)."""
    require_logistic(profile)
    sites = site_splits(build_dir, profile.sites, "all")
    privacy = profile.privacy
    return run(sites, privacy.reference_models, privacy.target_models,
               recipe(profile, shared_schema(sites).n_inputs), profile.seed, privacy.population_size)


def positive_control(profile: Profile, build_dir: Path) -> MembershipExperiment:
    """Return the same experiment on a deliberately overfit federation (few patients, long training)."""
    privacy = profile.privacy
    everyone = site_splits(build_dir, profile.sites, "all")
    sites = {s: d.take(np.arange(min(privacy.positive_control_patients, len(d)))) for s, d in everyone.items()}
    base = recipe(profile, shared_schema(everyone).n_inputs)
    overfit = TrainingRecipe(10, privacy.positive_control_epochs, 0.2, 0.0, base.initial)
    models = max(privacy.reference_models, 32)
    return run(sites, models, models // 2, overfit, profile.seed,
               population_size=2 * privacy.positive_control_patients)


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
                        experiment: MembershipExperiment) -> attribute.AttributeInference | None:
    """Return attribute inference of the profile's sensitive diagnosis against the membership experiment's targets.

    None on a provided dataset (`SYNTHETIC_ONLY` says why).
    """
    if profile.dataset is not None:
        return None
    sites = site_splits(build_dir, profile.sites, "all")
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 9]))
    return attribute.run(experiment.trained, experiment.membership, sites, profile.privacy.sensitive_attribute,
                         experiment.targets, rng)


def canary_exposure(profile: Profile, build_dir: Path) -> canaries.CanaryExposure | None:
    """Return the exposure of canaries injected into the first site, against every reference pipeline.

    None on a provided dataset (`SYNTHETIC_ONLY` says why).
    """
    require_logistic(profile)
    if profile.dataset is not None:
        return None
    sites = site_splits(build_dir, profile.sites, "all")
    privacy = profile.privacy
    return canaries.run(sites, profile.sites[0], privacy.canaries, privacy.reference_models,
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
    privacy = profile.privacy
    rows = []
    for rounds in sorted({1, profile.federated.rounds}):
        rng = np.random.default_rng(np.random.SeedSequence([profile.seed, 10, rounds]))
        for row in reconstruction.batch_reconstruction(
                inputs, labels, weight[:rounds], bias[:rounds], reconstruction.feature_levels(spec),
                len(spec.schema.features), tuple(privacy.reconstruction_batch_sizes),
                privacy.reconstruction_batches, rng):
            rows.append({"rounds observed": rounds, **row})
    return pd.DataFrame(rows)


def dp_preprocessing(profile: Profile, schema) -> PreprocessingSpec | None:
    """Return the fixed preprocessing of the profile's DP runs (public ranges), or None for federated statistics.

    None (privacy.dp_preprocessing: federated_statistics) means each DP run
    standardises with the statistics round, which no DP guarantee covers.
    """
    if profile.privacy.dp_preprocessing == FEDERATED_STATISTICS_CHOICE:
        return None
    return public_spec(schema)


def _federated_spec(train, schema) -> PreprocessingSpec:
    """Return the spec the statistics round computes (round 0 in the clear) from the training splits."""
    return PreprocessingSpec.from_statistics(FeatureStatistics.of_sites([t.features for t in train.values()], schema),
                                             schema)


def _dp_fedavg_auroc(profile: Profile, train, test, spec, noise: float, seed: int):
    """Return (weights, epsilons, AUROC per site) of DP FedAvg at `noise` with inputs standardised by `spec`."""
    privacy = profile.privacy
    config = DPConfig(noise, privacy.dp_max_grad_norm, privacy.dp_sample_rate, privacy.dp_delta,
                      privacy.dp_learning_rate, 1, privacy.dp_noise_source)
    data = {s: (spec.transform(t.features), t.labels) for s, t in train.items()}
    start = initial_weights("logistic", spec.n_outputs, (), seed)
    weights, epsilons = dp_fedavg(data, start, profile.federated.rounds, config, seed)
    auroc_at = {site: (round(auroc(test[site].labels, predict("logistic", (), weights,
                                                                spec.transform(test[site].features))), 4)
                       if not_estimable_reason(test[site].labels) is None else None) for site in profile.sites}
    return weights, epsilons, auroc_at


def dp_frontier(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return, per DP noise level: epsilon per hospital and overall, each hospital's sampling rate and steps,
    AUROC per site, and the loss attack on the DP model (members: training split, non-members: test split)
    against the bound epsilon implies.

    The DP runs standardise as `privacy.dp_preprocessing` says (public
    ranges by default: no statistics round). To measure what covering round
    0 costs, the smallest and the largest noise level are also run with the
    statistics round's standardisation (`auroc_<site>_round0_statistics`,
    outside the guarantee; two runs, not one per level, to keep stage 4 short).
    """
    require_logistic(profile)
    privacy = profile.privacy
    train = site_splits(build_dir, profile.sites, "train")
    test = site_splits(build_dir, profile.sites, "test")
    schema = shared_schema(train)
    federated = _federated_spec(train, schema)
    fixed = dp_preprocessing(profile, schema)
    spec = fixed if fixed is not None else federated
    rows = []
    for noise in privacy.dp_noise_multipliers:
        weights, epsilons, auroc_at = _dp_fedavg_auroc(profile, train, test, spec, noise, profile.seed)
        epsilon = max(epsilons.values())
        steps = {s: dp.steps_per_epoch(privacy.dp_sample_rate, len(t)) for s, t in train.items()}
        row = {"noise_multiplier": noise, "epsilon": round(epsilon, 3), "delta": privacy.dp_delta,
               "preprocessing": privacy.dp_preprocessing, "noise_source": privacy.dp_noise_source,
               **{f"epsilon_{s}": round(e, 3) for s, e in epsilons.items()},
               **{f"sample_rate_{s}": round(1 / n, 6) for s, n in steps.items()},
               **{f"steps_{s}": n * profile.federated.rounds for s, n in steps.items()}}
        scores, members = [], []
        for site in profile.sites:
            for split, is_member in ((train[site], True), (test[site], False)):
                scores.append(loss_scores(predict_logits("logistic", (), weights, spec.transform(split.features)),
                                          split.labels))
                members.append(np.full(len(split), is_member))
            row[f"auroc_{site}"] = auroc_at[site]
        compared = {min(privacy.dp_noise_multipliers), max(privacy.dp_noise_multipliers)}
        if fixed is not None and noise in compared:  # the same DP run with the statistics round: round 0's cost
            _, _, with_round0 = _dp_fedavg_auroc(profile, train, test, federated, noise, profile.seed)
            row |= {f"auroc_{site}_round0_statistics": value for site, value in with_round0.items()}
        attack = evaluate_attack(np.concatenate(scores), np.concatenate(members))
        row |= against_bound(attack.tpr_at, epsilon, privacy.dp_delta, attack.non_members, tpr_key="attack_tpr_at")
        row["attack_auc"] = round(attack.auc, 4)
        rows.append(row)
    return pd.DataFrame(rows)


def client_dp_frontier(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return the client-level DP frontier: per noise level (0 = no DP), epsilon for one hospital and each site's AUROC.

    Each point re-runs the FedAvg federation through the pilot's Flower apps
    with Flower's server-side clipping wrapper (fl.privacy.client_dp).
    """
    privacy = profile.privacy
    preprocessing = dp_preprocessing(profile, shared_schema(site_splits(build_dir, profile.sites, "train")))
    with tempfile.TemporaryDirectory(prefix="client-dp-") as runs:
        return client_dp.client_level_frontier(
            profile, [site_dir(build_dir, s) for s in profile.sites], Path(runs),
            list(privacy.client_dp_noise_multipliers), privacy.client_dp_clipping_norm, privacy.dp_delta,
            preprocessing, privacy.dp_noise_source)


def secure_aggregation(profile: Profile, build_dir: Path) -> SecAggMeasurement:
    """Return Flower's SecAgg+ measured on the first `privacy.secagg_rounds` FedAvg rounds (fl.privacy.secagg).

    The aggregate against plain FedAvg, what the server receives from each
    site, the other hospital's subtraction (position D) and the cost.
    """
    return measure(profile, build_dir)


def dp_membership(profile: Profile, build_dir: Path) -> pd.DataFrame:
    """Return, per DP noise level (0 first: the same DP-SGD training, clipping included, without noise) and
    attack, the membership attacks against DP-SGD-trained federations (batched reference pipelines, as for the
    non-private model) and the bound their epsilon implies.

    The sampling rate differs from the frontier's: a reference pipeline
    trains on its members (half of a `dp_attack_patients` subsample), and
    Opacus's Poisson rate is 1 / (batches per epoch), batches of
    round(dp_sample_rate * rows); rounding makes the rate, and so epsilon,
    differ slightly from the frontier's full training split at the same
    noise. Each row states its rate and steps.
    """
    require_logistic(profile)
    privacy = profile.privacy
    # A random subsample of each site keeps the many small DP steps affordable; the bound is unchanged,
    # since epsilon depends on the sampling rate and the number of steps, not on how many patients there are.
    sites, start, preprocessing = _dp_subsample(profile, build_dir, privacy.dp_attack_patients, 11)
    rows = []
    for noise in [0.0, *privacy.dp_noise_multipliers]:
        dp_recipe = _dp_recipe(profile, noise, start)
        experiment = run(sites, privacy.dp_attack_reference_models, privacy.target_models, dp_recipe, profile.seed,
                         privacy.population_size, preprocessing)
        # Each site's accountant: Poisson rate 1 / steps, steps per epoch times epochs times rounds.
        site_steps = experiment.trained.dp_steps
        total = {s: n * dp_recipe.local_epochs * dp_recipe.rounds for s, n in site_steps.items()}
        epsilon = (max(accounted_epsilon(noise, 1 / n, total[s], privacy.dp_delta) for s, n in site_steps.items())
                   if noise > 0 else float("inf"))
        for attack, result in experiment.results.items():
            row = {"noise_multiplier": noise, "epsilon": round(epsilon, 3), "delta": privacy.dp_delta,
                   "attack": ATTACKS[attack].label, "auc": round(result.auc, 4),
                   "preprocessing": privacy.dp_preprocessing,
                   "sample_rate": {s: round(1 / n, 6) for s, n in site_steps.items()}, "steps": total}
            row |= against_bound(result.tpr_at, epsilon, privacy.dp_delta, result.non_members, interval=True)
            rows.append(row | {"members": result.members, "non_members": result.non_members,
                               "patients_per_site": {s: len(d) for s, d in sites.items()}})
    return pd.DataFrame(rows)


def _dp_subsample(profile: Profile, build_dir: Path, patients: int, stream: int):
    """Return (a seeded random subsample of `patients` per site, the federation's initial weights, the DP runs'
    preprocessing): the set-up the DP attack runs (stream 11) and the audit (stream 13) share."""
    rng = np.random.default_rng(np.random.SeedSequence([profile.seed, stream]))
    sites = {s: d.take(np.sort(rng.choice(len(d), min(patients, len(d)), replace=False)))
             for s, d in site_splits(build_dir, profile.sites, "all").items()}
    schema = shared_schema(sites)
    return sites, recipe(profile, schema.n_inputs).initial, dp_preprocessing(profile, schema)


def _dp_recipe(profile: Profile, noise: float, start) -> DPSGDRecipe:
    """Return the profile's DP-SGD federation (one local epoch per round) at noise multiplier `noise`."""
    privacy = profile.privacy
    return DPSGDRecipe(profile.federated.rounds, 1, noise, privacy.dp_max_grad_norm, privacy.dp_sample_rate,
                       privacy.dp_learning_rate, start)


def dp_audit(profile: Profile, build_dir: Path) -> list[audit.AuditResult]:
    """Return the empirical audit of DP-SGD (fl.privacy.audit): per noise level, and two controls that must fail.

    - each `dp_noise_multipliers` level, with the DP runs' preprocessing;
    - planted accounting error: trained without noise, accounted at `audit_control_noise` (must be a violation);
    - round 0 in the clear: `audit_control_noise` with the statistics round's standardisation, the attacker
      reading the released statistics (a violation shows that round 0 is outside the guarantee).

    Each on `audit_patients` per site (a random subsample) and `audit_models` federations. Empty on a
    provided dataset: the canary is built from the synthetic cohort's features (`SYNTHETIC_ONLY`).
    """
    require_logistic(profile)
    if profile.dataset is not None:
        return []
    privacy = profile.privacy
    sites, start, spec = _dp_subsample(profile, build_dir, privacy.audit_patients, 13)

    def audited(noise, accounted=None, preprocessing=spec, label=None):
        dp_recipe = _dp_recipe(profile, noise, start)
        return audit.audit(sites, profile.sites[0], dp_recipe, privacy.audit_models, privacy.dp_delta, profile.seed,
                           preprocessing, accounted, label)

    control = privacy.audit_control_noise
    results = [audited(noise) for noise in privacy.dp_noise_multipliers]
    results.append(audited(0.0, control, label=f"planted error: no noise, accounted at noise {control:g}"))
    results.append(audited(control, preprocessing=None, label=f"round 0 in the clear, noise {control:g}"))
    return results


def dp_audit_table(results: list[audit.AuditResult]) -> pd.DataFrame:
    """Return per audited configuration: accounted epsilon, the audit's 95% lower bound, its ceiling, the verdict."""
    return pd.DataFrame([{"audit": r.label, "preprocessing": r.preprocessing, "epsilon (accounted)": round(r.epsilon, 3),
                          "epsilon lower bound (95%)": round(r.bound.epsilon_lower, 3),
                          "most the audit can show": round(r.bound.ceiling, 3), "verdict": r.verdict,
                          "federations (in/out, evaluated)": f"{r.bound.trials_in}/{r.bound.trials_out}"}
                         for r in results])


def against_bound(tpr_at: dict[float, tuple[float, float, float]], epsilon: float, delta: float, non_members: int,
                  tpr_key: str = "tpr_at", interval: bool = False) -> dict:
    """Return per FPR an attack's TPR (with its 95% interval if `interval`), the bound epsilon implies, and
    whether it is violated.

    The threshold was set on `non_members` trials to allow floor(fpr * non_members) false positives, so
    the false-positive rate it really has is uncertain too: a violation needs the TPR's whole interval
    above the bound at the upper end of that rate's 95% Clopper-Pearson interval (as DP audits do),
    not merely above e^epsilon * fpr + delta.

    Where the bound at that upper rate is 1 (a large epsilon, or no DP at all), no TPR can exceed it:
    the check is labelled "not testable" (`bound_check_at_*`), not "no violation".
    """
    row = {}
    for fpr, (tpr, low, high) in tpr_at.items():
        bound, label = epsilon_bound(epsilon, delta, fpr), fpr_label(fpr)
        fpr_upper = clopper_pearson(int(np.floor(fpr * non_members)), non_members)[1]
        tested = epsilon_bound(epsilon, delta, fpr_upper)
        violated = bool(low > tested)
        row[f"{tpr_key}_{label}"] = round(tpr, 5)
        if interval:
            row |= {f"tpr_lower_at_{label}": round(low, 5), f"tpr_upper_at_{label}": round(high, 5)}
        row |= {f"bound_at_{label}": round(bound, 5), f"fpr_upper_at_{label}": round(fpr_upper, 5),
                f"violates_bound_at_{label}": violated,
                f"bound_check_at_{label}": audit.VIOLATION if violated else (
                    audit.NOT_TESTABLE if tested >= 1 else audit.NO_VIOLATION)}
    return row


def dp_attack_table(dp_attacks: pd.DataFrame) -> pd.DataFrame:
    """Return per noise level and attack: epsilon, AUC, TPR at 1% FPR (95% CI) and the bound epsilon implies."""
    return pd.DataFrame({
        "noise multiplier": dp_attacks["noise_multiplier"], "epsilon": dp_attacks["epsilon"],
        "attack": dp_attacks["attack"], "AUC": dp_attacks["auc"],
        "TPR@1%FPR": [f"{v:.4f} ({lo:.4f}-{hi:.4f})" for v, lo, hi in dp_attacks[
            ["tpr_at_1pct_fpr", "tpr_lower_at_1pct_fpr", "tpr_upper_at_1pct_fpr"]].to_numpy()],
        "bound at 1% FPR": dp_attacks["bound_at_1pct_fpr"],
        "bound check at 1% / 0.1% FPR": [f"{one} / {tenth}" for one, tenth in dp_attacks[
            ["bound_check_at_1pct_fpr", "bound_check_at_0.1pct_fpr"]].to_numpy()]})


def release_coverage(profile: Profile) -> dict:
    """Return what a DP run's epsilon covers: the preprocessing it used, and so whether round 0 is inside."""
    if profile.privacy.dp_preprocessing == FEDERATED_STATISTICS_CHOICE:
        return {"preprocessing": FEDERATED_STATISTICS_CHOICE,
                "covers": ("the model updates only: the statistics round (counts, sums, sums of squares in the clear) "
                           "and the means and standard deviations shipped with the model are outside it")}
    return {"preprocessing": "public_ranges",
            "covers": ("every message the hospitals send and the released model with its preprocessing: no statistics "
                       "round is run; inputs are scaled by fixed published ranges (fl/privacy/public_scaling.py)")}


def round0_utility_cost(frontier: pd.DataFrame, sites: list[str]) -> list[dict]:
    """Return per noise level the mean AUROC over sites with public scaling, with the statistics round, and the cost."""
    rows = []
    for point in frontier.to_dict(orient="records"):
        public = [point.get(f"auroc_{s}") for s in sites]
        federated = [point.get(f"auroc_{s}_round0_statistics") for s in sites]
        if any(v is None or v != v for v in public + federated):
            continue
        rows.append({"noise_multiplier": point["noise_multiplier"], "epsilon": point["epsilon"],
                     "mean_auroc_public_ranges": round(float(np.mean(public)), 4),
                     "mean_auroc_round0_statistics": round(float(np.mean(federated)), 4),
                     "auroc_cost": round(float(np.mean(federated) - np.mean(public)), 4)})
    return rows


def results_table(experiment: MembershipExperiment, position: str) -> pd.DataFrame:
    """Return one row per attack: AUC, TPR at 0.1% and 1% FPR with 95% CIs, trials."""
    rows = []
    for attack, result in experiment.results.items():
        entry = result.as_dict()
        low_fpr, one_pct = entry["tpr_at_0.1pct_fpr"], entry["tpr_at_1pct_fpr"]
        rows.append({
            "position": position, "attack": ATTACKS[attack].label, "auc": entry["auc"],
            "tpr@0.1%fpr": f"{low_fpr['value']:.4f} ({low_fpr['lower']:.4f}-{low_fpr['upper']:.4f})",
            "tpr@1%fpr": f"{one_pct['value']:.4f} ({one_pct['lower']:.4f}-{one_pct['upper']:.4f})",
            "member trials": entry["members"], "non-member trials": entry["non_members"],
        })
    return pd.DataFrame(rows)


def exposure_quantiles(gap: pd.Series) -> pd.DataFrame:
    """Return quantiles of the per-patient exposure (no minimum or maximum: those are single patients)."""
    quantiles = [0.1, 0.5, 0.9, 0.99]
    table = pd.DataFrame({"quantile": quantiles, "score gap": np.quantile(gap.to_numpy(), quantiles).round(3)})
    table.attrs["patients"] = int(gap.size)
    return table


def roc_curves(experiment: MembershipExperiment) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return each attack's pooled ROC curve (FPR, TPR) under its figure label, from (0, 0), strictest first."""
    curves = {}
    for attack, scores in experiment.scores.items():
        fpr, tpr, _ = roc_curve(experiment.members, scores, drop_intermediate=False)
        curves[ATTACKS[attack].label] = (fpr, tpr)
    return curves


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


@dataclass(frozen=True)
class PrivacyResults:
    """Everything stage 4 measured, in the notebook's order; each field is what the function of its name returns."""

    membership: MembershipExperiment
    null_controls: dict[str, AttackResult]  # attack name -> `experiment.null_controls` of `membership`
    positive_control: MembershipExperiment
    attribute_inference: attribute.AttributeInference | None  # None on a provided dataset
    canary_exposure: canaries.CanaryExposure | None  # None on a provided dataset
    update_attacks: list[UpdateAttack]
    batch_reconstruction: pd.DataFrame
    dp_frontier: pd.DataFrame
    dp_membership: pd.DataFrame
    client_dp_frontier: pd.DataFrame
    secure_aggregation: SecAggMeasurement
    dp_audit: list[audit.AuditResult]


def summary(profile: Profile, results: PrivacyResults) -> dict:
    """Return stage 4's summary.json: one entry per (attack, position, target model), and the attacks whose
    metrics are not membership ROCs (attribute inference, canaries, reconstruction, per-round exposure), and the
    defences (DP-SGD, client-level DP, secure aggregation)."""
    experiment, canary, attacks = results.membership, results.canary_exposure, results.update_attacks
    entries = []
    for attack, result in experiment.results.items():
        entries.append({"attack": attack, "position": "A/B: released model (scores or weights)",
                        "target_model": "federated FedAvg, pooled over targets", **result.as_dict()})
    for attack, result in results.positive_control.results.items():
        entries.append({"attack": attack, "position": "positive control", "target_model": "overfit federation",
                        **result.as_dict()})
    for attack, result in results.null_controls.items():
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
    inference = results.attribute_inference
    frontier, dp_attacks = results.dp_frontier, results.dp_membership
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
                                "target_model": "federated FedAvg, pooled over targets", **inference.as_dict()}
        if inference is not None else {"not_run": SYNTHETIC_ONLY},
        "canaries": {"attack": "lira_online", "position": "A/B: released model (scores or weights)",
                     "target_model": "federated FedAvg with canaries, every reference pipeline in turn",
                     **canary.as_dict()} if canary is not None else {"not_run": SYNTHETIC_ONLY},
        "batch_reconstruction": {
            "attack": "gradient matching", "position": "C/D: one site's FedSGD batch gradients",
            "numeric_tolerance_sd": reconstruction.NUMERIC_TOLERANCE,
            "results": results.batch_reconstruction.to_dict(orient="records")},
        "client_level_dp": {
            "mechanism": "Flower DifferentialPrivacyServerSideFixedClipping around unweighted FedAvg",
            "unit_of_privacy": client_dp.UNIT, "adjacency": client_dp.ADJACENCY, "accountant": client_dp.ACCOUNTANT,
            "clipping_norm": profile.privacy.client_dp_clipping_norm,
            "noise_source": profile.privacy.dp_noise_source,
            "noise_source_meaning": {"seeded": "numpy's global generator seeded from (seed, round): reproducible, not "
                                               "private against anyone who knows the seed",
                                     "os": "numpy's global generator seeded from the OS's cryptographic source each "
                                           "round (the generator itself is not a CSPRNG)"}[profile.privacy.dp_noise_source],
            **release_coverage(profile),
            "points": [{k: round(v, 4) if k.startswith("auroc_") else v for k, v in row.items()}
                       for row in results.client_dp_frontier.to_dict(orient="records")],  # epsilon without noise: null
        },
        "dp_frontier": {
            "accountant": "RDP (Opacus RDPAccountant), kept across rounds per hospital",
            "unit_of_privacy": dp.UNIT, "adjacency": dp.ADJACENCY,
            "noise_source": profile.privacy.dp_noise_source,
            "noise_source_meaning": dp.NOISE_SOURCES[profile.privacy.dp_noise_source],
            "empty_poisson_batches": "take a noise-only step, counted by the accountant",
            **release_coverage(profile),
            "round0_utility_cost": round0_utility_cost(frontier, profile.sites),
            "sampling_rates": ("frontier: Opacus's Poisson rate 1 / ceil(n / round(dp_sample_rate * n)) on each "
                               "site's whole training split; attacks: the same rule on a reference pipeline's members "
                               "(half of dp_attack_patients per site), so rates and epsilons differ by rounding; "
                               "each row states its rate and steps"),
            "points": frontier.to_dict(orient="records"),
            "any_bound_violation": bool(frontier.filter(like="violates_bound").to_numpy().any()),
            "attacks_on_dp_reference_pipelines": dp_attacks.to_dict(orient="records"),
            "any_attack_bound_violation": bool(dp_attacks.filter(like="violates_bound").to_numpy().any()),
            "attack_noise_source": "seeded torch generator (simulated federations: reproducible by design)",
        },
        "dp_audit": {"not_run": SYNTHETIC_ONLY} if not results.dp_audit else {
            "method": ("canary in a random half of DP-SGD federations (the rest of the data fixed); 95% lower bound "
                       "on epsilon from Clopper-Pearson upper limits on FPR and FNR (Jagielski et al. 2020; Nasr et "
                       "al. 2021, 2023); threshold chosen on half the federations, bound on the other half"),
            "position": "A/B: released model (or, for round 0, the released preprocessing)",
            "noise_source": "seeded torch generator (simulated federations)",
            "patients_per_site": profile.privacy.audit_patients,
            "results": [r.as_dict() for r in results.dp_audit],
            "controls_caught": all(r.verdict == audit.VIOLATION for r in results.dp_audit
                                   if r.noise_multiplier != r.accounted_noise_multiplier
                                   or r.preprocessing != "public ranges"),
            "any_violation_at_noise_levels": any(r.verdict == audit.VIOLATION for r in results.dp_audit
                                                 if r.noise_multiplier == r.accounted_noise_multiplier
                                                 and r.preprocessing == "public ranges"),
        },
        "secure_aggregation": {**results.secure_aggregation.summary(),
                               "round0": ("not covered: SecAgg+ masks the training rounds' models only; the non-DP "
                                          "pipeline's statistics round sends each site's counts and sums in the "
                                          "clear (DP runs have no statistics round)")},
        # Kept (empty) for the report, which lists what stage 4 does not cover yet.
        "not_yet_measured": [],
    }
